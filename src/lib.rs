//! time-onnx: TIME (Orgad, Kawar, Belinkov, ICCV 2023) applied directly to
//! Stable Diffusion ONNX exports, and a runner for the edited models.
//!
//! The modules follow the data (ARCHITECTURE.md draws the two journeys):
//! - [`onnx`] reads model files without copying their weights, finds the
//!   cross-attention K/V weights by structure, and writes patched copies;
//!   it never runs a model;
//! - [`runtime`] loads ONNX Runtime, decides the device, and runs sessions:
//!   the only module that knows `ort`;
//! - [`text`] turns prompts into token ids and, through the text encoder,
//!   into embeddings;
//! - [`edit`] computes TIME's edit operator from embeddings and applies it
//!   to stored weights;
//! - [`pipeline`] holds the parts of generation: UNet, schedulers, the
//!   denoising loop, VAE, safety checker, images;
//! - [`eval`] scores edits on TIMED-format datasets;
//! - [`workflow`] wires the parts into the journeys the CLI runs (edit,
//!   generate, eval);
//! - [`staged`] makes every output file appear whole or not at all;
//!   [`bounded`] reads the small files a user names, up to a size.

#![deny(missing_docs)]

pub mod bounded;
pub mod edit;
pub mod eval;
pub mod onnx;
pub mod pipeline;
pub mod runtime;
pub mod serve;
pub mod staged;
pub mod text;
pub mod workflow;
