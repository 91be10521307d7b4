//! One scheduler class's settings, resolved from a (possibly other class's)
//! config as diffusers' `SchedulerClass.from_config(config)` does: a key
//! present in the file and accepted by the class is used, every other key
//! takes that class's constructor default. Values diffusers rejects are
//! [`SchedulerError::InvalidValue`]; values it accepts but we do not
//! implement are [`SchedulerError::Unsupported`], never silent fallbacks.
//!
//! The checks run in one fixed order (each function below in turn), so the
//! first problem of a config is the one reported.

use super::schedule::{BetaSchedule, BetaSource, TimestepSpacing};
use super::{SchedulerConfig, SchedulerError, SchedulerKind};

/// Upper bound on `num_train_timesteps` accepted from a config (every
/// published diffusion model uses 1000), so a corrupt file cannot make us
/// allocate without bound.
const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

impl SchedulerConfig {
    /// The settings of class `kind` built from this config, as
    /// `Kind.from_config(config)` would: keys present and accepted by the
    /// class are used, the others take the class's own defaults (see the
    /// module documentation). Fails on values diffusers rejects and on
    /// features we do not implement (Karras σ, thresholding, PRK steps, …).
    pub fn resolve(&self, kind: SchedulerKind) -> Result<Settings, SchedulerError> {
        use SchedulerKind::*;
        let class = kind.class_name();
        let num_train_timesteps = self.num_train_timesteps.unwrap_or(1000);
        if !(1..=MAX_TRAIN_TIMESTEPS).contains(&num_train_timesteps) {
            return Err(invalid(
                class,
                "num_train_timesteps",
                &num_train_timesteps.to_string(),
                "1 to 1000000",
            ));
        }
        let betas = self.beta_source(class)?;
        let prediction_type = self.prediction_type(kind)?;
        let timestep_spacing = self.timestep_spacing(kind)?;
        let rescale_betas_zero_snr = [Ddim, Euler, EulerAncestral, DpmSolverMultistep, Lcm]
            .contains(&kind)
            && self.rescale_betas_zero_snr.unwrap_or(false);
        // PNDM defaults to set_alpha_to_one = false, DDIM and LCM to true.
        let set_alpha_to_one = match kind {
            Pndm => self.set_alpha_to_one.unwrap_or(false),
            Ddim | Lcm => self.set_alpha_to_one.unwrap_or(true),
            _ => false,
        };
        self.refuse_prk_warmup(kind)?;
        let clip_sample = self.clip_sample(kind)?;
        self.refuse_other_sigmas(kind)?;
        let (interpolation_type, timestep_type) = self.euler_options(kind)?;
        let final_sigmas_type = self.final_sigmas(kind)?;
        let dpm = match kind {
            DpmSolverMultistep => self.dpm_settings()?,
            _ => DpmSettings::default(),
        };
        let lcm = match kind {
            Lcm => self.lcm_settings()?,
            _ => LcmSettings::default(),
        };
        Ok(Settings {
            kind,
            num_train_timesteps,
            betas,
            rescale_betas_zero_snr,
            prediction_type,
            timestep_spacing,
            steps_offset: self.steps_offset.unwrap_or(0),
            set_alpha_to_one,
            clip_sample,
            interpolation_type,
            timestep_type,
            final_sigmas_type,
            dpm,
            lcm,
        })
    }

