//! Euler (Karras et al. 2022, Algorithm 2 without churn): the probability-flow
//! ODE in σ, one UNet call per step.
//!
//! σ(t) is the training σ interpolated at each (possibly fractional)
//! timestep, then σ_final (0 or σ_min) appended. The UNet sees x/√(σ² + 1);
//! the update is x' = x + (x − x̂₀)/σ · (σ_next − σ). diffusers' `s_churn`
//! (off by default) is not offered.

use ndarray::ArrayD;

use super::plan::{
    Call, Plan, Rule, Scheduler, euler_update, final_sigma_value, interpolated_sigmas, sigma_plan,
    sigma_x0,
};
use super::schedule::NoiseSchedule;
use super::{
    InterpolationType, PredictionType, SchedulerError, SchedulerKind, Settings, TimestepType,
};

/// Euler's update; the plan holds the σ.
#[derive(Debug)]
pub(super) struct Euler {
    prediction: PredictionType,
}

/// Euler for `steps` steps.
pub(super) fn new(settings: &Settings, steps: usize) -> Result<Scheduler, SchedulerError> {
    let mut plan = interpolated_sigmas(settings, steps, settings.final_sigmas_type)?;
    if settings.interpolation_type == InterpolationType::LogLinear {
        // diffusers: N+1 σ log-spaced from σ_max to σ_min (float32
        // torch.linspace of float32 logs), then σ_final: the last step
        // lands on σ_min and the final σ is never reached.
        let table = NoiseSchedule::for_sigmas(settings)?.train_sigmas();
        let (Some(&lo), Some(&hi)) = (table.first(), table.last()) else {
            return Err(SchedulerError::Steps {
                steps,
                num_train_timesteps: table.len(),
            });
        };
        let (a, b) = (hi.ln(), lo.ln());
        let step = (b - a) / steps as f32;
        let half = steps.div_ceil(2); // torch: (N + 1) points, halfway (N + 1) / 2
        let mut sigmas: Vec<f64> = (0..=steps)
            .map(|i| {
                let l = if i < half {
                    a + step * i as f32
                } else {
                    b - step * (steps - i) as f32
                };
                f64::from(l.exp())
            })
            .collect();
        sigmas.push(final_sigma_value(&table, settings.final_sigmas_type));
        plan = sigma_plan(settings, plan.timesteps, sigmas);
    }
    if settings.timestep_type == TimestepType::Continuous
        && settings.prediction_type == PredictionType::VPrediction
    {
        let n = plan.timesteps.len();
        plan.timesteps = (0..n)
            .map(|k| f64::from(0.25 * (plan.sigma(k) as f32).ln()))
            .collect();
    }
    let prediction = settings.prediction_type;
    Ok(Scheduler::new(
        SchedulerKind::Euler,
        plan,
        Euler { prediction },
    ))
}

impl Rule for Euler {
    fn step(&mut self, plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError> {
        let sigma = plan.sigma(call.index);
        let x0 = sigma_x0(self.prediction, &call.model_output, &call.sample, sigma);
        let dt = (plan.sigma(call.index + 1) as f32) - sigma as f32;
        Ok(euler_update(&call.sample, &x0, sigma, dt))
    }
}
