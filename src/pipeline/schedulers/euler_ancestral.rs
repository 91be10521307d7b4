//! Euler ancestral (k-diffusion's `sample_euler_ancestral`, η = 1): an Euler
//! step down to σ_down, then fresh noise of scale σ_up, so that the marginal
//! at σ_next is right. Stochastic: one noise draw per call, every call
//! (the last one too, where σ_up = 0), as diffusers draws it.
//!
//! σ_up = √(σ_next²(σ² − σ_next²)/σ²), σ_down = √(σ_next² − σ_up²),
//! x' = x + (x − x̂₀)/σ · (σ_down − σ) + σ_up·z.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::euler::SigmaSchedule;
use super::{
    Calls, FinalSigmas, PredictionType, Scheduler, SchedulerError, SchedulerKind, Settings,
    draw_noise, sigma_x0,
};

/// Euler ancestral state for one run.
#[derive(Debug)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    calls: Calls,
}

impl EulerAncestral {
    /// Euler ancestral for `steps` steps (the class has no `final_sigmas_type`:
    /// the last σ is 0).
    pub fn new(settings: &Settings, steps: usize) -> Result<Self, SchedulerError> {
        let plan = SigmaSchedule::interpolated(settings, steps, FinalSigmas::Zero)?;
        let calls = Calls::new(plan.timesteps.len());
        Ok(Self {
            timesteps: plan.timesteps,
            sigmas: plan.sigmas,
            init_noise_sigma: plan.init_noise_sigma,
            prediction: settings.prediction_type,
            calls,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn input_sigma(&self, call: usize) -> Option<f64> {
        Some(self.sigmas[call])
    }

    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        call: usize,
        sample: ArrayViewD<'_, f32>,
        noise: &mut dyn FnMut(&[usize]) -> ArrayD<f32>,
    ) -> Result<ArrayD<f32>, SchedulerError> {
        self.calls.begin(call, &model_output, &sample)?;
        let (from, to) = (self.sigmas[call], self.sigmas[call + 1]);
        let x0 = sigma_x0(self.prediction, &model_output, &sample, from);
        let up = (to * to * (from * from - to * to) / (from * from))
            .max(0.0)
            .sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        let s = from as f32;
        let dt = (down - from) as f32;
        let mut prev = Zip::from(&sample)
            .and(&x0)
            .map_collect(|&x, &x0| x + (x - x0) / s * dt);
        let z = draw_noise(noise, sample.shape())?;
        let up = up as f32;
        Zip::from(&mut prev).and(&z).for_each(|p, &z| *p += z * up);
        self.calls.finish();
        Ok(prev)
    }
}
