//! Whole journeys, from a user's request to files on disk. The CLI maps its
//! flags onto these requests; tests call them directly.

pub mod debias;
pub mod edit;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod prior;
