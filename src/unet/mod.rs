//! The UNet side of an edit: applying the operator to each stored K/V weight.

pub mod names;
pub mod weights;
