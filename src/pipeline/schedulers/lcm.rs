//! The latent consistency model sampler (Luo et al. 2023; diffusers'
//! `LCMScheduler`): each call maps the sample straight to a clean estimate
//! through the consistency function's boundary conditions, then, except
//! after the last call, noises it again to the next timestep. Stochastic:
//! one noise draw per call but the last.
//!
//! Timesteps: the distillation schedule `k·i − 1` (i = 1 … O, k = T // O,
//! O = `original_inference_steps`), reversed, `steps` of them taken at
//! indices ⌊linspace(0, O, steps, endpoint=False)⌋. `timestep_spacing` and
//! `steps_offset` do not enter (diffusers ignores them for this class).
//!
//! With s = t·`timestep_scaling` and σ_data = 0.5:
//! c_skip = σ_data²/(s² + σ_data²), c_out = s/√(s² + σ_data²),
//! x̂₀ from ε (or v, or x₀), optionally clipped; d = c_out·x̂₀ + c_skip·x;
//! x' = √ᾱ_next·d + √(1 − ᾱ_next)·z, or x' = d after the last call.

use ndarray::{ArrayD, Zip};

use super::plan::{Call, Plan, Rule, Scheduler, draw_noise};
use super::schedule::NoiseSchedule;
use super::{PredictionType, SchedulerError, SchedulerKind, Settings};

/// The consistency models' data standard deviation (diffusers' `sigma_data`).
const SIGMA_DATA: f32 = 0.5;

/// LCM's update; its per-call constants fixed at build time.
#[derive(Debug)]
pub(super) struct Lcm {
    /// Per call: (ᾱ at t, ᾱ at the next timestep, or at t after the last).
    alphas: Vec<(f32, f32)>,
    /// Per call: (c_skip, c_out).
    boundary: Vec<(f32, f32)>,
    prediction: PredictionType,
    clip_sample: Option<f64>,
}

/// The timesteps of `steps` LCM steps out of an `original`-step
/// distillation schedule over `train` training timesteps, in call order.
pub(super) fn lcm_timesteps(
    train: usize,
    original: usize,
    steps: usize,
) -> Result<Vec<i64>, SchedulerError> {
    if original == 0 || original > train {
        return Err(SchedulerError::InvalidValue {
            class: SchedulerKind::Lcm.class_name(),
            key: "original_inference_steps",
            value: original.to_string(),
            expected: format!("1 to num_train_timesteps ({train})"),
        });
    }
    if steps > original {
        return Err(SchedulerError::LcmSteps { steps, original });
    }
    let k = (train / original) as i64;
    // numpy: floor(linspace(0, O, steps, endpoint=False)) = floor(i·O/steps)
    let origin: Vec<i64> = (1..=original as i64).rev().map(|i| i * k - 1).collect();
    Ok((0..steps)
        .map(|i| {
            let index = (i as f64 * (original as f64 / steps as f64)).floor() as usize;
            origin[index.min(original - 1)]
        })
        .collect())
}

/// LCM for `steps` steps.
pub(super) fn new(settings: &Settings, steps: usize) -> Result<Scheduler, SchedulerError> {
    let schedule = NoiseSchedule::for_alphas(settings)?;
    let timesteps = lcm_timesteps(
        settings.num_train_timesteps,
        settings.lcm.original_inference_steps,
        steps,
    )?;
    let alpha = |t: i64| schedule.alpha_cumprod(t).map(|a| a as f32);
    let mut alphas = Vec::with_capacity(timesteps.len());
    let mut boundary = Vec::with_capacity(timesteps.len());
    for (i, &t) in timesteps.iter().enumerate() {
        let next = timesteps.get(i + 1).copied().unwrap_or(t);
        let a_next = if next >= 0 {
            alpha(next)?
        } else if settings.set_alpha_to_one {
            1.0
        } else {
            alpha(0)?
        };
        alphas.push((alpha(t)?, a_next));
        // float32 as torch computes it from the int64 timestep
        let s = t as f32 * settings.lcm.timestep_scaling as f32;
        let d2 = SIGMA_DATA * SIGMA_DATA;
        boundary.push((d2 / (s * s + d2), s / (s * s + d2).sqrt()));
    }
    let plan = Plan::on_alphas(&timesteps);
    let rule = Lcm {
        alphas,
        boundary,
        prediction: settings.prediction_type,
        clip_sample: settings.clip_sample,
    };
    Ok(Scheduler::new(SchedulerKind::Lcm, plan, rule))
}

impl Rule for Lcm {
    fn step(&mut self, plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError> {
        let (a_t, a_next) = self.alphas[call.index];
        let (c_skip, c_out) = self.boundary[call.index];
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let mut x0 = match self.prediction {
            PredictionType::Epsilon => Zip::from(&call.sample)
                .and(&call.model_output)
                .map_collect(|&x, &e| (x - sb * e) / sa),
            PredictionType::Sample => call.model_output.to_owned(),
            PredictionType::VPrediction => Zip::from(&call.sample)
                .and(&call.model_output)
                .map_collect(|&x, &v| sa * x - sb * v),
        };
        if let Some(range) = self.clip_sample {
            let r = range as f32;
            x0.mapv_inplace(|v| v.clamp(-r, r));
        }
        let mut denoised = Zip::from(&x0)
            .and(&call.sample)
            .map_collect(|&x0, &x| c_out * x0 + c_skip * x);
        if call.index + 1 < plan.timesteps.len() {
            let z = draw_noise(call.noise, call.sample.shape())?;
            let (sa, sb) = (a_next.sqrt(), (1.0 - a_next).sqrt());
            Zip::from(&mut denoised)
                .and(&z)
                .for_each(|d, &z| *d = sa * *d + sb * z);
        }
        Ok(denoised)
    }
}

#[cfg(test)]
mod tests {
    use super::lcm_timesteps;

    #[test]
    fn timesteps_are_taken_from_the_distillation_schedule() {
        // diffusers: LCMScheduler().set_timesteps(4) → [999, 759, 499, 259]
        assert_eq!(
            lcm_timesteps(1000, 50, 4).unwrap(),
            vec![999, 759, 499, 259]
        );
        assert_eq!(lcm_timesteps(1000, 50, 1).unwrap(), vec![999]);
        assert!(lcm_timesteps(1000, 50, 51).is_err());
        assert!(lcm_timesteps(1000, 0, 1).is_err());
    }
}
