//! The denoising loop: latents, a scheduler and the UNet, with
//! classifier-free guidance, as diffusers' pipelines run it.
//!
//! ```text
//! x = latents · init_noise_sigma                                  [n, 4, h, w] f32
//! for each UNet call k:
//!     input = scale_model_input(x, k)                             [n, 4, h, w]
//!     ε = unet([input; input], t_k)   (guided: [uncond × n, cond × n])
//!     ε = ε_u + g·(ε_c − ε_u)         (guided)
//!     x = step(ε, k, x, noise)
//! ```

use ndarray::{ArrayD, Axis, concatenate};

use super::conditioning::TextBatch;
use super::rng::Rng;
use super::schedulers::{Scheduler, SchedulerError};
use super::unet::Unet;
use crate::runtime::SessionError;

/// Everything that can stop the loop.
#[derive(Debug, thiserror::Error)]
pub enum DenoiseError {
    /// The UNet failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The scheduler refused a step.
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    /// Arrays whose shapes do not fit together.
    #[error("{what}: {why}")]
    Shape {
        /// Which array.
        what: &'static str,
        /// ndarray's report.
        why: String,
    },
}

/// Classifier-free guidance scale: on when > 1, as in diffusers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Guidance(pub f64);

impl Guidance {
    /// Whether the unconditional half runs at all.
    pub fn is_on(self) -> bool {
        self.0 > 1.0
    }

    /// UNet batch rows for `n` images: 2n guided, n otherwise.
    pub fn rows(self, n: usize) -> usize {
        if self.is_on() { 2 * n } else { n }
    }

    /// Which row of `[negative, prompt]` each UNet batch row of `n` images
    /// reads: `[0 × n, 1 × n]` guided (unconditional half first), `[1 × n]`
    /// otherwise.
    pub fn text_rows(self, n: usize) -> Vec<usize> {
        if self.is_on() {
            [vec![0; n], vec![1; n]].concat()
        } else {
            vec![1; n]
        }
    }
}

/// Denoises `latents: [n, 4, h, w] f32` (unscaled N(0, 1) draws) with the UNet
/// bound to `batch` (its rows as [`Guidance::text_rows`] orders them);
/// returns the final latents, same shape. `rng` gives the noise of stochastic schedulers;
/// `progress(call, calls)` is told after every UNet call.
pub fn denoise(
    unet: &mut Unet,
    scheduler: &mut Scheduler,
    batch: &TextBatch,
    latents: ArrayD<f32>,
    guidance: Guidance,
    rng: &mut Rng,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ArrayD<f32>, DenoiseError> {
    let shape = |what: &'static str| {
        move |e: ndarray::ShapeError| DenoiseError::Shape {
            what,
            why: e.to_string(),
        }
    };
    let n = latents.shape()[0];
    let mut x: ArrayD<f32> = latents.mapv(|v| v * scheduler.init_noise_sigma() as f32);
    let timesteps = scheduler.timesteps().to_vec();
    unet.bind(batch)?;
    for (call, &t) in timesteps.iter().enumerate() {
        let input = scheduler.scale_model_input(x.view(), call)?;
        let batch = if guidance.is_on() {
            concatenate(Axis(0), &[input.view(), input.view()]).map_err(shape("UNet batch"))?
        } else {
            input
        };
        let batch = batch.into_dimensionality().map_err(shape("UNet batch"))?;
        let eps = unet.predict(batch.view(), t)?.into_dyn();
        let eps = if guidance.is_on() {
            let (u, c) = eps.view().split_at(Axis(0), n);
            &u + &((&c - &u) * guidance.0 as f32)
        } else {
            eps
        };
        x = scheduler.step(eps.view(), call, x.view(), &mut |s: &[usize]| rng.randn(s))?;
        progress(call + 1, timesteps.len());
    }
    Ok(x)
}
