//! What every scheduler shares: the plan fixed when it is built (timesteps,
//! σ, the initial noise scale), the bookkeeping of calls, and the σ
//! arithmetic of the σ-parameterised schedulers. A [`Scheduler`] is a plan
//! and the [`Rule`] of one class, which holds only its update and the
//! history it needs.

use std::fmt;

use ndarray::{ArrayD, ArrayViewD, Zip};

use super::schedule::{NoiseSchedule, TimestepSpacing, interp, spaced_timesteps};
use super::{FinalSigmas, PredictionType, SchedulerError, SchedulerKind, Settings};

/// What a scheduler fixes when it is built.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    /// UNet timesteps in call order (float32 values as f64 for the σ
    /// schedulers, integers otherwise).
    pub timesteps: Vec<f64>,
    /// σ per call plus the final σ (float32 values), for the σ schedulers.
    pub sigmas: Option<Vec<f64>>,
    /// Standard deviation of the initial latents.
    pub init_noise_sigma: f64,
    /// Whether the UNet input is x/√(σ² + 1) (Euler, Euler ancestral, LMS)
    /// rather than x itself.
    pub scales_input: bool,
}

impl Plan {
    /// A plan on ᾱ alone (PNDM, DDIM) for integer timesteps: no σ, the
    /// sample fed as is.
    pub fn on_alphas(timesteps: &[i64]) -> Self {
        Self {
            timesteps: timesteps.iter().map(|&t| t as f64).collect(),
            sigmas: None,
            init_noise_sigma: 1.0,
            scales_input: false,
        }
    }

    /// σ of call `call` (and `call + 1` for the next); 0 past the end.
    pub fn sigma(&self, call: usize) -> f64 {
        self.sigmas
            .as_ref()
            .and_then(|s| s.get(call).copied())
            .unwrap_or(0.0)
    }
}

/// One UNet call's inputs to an update, checked: `call` is the next call,
/// `model_output` is shaped like `sample` (`[b, c, h, w] f32`).
pub(super) struct Call<'a, 'n> {
    /// Which UNet call this update follows.
    pub index: usize,
    /// The guided ε, v or x₀ prediction.
    pub model_output: ArrayViewD<'a, f32>,
    /// The sample the UNet saw (before input scaling).
    pub sample: ArrayViewD<'a, f32>,
    /// N(0, 1) noise of a shape, for the stochastic schedulers.
    pub noise: &'n mut dyn FnMut(&[usize]) -> ArrayD<f32>,
}

/// One scheduler's update: what differs between schedulers.
pub(super) trait Rule: Send + fmt::Debug {
    /// The next sample after `call`, shaped like its sample.
    fn step(&mut self, plan: &Plan, call: Call<'_, '_>) -> Result<ArrayD<f32>, SchedulerError>;
}

/// One denoising update rule, set up for a fixed number of steps: a plan
/// and the rule of one scheduler class.
///
/// Calls must come in order 0, 1, 2, … (multistep schedulers keep history);
/// build a new scheduler to start over.
#[derive(Debug)]
pub struct Scheduler {
    kind: SchedulerKind,
    plan: Plan,
    rule: Box<dyn Rule>,
    next: usize,
}

impl Scheduler {
    pub(super) fn new(kind: SchedulerKind, plan: Plan, rule: impl Rule + 'static) -> Self {
        Self {
            kind,
            plan,
            rule: Box::new(rule),
            next: 0,
        }
    }

    /// Which scheduler this is.
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// UNet timesteps, one per UNet call, in call order (PNDM: N+1 calls for
    /// N steps). Integer-valued for PNDM, DDIM and DPM-Solver; float32 values
    /// for Euler, Euler ancestral and LMS (e.g. 499.5), fed to the UNet as is.
    pub fn timesteps(&self) -> &[f64] {
        &self.plan.timesteps
    }

    /// The σ of each call plus the final σ (`timesteps().len() + 1` values,
    /// float32 values as diffusers' `sigmas`), for the σ-parameterised
    /// schedulers (Euler, Euler ancestral, LMS, DPM-Solver); `None` for PNDM and
    /// DDIM, which work with ᾱ directly.
    pub fn sigmas(&self) -> Option<&[f64]> {
        self.plan.sigmas.as_deref()
    }

    /// Standard deviation of the initial latents: multiply N(0, 1) noise by it
    /// (1 for PNDM, DDIM and DPM-Solver; σ_max, or √(σ_max² + 1) with
    /// `leading` spacing, for Euler, Euler ancestral and LMS).
    pub fn init_noise_sigma(&self) -> f64 {
        self.plan.init_noise_sigma
    }

    /// The σ that scales the UNet input of call `call` (Euler, Euler
    /// ancestral, LMS); `None` when the input is the sample itself.
    pub fn input_sigma(&self, call: usize) -> Option<f64> {
        self.plan
            .scales_input
            .then(|| self.plan.sigma(call))
            .filter(|_| call < self.plan.timesteps.len())
    }

    /// The UNet input for call `call`: `sample` `[b, c, h, w] f32` scaled as the
    /// scheduler needs (x/√(σ² + 1) for Euler, Euler ancestral and LMS; a copy
    /// otherwise). Same shape and dtype as `sample`.
    pub fn scale_model_input(
        &self,
        sample: ArrayViewD<'_, f32>,
        call: usize,
    ) -> Result<ArrayD<f32>, SchedulerError> {
        self.plan.check_call(call)?;
        Ok(match self.input_sigma(call) {
            Some(sigma) => scale_by_sigma(sample, sigma),
            None => sample.to_owned(),
        })
    }

