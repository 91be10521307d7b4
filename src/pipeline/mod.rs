//! Generation: prompt embeddings → latents denoised by a scheduler loop →
//! VAE decoder → image.

pub mod clip_image;
pub mod model;
pub mod png;
pub mod safety;
pub mod unet;
pub mod vae;

pub mod rng;
pub mod schedulers;
