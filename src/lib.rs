//! time-onnx: TIME (Orgad, Kawar, Belinkov, ICCV 2023) applied directly to
//! Stable Diffusion ONNX exports, and a runner for the edited models.
//!
//! The modules follow the data: [`onnx`] reads model files without copying
//! their weights; [`runtime`] loads ONNX Runtime and runs sessions.

#![deny(missing_docs)]

pub mod onnx;
pub mod runtime;