    /// `trained_betas`, or `beta_schedule` from `beta_start` to `beta_end`.
    fn beta_source(&self, class: &'static str) -> Result<BetaSource, SchedulerError> {
        if let Some(values) = &self.trained_betas {
            return Ok(BetaSource::Trained(values.clone()));
        }
        let schedule = choose(class, BETA_SCHEDULE, &self.beta_schedule, "linear")?;
        let start = self.beta_start.unwrap_or(0.0001);
        let end = self.beta_end.unwrap_or(0.02);
        for (key, v) in [("beta_start", start), ("beta_end", end)] {
            if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                return Err(invalid(class, key, &v.to_string(), "a number in [0, 1)"));
            }
        }
        Ok(BetaSource::Schedule {
            schedule,
            start,
            end,
        })
    }

    /// `prediction_type`, among the values the class accepts.
    fn prediction_type(&self, kind: SchedulerKind) -> Result<PredictionType, SchedulerError> {
        use SchedulerKind::*;
        let key = match kind {
            Pndm | EulerAncestral => PREDICTION_EPS_V,
            Euler => PREDICTION_EULER,
            Ddim | Lms | DpmSolverMultistep | Lcm => PREDICTION_ALL,
        };
        choose(kind.class_name(), key, &self.prediction_type, "epsilon")
    }

    /// `timestep_spacing`, defaulting per class ("leading" for PNDM and
    /// DDIM, "linspace" for the σ schedulers). LCM accepts the key but its
    /// timesteps do not depend on it.
    fn timestep_spacing(&self, kind: SchedulerKind) -> Result<TimestepSpacing, SchedulerError> {
        use SchedulerKind::*;
        let default = match kind {
            Pndm | Ddim | Lcm => "leading",
            Euler | EulerAncestral | Lms | DpmSolverMultistep => "linspace",
        };
        choose(kind.class_name(), SPACING, &self.timestep_spacing, default)
    }

    /// PNDM's Runge–Kutta warm-up.
    fn refuse_prk_warmup(&self, kind: SchedulerKind) -> Result<(), SchedulerError> {
        let class = kind.class_name();
        if kind == SchedulerKind::Pndm && !self.skip_prk_steps.unwrap_or(false) {
            return Err(unsupported(
                class,
                "skip_prk_steps",
                "false",
                "the Runge–Kutta warm-up steps are not implemented; Stable Diffusion configs set \
                 skip_prk_steps = true (PLMS)",
            ));
        }
        Ok(())
    }

    /// DDIM's and LCM's clipping of x₀ (DDIM's default on, LCM's off; range
    /// 1); then DDIM's, DPM-Solver's and LCM's dynamic thresholding, refused.
    fn clip_sample(&self, kind: SchedulerKind) -> Result<Option<f64>, SchedulerError> {
        use SchedulerKind::*;
        let class = kind.class_name();
        let clips = match kind {
            Ddim => self.clip_sample.unwrap_or(true),
            Lcm => self.clip_sample.unwrap_or(false),
            _ => false,
        };
        let clip = if clips {
            let range = self.clip_sample_range.unwrap_or(1.0);
            if !(range.is_finite() && range > 0.0) {
                return Err(invalid(
                    class,
                    "clip_sample_range",
                    &range.to_string(),
                    "a finite number > 0",
                ));
            }
            Some(range)
        } else {
            None
        };
        if [Ddim, DpmSolverMultistep, Lcm].contains(&kind) && self.thresholding.unwrap_or(false) {
            return Err(unsupported(
                class,
                "thresholding",
                "true",
                "dynamic thresholding is not implemented",
            ));
        }
        Ok(clip)
    }

    /// Karras, exponential and beta σ spacings (Euler, LMS, DPM-Solver).
    fn refuse_other_sigmas(&self, kind: SchedulerKind) -> Result<(), SchedulerError> {
        use SchedulerKind::*;
        if ![Euler, Lms, DpmSolverMultistep].contains(&kind) {
            return Ok(());
        }
        refuse_other_schedules(
            kind.class_name(),
            [
                ("use_karras_sigmas", self.use_karras_sigmas),
                ("use_exponential_sigmas", self.use_exponential_sigmas),
                ("use_beta_sigmas", self.use_beta_sigmas),
            ],
        )
    }

    /// Euler's `interpolation_type` and `timestep_type` (the others behave
    /// as "linear" and "discrete").
    fn euler_options(
        &self,
        kind: SchedulerKind,
    ) -> Result<(InterpolationType, TimestepType), SchedulerError> {
        if kind != SchedulerKind::Euler {
            return Ok((InterpolationType::Linear, TimestepType::Discrete));
        }
        let class = kind.class_name();
        let interpolation = choose(class, INTERPOLATION, &self.interpolation_type, "linear")?;
        let timesteps = choose(class, TIMESTEP_TYPE, &self.timestep_type, "discrete")?;
        Ok((interpolation, timesteps))
    }

    /// `final_sigmas_type` (Euler, DPM-Solver; the others end at σ = 0).
    fn final_sigmas(&self, kind: SchedulerKind) -> Result<FinalSigmas, SchedulerError> {
        use SchedulerKind::*;
        if ![Euler, DpmSolverMultistep].contains(&kind) {
            return Ok(FinalSigmas::Zero);
        }
        choose(
            kind.class_name(),
            FINAL_SIGMAS,
            &self.final_sigmas_type,
            "zero",
        )
    }

    /// LCM's own keys.
    fn lcm_settings(&self) -> Result<LcmSettings, SchedulerError> {
        let class = SchedulerKind::Lcm.class_name();
        let defaults = LcmSettings::default();
        let scaling = self.timestep_scaling.unwrap_or(defaults.timestep_scaling);
        if !scaling.is_finite() {
            return Err(invalid(
                class,
                "timestep_scaling",
                &scaling.to_string(),
                "a finite number",
            ));
        }
        Ok(LcmSettings {
            original_inference_steps: self
                .original_inference_steps
                .unwrap_or(defaults.original_inference_steps),
            timestep_scaling: scaling,
        })
    }

    /// DPM-Solver's own keys.
    fn dpm_settings(&self) -> Result<DpmSettings, SchedulerError> {
        let class = SchedulerKind::DpmSolverMultistep.class_name();
        refuse_other_schedules(
            class,
            [
                ("use_lu_lambdas", self.use_lu_lambdas),
                ("use_flow_sigmas", self.use_flow_sigmas),
                ("use_dynamic_shifting", self.use_dynamic_shifting),
            ],
        )?;
        // diffusers maps the retired "deis" to "dpmsolver++" and the retired
        // solver types to "midpoint".
        let algorithm = self.algorithm_type.as_deref().unwrap_or("dpmsolver++");
        match algorithm {
            "dpmsolver++" | "deis" => {}
            "dpmsolver" | "sde-dpmsolver" | "sde-dpmsolver++" => {
                return Err(unsupported(
                    class,
                    "algorithm_type",
                    algorithm,
                    "only \"dpmsolver++\" is implemented",
                ));
            }
            other => {
                return Err(invalid(
                    class,
                    "algorithm_type",
                    other,
                    "one of \"dpmsolver++\", \"dpmsolver\", \"sde-dpmsolver++\", \"sde-dpmsolver\"",
                ));
            }
        }
        let solver_type = choose(class, SOLVER_TYPE, &self.solver_type, "midpoint")?;
        let solver_order = self.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(invalid(
                class,
                "solver_order",
                &solver_order.to_string(),
                "1, 2 or 3",
            ));
        }
        let lambda_min_clipped = self.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
        if lambda_min_clipped.is_nan() {
            return Err(invalid(
                class,
                "lambda_min_clipped",
                "NaN",
                "a number or -Infinity",
            ));
        }
        if let Some(v) = self.variance_type.as_deref() {
            return Err(unsupported(
                class,
                "variance_type",
                v,
                "models that also predict the variance are not supported",
            ));
        }
        Ok(DpmSettings {
            solver_order,
            solver_type,
            lower_order_final: self.lower_order_final.unwrap_or(true),
            euler_at_final: self.euler_at_final.unwrap_or(false),
            lambda_min_clipped,
        })
    }
}

