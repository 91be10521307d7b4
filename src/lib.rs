//! time-onnx: TIME (Orgad, Kawar, Belinkov, ICCV 2023) applied directly to
//! Stable Diffusion ONNX exports, and a runner for the edited models.
//!
//! The modules follow the data: [`onnx`] reads model files without copying
//! their weights; [`runtime`] loads ONNX Runtime and runs sessions;
//! [`text`] turns prompts into token ids; [`edit`] computes TIME's edit
//! operator from text embeddings; [`staged`] makes every output file appear
//! whole or not at all.

#![deny(missing_docs)]

pub mod edit;
pub mod eval;
pub mod onnx;
pub mod pipeline;
pub mod runtime;
pub mod staged;
pub mod text;
pub mod unet;
pub mod workflow;
