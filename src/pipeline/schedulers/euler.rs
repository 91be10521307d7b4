//! Euler (Karras et al. 2022, Algorithm 2 without churn): the probability-flow
//! ODE in σ, one UNet call per step.
//!
//! σ(t) is the training σ interpolated at each (possibly fractional)
//! timestep, then σ_final (0 or σ_min) appended. The UNet sees x/√(σ² + 1);
//! the update is x' = x + (x − x̂₀)/σ · (σ_next − σ). diffusers' `s_churn`
//! (off by default) is not offered.

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::schedule::{NoiseSchedule, TimestepSpacing, interp, spaced_timesteps};
use super::{
    Calls, FinalSigmas, InterpolationType, PredictionType, Scheduler, SchedulerError,
    SchedulerKind, Settings, TimestepType, sigma_x0,
};

/// Euler state for one run.
#[derive(Debug)]
pub struct Euler {
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    calls: Calls,
}

/// The σ-schedulers' shared set-up: float32 timesteps (as f64), σ per call
/// plus the final σ (float32 values), and the initial noise σ.
#[derive(Debug)]
pub(super) struct SigmaSchedule {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
    pub init_noise_sigma: f64,
}

impl SigmaSchedule {
    /// Euler ancestral's and LMS's schedule (and Euler's with its defaults):
    /// timesteps from the spacing (float32), σ interpolated linearly, `final`
    /// appended.
    pub fn interpolated(
        settings: &Settings,
        steps: usize,
        final_sigma: FinalSigmas,
    ) -> Result<Self, SchedulerError> {
        let schedule = NoiseSchedule::for_sigmas(settings)?;
        let table = schedule.train_sigmas();
        let timesteps: Vec<f64> = spaced_timesteps(
            settings.timestep_spacing,
            settings.num_train_timesteps,
            steps,
            settings.steps_offset,
        )
        .into_iter()
        .map(|t| f64::from(t as f32))
        .collect();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| f64::from(interp(t, &table) as f32))
            .collect();
        sigmas.push(final_sigma_value(&table, final_sigma));
        Ok(Self::finish(settings, timesteps, sigmas))
    }

    /// Initial noise σ from the schedule: σ_max for `linspace`/`trailing`,
    /// √(σ_max² + 1) for `leading` (float32 like diffusers' tensor maths).
    fn finish(settings: &Settings, timesteps: Vec<f64>, sigmas: Vec<f64>) -> Self {
        let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
        let init_noise_sigma = match settings.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
            TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
        };
        Self {
            timesteps,
            sigmas,
            init_noise_sigma,
        }
    }
}

/// σ after the last step: 0, or the training σ at timestep 0.
fn final_sigma_value(table: &[f32], final_sigma: FinalSigmas) -> f64 {
    match final_sigma {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => table.first().map_or(0.0, |&s| f64::from(s)),
    }
}

impl Euler {
    /// Euler for `steps` steps.
    pub fn new(settings: &Settings, steps: usize) -> Result<Self, SchedulerError> {
        let mut plan = SigmaSchedule::interpolated(settings, steps, settings.final_sigmas_type)?;
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
            plan = SigmaSchedule::finish(settings, plan.timesteps, sigmas);
        }
        if settings.timestep_type == TimestepType::Continuous
            && settings.prediction_type == PredictionType::VPrediction
        {
            let n = plan.timesteps.len();
            plan.timesteps = plan.sigmas[..n]
                .iter()
                .map(|&s| f64::from(0.25 * (s as f32).ln()))
                .collect();
        }
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

impl Scheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
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
        _noise: &mut dyn FnMut(&[usize]) -> ArrayD<f32>,
    ) -> Result<ArrayD<f32>, SchedulerError> {
        self.calls.begin(call, &model_output, &sample)?;
        let sigma = self.sigmas[call];
        let x0 = sigma_x0(self.prediction, &model_output, &sample, sigma);
        let s = sigma as f32;
        let dt = (self.sigmas[call + 1] as f32) - s;
        let prev = Zip::from(&sample)
            .and(&x0)
            .map_collect(|&x, &x0| x + (x - x0) / s * dt);
        self.calls.finish();
        Ok(prev)
    }
}