/// The parameters one class works with, every default applied. Fields a class
/// does not take hold the value that class behaves as.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The class these settings are for.
    pub kind: SchedulerKind,
    /// T, the number of training timesteps.
    pub num_train_timesteps: usize,
    /// The β schedule.
    pub betas: BetaSource,
    /// Rescale to zero terminal SNR (DDIM, Euler, Euler ancestral, DPM).
    pub rescale_betas_zero_snr: bool,
    /// What the UNet predicts.
    pub prediction_type: PredictionType,
    /// How inference timesteps are spaced.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps.
    pub steps_offset: i64,
    /// PNDM/DDIM: ᾱ after the last step is 1 (else ᾱ₀).
    pub set_alpha_to_one: bool,
    /// DDIM: clip the x₀ prediction to ±range.
    pub clip_sample: Option<f64>,
    /// Euler: σ between timesteps.
    pub interpolation_type: InterpolationType,
    /// Euler: timesteps the UNet sees.
    pub timestep_type: TimestepType,
    /// Euler, DPM: σ after the last step.
    pub final_sigmas_type: FinalSigmas,
    /// DPM-Solver only.
    pub dpm: DpmSettings,
    /// LCM only.
    pub lcm: LcmSettings,
}

/// LCM's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LcmSettings {
    /// Steps of the distillation schedule the inference timesteps are taken from.
    pub original_inference_steps: usize,
    /// Factor on the timestep in the boundary conditions c_skip, c_out.
    pub timestep_scaling: f64,
}

impl Default for LcmSettings {
    fn default() -> Self {
        Self {
            original_inference_steps: 50,
            timestep_scaling: 10.0,
        }
    }
}

/// DPM-Solver's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DpmSettings {
    /// Multistep order (1–3).
    pub solver_order: usize,
    /// Second-order update formula.
    pub solver_type: SolverType,
    /// Lower the order on the last steps when there are fewer than 15.
    pub lower_order_final: bool,
    /// First order on the last step whatever the step count.
    pub euler_at_final: bool,
    /// Timesteps whose λ = log(α/σ) lies below this are not used.
    pub lambda_min_clipped: f64,
}

impl Default for DpmSettings {
    fn default() -> Self {
        Self {
            solver_order: 2,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }
}

/// What the UNet predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε (SD 1.x, SD 2.x base).
    Epsilon,
    /// v = √ᾱ ε − √(1−ᾱ) x₀ (SD 2.x 768).
    VPrediction,
    /// x₀ itself (`"sample"`, Euler also `"original_sample"`).
    Sample,
}