    /// One update after UNet call `call`: `model_output` (the guided ε, v or
    /// x₀ prediction, per `prediction_type`) and `sample` are `[b, c, h, w] f32`
    /// of one shape; returns the next sample, same shape, f32. `noise(shape)`
    /// must return N(0, 1) noise of that shape `f32`; only stochastic
    /// schedulers (DDIM with η > 0, Euler ancestral) call it, once per call.
    pub fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        call: usize,
        sample: ArrayViewD<'_, f32>,
        noise: &mut dyn FnMut(&[usize]) -> ArrayD<f32>,
    ) -> Result<ArrayD<f32>, SchedulerError> {
        self.plan.check_call(call)?;
        if call != self.next {
            return Err(SchedulerError::OutOfOrder {
                expected: self.next,
                got: call,
            });
        }
        same_shape("model_output", sample.shape(), model_output.shape())?;
        let call = Call {
            index: call,
            model_output,
            sample,
            noise,
        };
        let out = self.rule.step(&self.plan, call)?;
        self.next += 1;
        Ok(out)
    }
}

impl Plan {
    fn check_call(&self, call: usize) -> Result<(), SchedulerError> {
        let calls = self.timesteps.len();
        if call >= calls {
            return Err(SchedulerError::CallOutOfRange { call, calls });
        }
        Ok(())
    }
}

fn same_shape(
    what: &'static str,
    expected: &[usize],
    actual: &[usize],
) -> Result<(), SchedulerError> {
    if expected != actual {
        return Err(SchedulerError::Shape {
            what,
            expected: expected.to_vec(),
            actual: actual.to_vec(),
        });
    }
    Ok(())
}

/// Draws noise shaped like `sample` and checks the noise source kept to it.
pub(super) fn draw_noise(
    noise: &mut dyn FnMut(&[usize]) -> ArrayD<f32>,
    shape: &[usize],
) -> Result<ArrayD<f32>, SchedulerError> {
    let z = noise(shape);
    same_shape("noise", shape, z.shape())?;
    Ok(z)
}

/// The plan of Euler ancestral and LMS (and Euler's with its defaults):
/// timesteps from the spacing (float32), σ interpolated linearly in the
/// training σ, `final_sigma` appended, the UNet input scaled.
pub(super) fn interpolated_sigmas(
    settings: &Settings,
    steps: usize,
    final_sigma: FinalSigmas,
) -> Result<Plan, SchedulerError> {
    let table = NoiseSchedule::for_sigmas(settings)?.train_sigmas();
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
    Ok(sigma_plan(settings, timesteps, sigmas))
}

/// A σ plan with the initial noise σ from the schedule: σ_max for
/// `linspace`/`trailing`, √(σ_max² + 1) for `leading` (float32 like
/// diffusers' tensor maths).
pub(super) fn sigma_plan(settings: &Settings, timesteps: Vec<f64>, sigmas: Vec<f64>) -> Plan {
    let max = sigmas.iter().copied().fold(f64::NEG_INFINITY, f64::max) as f32;
    let init_noise_sigma = match settings.timestep_spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
        TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
    };
    Plan {
        timesteps,
        sigmas: Some(sigmas),
        init_noise_sigma,
        scales_input: true,
    }
}

/// σ after the last step: 0, or the training σ at timestep 0.
pub(super) fn final_sigma_value(table: &[f32], final_sigma: FinalSigmas) -> f64 {
    match final_sigma {
        FinalSigmas::Zero => 0.0,
        FinalSigmas::SigmaMin => table.first().map_or(0.0, |&s| f64::from(s)),
    }
}

/// x/√(σ² + 1), the UNet input of the σ-parameterised schedulers (float32
/// like diffusers: the divisor is rounded to f32 first).
pub(super) fn scale_by_sigma(sample: ArrayViewD<'_, f32>, sigma: f64) -> ArrayD<f32> {
    let s = sigma as f32;
    let d = (s * s + 1.0).sqrt();
    sample.mapv(|x| x / d)
}

/// x₀ predicted from the model output at noise level σ (x = x₀ + σε
/// parameterisation), float32 as diffusers' Euler and LMS compute it.
pub(super) fn sigma_x0(
    prediction: PredictionType,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayViewD<'_, f32>,
    sigma: f64,
) -> ArrayD<f32> {
    let s = sigma as f32;
    match prediction {
        PredictionType::Epsilon => Zip::from(sample)
            .and(model_output)
            .map_collect(|&x, &e| x - s * e),
        PredictionType::VPrediction => {
            let c_out = -s / (s * s + 1.0).sqrt();
            let c_skip = 1.0 / (s * s + 1.0);
            Zip::from(sample)
                .and(model_output)
                .map_collect(|&x, &v| v * c_out + x * c_skip)
        }
        PredictionType::Sample => model_output.to_owned(),
    }
}

/// x + (x − x̂₀)/σ · dt, the Euler update of the σ schedulers (float32).
pub(super) fn euler_update(
    sample: &ArrayViewD<'_, f32>,
    x0: &ArrayD<f32>,
    sigma: f64,
    dt: f32,
) -> ArrayD<f32> {
    let s = sigma as f32;
    Zip::from(sample)
        .and(x0)
        .map_collect(|&x, &x0| x + (x - x0) / s * dt)
}
