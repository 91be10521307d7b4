//! The parts of generation, in the order an image is made: a model folder's
//! layout ([`model`]), the memory a size needs ([`memory`]), the UNet session ([`unet`]), schedulers
//! ([`schedulers`]) and the guided denoising loop ([`denoise`]) with its
//! seeded noise ([`rng`]), the VAE decoder ([`vae`]), the safety checker
//! ([`safety`], with CLIP's image preprocessing in [`clip_image`]), and PNG
//! and .npy files ([`png`]), with captions on grids ([`label`]). [`crate::workflow::generate`] wires them.

pub mod clip_image;
pub mod conditioning;
pub mod denoise;
pub mod label;
pub mod memory;
pub mod model;
pub mod png;
pub mod rng;
pub mod safety;
pub mod schedulers;
pub mod unet;
pub mod vae;
