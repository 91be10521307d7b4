//! DDIM (Song et al. 2021) with η: η = 0 is the deterministic sampler, η = 1
//! matches DDPM's posterior variance. One UNet call per step.
//!
//! x̂₀ = (x − √(1−ᾱt)·ε)/√ᾱt (optionally clipped), σ = η·√((1−ᾱp)/(1−ᾱt)·(1−ᾱt/ᾱp)),
//! x' = √ᾱp·x̂₀ + √(1−ᾱp−σ²)·ε + σ·z, with t_prev = t − T//N (whatever the
//! spacing, as diffusers does) and ᾱp = ᾱ₀ (or 1 with `set_alpha_to_one`)
//! below 0. z is drawn from the caller's noise source only when η > 0.

use ndarray::{ArrayD, Zip};

use super::plan::{Call, Plan, Rule, Scheduler, draw_noise};
use super::schedule::{NoiseSchedule, integer_timesteps};
use super::{PredictionType, SchedulerError, SchedulerKind, Settings};

/// DDIM's update (stateless between calls).
#[derive(Debug)]
pub(super) struct Ddim {
    /// ᾱ at (t, t_prev) for each call, checked at build time.
    alphas: Vec<(f64, f64)>,
    prediction: PredictionType,
    clip_sample: Option<f64>,
    eta: f64,
}

/// DDIM for `steps` steps with η = `eta` (checked by the caller to be in [0, 1]).
pub(super) fn new(
    settings: &Settings,
    steps: usize,
    eta: f64,
) -> Result<Scheduler, SchedulerError> {
    let schedule = NoiseSchedule::for_alphas(settings)?;
    let timesteps = integer_timesteps(settings, steps);
    let delta = (settings.num_train_timesteps / steps) as i64;
    let steps = timesteps.iter().map(|&t| (t, t.saturating_sub(delta)));
    let alphas = schedule.alpha_pairs(settings, steps)?;
    let plan = Plan::on_alphas(&timesteps);
    let rule = Ddim {
        alphas,
        prediction: settings.prediction_type,
        clip_sample: settings.clip_sample,
        eta,
    };
    Ok(Scheduler::new(SchedulerKind::Ddim, plan, rule))
}

impl Rule for Ddim {
    fn step(&mut self, _plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError> {
        let (a_t, a_prev) = self.alphas[call.index];
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt() as f32, b_t.sqrt() as f32);

        // (x̂₀, ε̂) from the model output
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                Zip::from(&call.sample)
                    .and(&call.model_output)
                    .map_collect(|&x, &e| (x - sb * e) / sa),
                call.model_output.to_owned(),
            ),
            PredictionType::Sample => (
                call.model_output.to_owned(),
                Zip::from(&call.sample)
                    .and(&call.model_output)
                    .map_collect(|&x, &x0| (x - sa * x0) / sb),
            ),
            PredictionType::VPrediction => (
                Zip::from(&call.sample)
                    .and(&call.model_output)
                    .map_collect(|&x, &v| sa * x - sb * v),
                Zip::from(&call.sample)
                    .and(&call.model_output)
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
            let z = draw_noise(call.noise, call.sample.shape())?;
            let s = std_dev as f32;
            Zip::from(&mut prev).and(&z).for_each(|p, &z| *p += s * z);
        }
        Ok(prev)
    }
}