/// Euler's σ between timesteps (`interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterpolationType {
    /// σ interpolated linearly in t at each timestep.
    Linear,
    /// N+1 σ log-spaced between σ_max and σ_min (whatever the timesteps).
    LogLinear,
}

/// Euler's UNet timesteps (`timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    /// The spaced training timesteps.
    Discrete,
    /// 0.25·ln σ, with `v_prediction` only (SD x4 upscaler style).
    Continuous,
}

/// σ after the last step (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// 0: the last step lands on the x₀ prediction.
    Zero,
    /// σ of training timestep 0.
    SigmaMin,
}

/// DPM-Solver's second-order formula (`solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SolverType {
    /// Midpoint (diffusers' default).
    Midpoint,
    /// Heun.
    Heun,
}

/// Refuses every switch of `switches` that is on: each picks a σ or λ
/// schedule other than the training σ interpolated at the timesteps.
fn refuse_other_schedules<const N: usize>(
    class: &'static str,
    switches: [(&'static str, Option<bool>); N],
) -> Result<(), SchedulerError> {
    match switches.iter().find(|(_, on)| on.unwrap_or(false)) {
        Some((key, _)) => Err(unsupported(
            class,
            key,
            "true",
            "only the training σ schedule interpolated at the timesteps is implemented",
        )),
        None => Ok(()),
    }
}

/// A string-valued key and the values a class accepts for it.
type Key<T> = (&'static str, &'static [(&'static str, T)]);

// The accepted spellings of each string-valued key, as diffusers accepts
// them (retired spellings map where diffusers maps them).
#[rustfmt::skip]
mod keys {
    use super::*;
    use super::super::schedule::{BetaSchedule::*, TimestepSpacing::*};
    use PredictionType::*;
    pub const BETA_SCHEDULE: Key<BetaSchedule> = ("beta_schedule",
        &[("linear", Linear), ("scaled_linear", ScaledLinear), ("squaredcos_cap_v2", SquaredcosCapV2)]);
    pub const PREDICTION_EPS_V: Key<PredictionType> = ("prediction_type",
        &[("epsilon", Epsilon), ("v_prediction", VPrediction)]);
    pub const PREDICTION_ALL: Key<PredictionType> = ("prediction_type",
        &[("epsilon", Epsilon), ("v_prediction", VPrediction), ("sample", Sample)]);
    pub const PREDICTION_EULER: Key<PredictionType> = ("prediction_type",
        &[("epsilon", Epsilon), ("v_prediction", VPrediction), ("sample", Sample), ("original_sample", Sample)]);
    pub const SPACING: Key<TimestepSpacing> = ("timestep_spacing",
        &[("leading", Leading), ("linspace", Linspace), ("trailing", Trailing)]);
    pub const INTERPOLATION: Key<InterpolationType> = ("interpolation_type",
        &[("linear", InterpolationType::Linear), ("log_linear", InterpolationType::LogLinear)]);
    pub const TIMESTEP_TYPE: Key<TimestepType> = ("timestep_type",
        &[("discrete", TimestepType::Discrete), ("continuous", TimestepType::Continuous)]);
    pub const FINAL_SIGMAS: Key<FinalSigmas> = ("final_sigmas_type",
        &[("zero", FinalSigmas::Zero), ("sigma_min", FinalSigmas::SigmaMin)]);
    pub const SOLVER_TYPE: Key<SolverType> = ("solver_type",
        &[("midpoint", SolverType::Midpoint), ("heun", SolverType::Heun),
          ("logrho", SolverType::Midpoint), ("bh1", SolverType::Midpoint), ("bh2", SolverType::Midpoint)]);
}
use keys::*;

/// The value of key `(name, choices)` (`default` when absent) for `class`.
fn choose<T: Copy>(
    class: &'static str,
    (key, choices): Key<T>,
    value: &Option<String>,
    default: &str,
) -> Result<T, SchedulerError> {
    let value = value.as_deref().unwrap_or(default);
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| SchedulerError::InvalidValue {
            class,
            key,
            value: value.to_string(),
            expected: choices
                .iter()
                .map(|(n, _)| format!("{n:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn invalid(class: &'static str, key: &'static str, value: &str, expected: &str) -> SchedulerError {
    SchedulerError::InvalidValue {
        class,
        key,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

fn unsupported(
    class: &'static str,
    key: &'static str,
    value: &str,
    why: &'static str,
) -> SchedulerError {
    SchedulerError::Unsupported {
        class,
        key,
        value: value.to_string(),
        why,
    }
}
