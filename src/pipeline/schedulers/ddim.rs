//! DDIM (Song et al. 2021) with η: η = 0 is the deterministic sampler, η = 1
//! matches DDPM's posterior variance. One UNet call per step.
//!
//! x̂₀ = (x − √(1−ᾱt)·ε)/√ᾱt (optionally clipped), σ = η·√((1−ᾱp)/(1−ᾱt)·(1−ᾱt/ᾱp)),
//! x' = √ᾱp·x̂₀ + √(1−ᾱp−σ²)·ε + σ·z, with t_prev = t − T//N (whatever the
//! spacing, as diffusers does) and ᾱp = ᾱ₀ (or 1 with `set_alpha_to_one`)
//! below 0. z is drawn from the caller's noise source only when η > 0.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::schedule::{NoiseSchedule, TimestepSpacing, spaced_timesteps};
use super::{
    Calls, PredictionType, Scheduler, SchedulerError, SchedulerKind, Settings, draw_noise,
};

/// DDIM state for one run (stateless between calls apart from the order check).
#[derive(Debug)]
pub struct Ddim {
    timesteps: Vec<f64>,
    /// ᾱ at (t, t_prev) for each call, checked at build time.
    alphas: Vec<(f64, f64)>,
    prediction: PredictionType,
    clip_sample: Option<f64>,
    eta: f64,
    calls: Calls,
}

impl Ddim {
    /// DDIM for `steps` steps with η = `eta` (checked by the caller to be in [0, 1]).
    pub fn new(settings: &Settings, steps: usize, eta: f64) -> Result<Self, SchedulerError> {
        let schedule = NoiseSchedule::for_alphas(settings)?;
        let t_count = settings.num_train_timesteps;
        let timesteps: Vec<i64> = spaced_timesteps(
            settings.timestep_spacing,
            t_count,
            steps,
            settings.steps_offset,
        )
        .into_iter()
        .map(|t| match settings.timestep_spacing {
            TimestepSpacing::Linspace => t.round_ties_even() as i64,
            TimestepSpacing::Leading | TimestepSpacing::Trailing => t as i64,
        })
        .collect();
        let delta = (t_count / steps) as i64;
        let final_alpha = if settings.set_alpha_to_one {
            1.0
        } else {
            schedule.alpha_cumprod(0)?
        };
        let alphas = timesteps
            .iter()
            .map(|&t| {
                let a_t = schedule.alpha_cumprod(t)?;
                let prev = t.saturating_sub(delta);
                let a_prev = if prev >= 0 {
                    schedule.alpha_cumprod(prev)?
                } else {
                    final_alpha
                };
                Ok((a_t, a_prev))
            })
            .collect::<Result<Vec<_>, SchedulerError>>()?;
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            alphas,
            prediction: settings.prediction_type,
            clip_sample: settings.clip_sample,
            eta,
            calls: Calls::new(timesteps.len()),
        })
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        call: usize,
        sample: ArrayViewD<'_, f32>,
        noise: &mut dyn FnMut(&[usize]) -> ArrayD<f32>,
    ) -> Result<ArrayD<f32>, SchedulerError> {
        self.calls.begin(call, &model_output, &sample)?;
        let (a_t, a_prev) = self.alphas[call];
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt() as f32, b_t.sqrt() as f32);

        // (x̂₀, ε̂) from the model output
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                Zip::from(&sample)
                    .and(&model_output)
                    .map_collect(|&x, &e| (x - sb * e) / sa),
                model_output.to_owned(),
            ),
            PredictionType::Sample => (
                model_output.to_owned(),
                Zip::from(&sample)
                    .and(&model_output)
                    .map_collect(|&x, &x0| (x - sa * x0) / sb),
            ),
            PredictionType::VPrediction => (
                Zip::from(&sample)
                    .and(&model_output)
                    .map_collect(|&x, &v| sa * x - sb * v),
                Zip::from(&sample)
                    .and(&model_output)
                    .map_collect(|&x, &v| sa * v + sb * x),
            ),
        };
        if let Some(range) = self.clip_sample {
            let r = range as f32;
            x0.mapv_inplace(|v| v.clamp(-r, r));
        }

        let variance = ((1.0 - a_prev) / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        // ≥ 0 in exact arithmetic for η ≤ 1; clamp the rounding.
        let dir_coeff = (1.0 - a_prev - std_dev * std_dev).max(0.0).sqrt() as f32;
        let x0_coeff = a_prev.sqrt() as f32;
        let mut prev = Zip::from(&x0)
            .and(&eps)
            .map_collect(|&x0, &e| x0_coeff * x0 + dir_coeff * e);
        if self.eta > 0.0 {
            let z = draw_noise(noise, sample.shape())?;
            let s = std_dev as f32;
            Zip::from(&mut prev).and(&z).for_each(|p, &z| *p += s * z);
        }
        self.calls.finish();
        Ok(prev)
    }
}
