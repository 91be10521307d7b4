//! Euler ancestral (k-diffusion's `sample_euler_ancestral`, η = 1): an Euler
//! step down to σ_down, then fresh noise of scale σ_up, so that the marginal
//! at σ_next is right. Stochastic: one noise draw per call, every call
//! (the last one too, where σ_up = 0), as diffusers draws it.
//!
//! σ_up = √(σ_next²(σ² − σ_next²)/σ²), σ_down = √(σ_next² − σ_up²),
//! x' = x + (x − x̂₀)/σ · (σ_down − σ) + σ_up·z.

use ndarray::{ArrayD, Zip};

use super::plan::{
    Call, Plan, Rule, Scheduler, draw_noise, euler_update, interpolated_sigmas, sigma_x0,
};
use super::{FinalSigmas, PredictionType, SchedulerError, SchedulerKind, Settings};

/// Euler ancestral's update; the plan holds the σ.
#[derive(Debug)]
pub(super) struct EulerAncestral {
    prediction: PredictionType,
}

/// Euler ancestral for `steps` steps (the class has no `final_sigmas_type`:
/// the last σ is 0).
pub(super) fn new(settings: &Settings, steps: usize) -> Result<Scheduler, SchedulerError> {
    let plan = interpolated_sigmas(settings, steps, FinalSigmas::Zero)?;
    let prediction = settings.prediction_type;
    Ok(Scheduler::new(
        SchedulerKind::EulerAncestral,
        plan,
        EulerAncestral { prediction },
    ))
}

impl Rule for EulerAncestral {
    fn step(&mut self, plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError> {
        let (from, to) = (plan.sigma(call.index), plan.sigma(call.index + 1));
        let x0 = sigma_x0(self.prediction, &call.model_output, &call.sample, from);
        let up = (to * to * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        let mut prev = euler_update(&call.sample, &x0, from, (down - from) as f32);
        let z = draw_noise(call.noise, call.sample.shape())?;
        let up = up as f32;
        Zip::from(&mut prev).and(&z).for_each(|p, &z| *p += z * up);
        Ok(prev)
    }
}
