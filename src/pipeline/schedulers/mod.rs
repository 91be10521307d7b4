//! Schedulers: the update rule of the denoising loop, one file per
//! scheduler behind one [`Scheduler`] trait, numerically matching diffusers
//! 0.39 (goldens in `tests/fixtures/goldens/schedulers/`, 1e-5 relative).
//!
//! The loop is indexed by UNet call, not by timestep value:
//!
//! ```text
//! let mut s = build(&config, kind, steps, eta)?;
//! let mut x = rng.randn(&[1, 4, h/8, w/8]) * s.init_noise_sigma();    // [b, 4, h/8, w/8] f32
//! for call in 0..s.timesteps().len() {
//!     let input = s.scale_model_input(x.view(), call)?;                 // same shape
//!     let eps = unet(input, s.timesteps()[call]);                       // same shape
//!     x = s.step(eps.view(), call, x.view(), &mut |shape| rng.randn(shape))?;
//! }
//! ```
//!
//! (PNDM calls the UNet N+1 times for N steps, so "call" ≠ "step" there.)
//! Randomness is explicit: only DDIM with η > 0 and Euler ancestral draw from
//! the `noise` function, once per call, with the sample's shape; the others
//! never call it. Tests pass recorded noise; the generator passes
//! [`crate::pipeline::rng::Rng::randn`].
//!
//! # Configuration and switching scheduler
//!
//! [`SchedulerConfig`] reads `scheduler/scheduler_config.json` as diffusers
//! writes it: field names are diffusers' own, unknown keys are ignored, every
//! field is optional, and Python's `NaN`/`Infinity`/`-Infinity` (DPM-Solver
//! configs save `"lambda_min_clipped": -Infinity`) are accepted.
//! [`SchedulerConfig::resolve`] then gives the [`Settings`] of one class,
//! following `SchedulerClass.from_config(config)`: a key present in the file
//! and accepted by the class is used, every other key takes *that class's*
//! constructor default. So choosing another scheduler than the file's
//! `_class_name` (`--scheduler`) behaves like diffusers' `from_config`:
//! - the 2022 SD 1.x config has no `timestep_spacing`, so PNDM and DDIM use
//!   their default `"leading"` and Euler, Euler ancestral, LMS and DPM-Solver
//!   theirs, `"linspace"`;
//! - a config saved by diffusers ≥ 0.21 writes every key explicitly,
//!   including PNDM's `"timestep_spacing": "leading"`, which then carries over:
//!   Euler from such a file uses `"leading"` (timesteps 901 … 1 and
//!   init σ = √(σ_max² + 1), the goldens' `euler_leading` case), not the
//!   `"linspace"` it would use from the original file;
//! - keys the target class does not accept are ignored whatever their value
//!   (DDIM's `clip_sample` does nothing for Euler), and values the class
//!   accepts but we do not implement are errors, never silent fallbacks.

pub mod schedule;

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod lms;
mod pndm;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ndarray::{ArrayD, ArrayViewD};
use serde::{Deserialize, Deserializer};

pub use schedule::{BetaSchedule, BetaSource, NoiseSchedule, TimestepSpacing};

/// One denoising update rule, set up for a fixed number of steps.
///
/// Calls must come in order 0, 1, 2, … (multistep schedulers keep history);
/// build a new scheduler to start over.
pub trait Scheduler: Send + fmt::Debug {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;

    /// UNet timesteps, one per UNet call, in call order (PNDM: N+1 calls for
    /// N steps). Integer-valued for PNDM, DDIM and DPM-Solver; float32 values
    /// for Euler, Euler ancestral and LMS (e.g. 499.5), fed to the UNet as is.
    fn timesteps(&self) -> &[f64];

    /// The σ of each call plus the final σ (`timesteps().len() + 1` values,
    /// float32 values as diffusers' `sigmas`), for the σ-parameterised
    /// schedulers (Euler, Euler ancestral, LMS, DPM-Solver); `None` for PNDM and
    /// DDIM, which work with ᾱ directly.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// Standard deviation of the initial latents: multiply N(0, 1) noise by it
    /// (1 for PNDM, DDIM and DPM-Solver; σ_max, or √(σ_max² + 1) with
    /// `leading` spacing, for Euler, Euler ancestral and LMS).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The σ that scales the UNet input of call `call` (Euler, Euler
    /// ancestral, LMS); `None` when the input is the sample itself.
    fn input_sigma(&self, _call: usize) -> Option<f64> {
        None
    }

    /// The UNet input for call `call`: `sample` `[b, c, h, w] f32` scaled as the
    /// scheduler needs (x/√(σ² + 1) for Euler, Euler ancestral and LMS; a copy
    /// otherwise). Same shape and dtype as `sample`.
    fn scale_model_input(
        &self,
        sample: ArrayViewD<'_, f32>,
        call: usize,
    ) -> Result<ArrayD<f32>, SchedulerError> {
        let calls = self.timesteps().len();
        if call >= calls {
            return Err(SchedulerError::CallOutOfRange { call, calls });
        }
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
    fn step(
        &mut self,
        model_output: ArrayViewD<'_, f32>,
        call: usize,
        sample: ArrayViewD<'_, f32>,
        noise: &mut dyn FnMut(&[usize]) -> ArrayD<f32>,
    ) -> Result<ArrayD<f32>, SchedulerError>;
}

/// Upper bound on `num_train_timesteps` accepted from a config (every
/// published diffusion model uses 1000), so a corrupt file cannot make us
/// allocate without bound.
const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// Builds the scheduler `kind` for `steps` inference steps from a
/// (possibly other class's) config, as `Kind.from_config(config)` followed by
/// `set_timesteps(steps)` does in diffusers. `eta` is DDIM's η (0 =
/// deterministic DDIM, 1 = DDPM-like); other schedulers take no η and reject
/// anything but 0.
pub fn build(
    config: &SchedulerConfig,
    kind: SchedulerKind,
    steps: usize,
    eta: f64,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let settings = config.resolve(kind)?;
    if steps == 0 || steps > settings.num_train_timesteps {
        return Err(SchedulerError::Steps {
            steps,
            num_train_timesteps: settings.num_train_timesteps,
        });
    }
    if kind == SchedulerKind::Ddim {
        if !(0.0..=1.0).contains(&eta) {
            return Err(SchedulerError::Eta { kind, eta });
        }
    } else if eta != 0.0 {
        return Err(SchedulerError::Eta { kind, eta });
    }
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(pndm::Pndm::new(&settings, steps)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&settings, steps, eta)?),
        SchedulerKind::Euler => Box::new(euler::Euler::new(&settings, steps)?),
        SchedulerKind::EulerAncestral => {
            Box::new(euler_ancestral::EulerAncestral::new(&settings, steps)?)
        }
        SchedulerKind::Lms => Box::new(lms::Lms::new(&settings, steps)?),
        SchedulerKind::DpmSolverMultistep => Box::new(dpmpp_2m::DpmSolver::new(&settings, steps)?),
    })
}

/// The schedulers we implement, named by diffusers class or by CLI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    /// `PNDMScheduler` (`pndm`): PLMS, SD 1.x's default; `skip_prk_steps` only.
    Pndm,
    /// `DDIMScheduler` (`ddim`), with η.
    Ddim,
    /// `EulerDiscreteScheduler` (`euler`).
    Euler,
    /// `EulerAncestralDiscreteScheduler` (`euler-a`): stochastic.
    EulerAncestral,
    /// `LMSDiscreteScheduler` (`lms`): linear multistep, order 4.
    Lms,
    /// `DPMSolverMultistepScheduler` (`dpm++2m`): DPM-Solver++ 2M with the
    /// class defaults; a config's own `solver_order` (1–3) and `solver_type`
    /// are honoured as in diffusers.
    DpmSolverMultistep,
}

impl SchedulerKind {
    /// Every kind, in CLI listing order.
    pub const ALL: [SchedulerKind; 6] = [
        Self::Pndm,
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::Lms,
        Self::DpmSolverMultistep,
    ];

    /// diffusers' class name, as in `_class_name`.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Pndm => "PNDMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Lms => "LMSDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }

    /// The short name the CLI takes.
    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Pndm => "pndm",
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Lms => "lms",
            Self::DpmSolverMultistep => "dpm++2m",
        }
    }

    /// The kind whose diffusers class is `name` (exact spelling).
    pub fn from_class_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }

    /// The kind whose CLI name is `name` (case-insensitive).
    pub fn from_cli_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.cli_name().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    /// Accepts a CLI name (`euler-a`) or a diffusers class name
    /// (`EulerAncestralDiscreteScheduler`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_cli_name(s)
            .or_else(|| Self::from_class_name(s))
            .ok_or_else(|| SchedulerError::UnknownScheduler {
                name: s.to_string(),
            })
    }
}

/// `scheduler_config.json` as diffusers writes it. Every field is optional:
/// absent (or `null`) means "the chosen class's default", see
/// [`SchedulerConfig::resolve`]. Unknown keys are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The class that wrote the file (e.g. `PNDMScheduler`).
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    /// T, training timesteps (default 1000).
    pub num_train_timesteps: Option<usize>,
    /// First β (default 0.0001; SD: 0.00085).
    #[serde(deserialize_with = "python_float")]
    pub beta_start: Option<f64>,
    /// Last β (default 0.02; SD: 0.012).
    #[serde(deserialize_with = "python_float")]
    pub beta_end: Option<f64>,
    /// `linear` (default), `scaled_linear` (SD) or `squaredcos_cap_v2`.
    pub beta_schedule: Option<String>,
    /// Explicit betas, one per training timestep; overrides the schedule.
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon` (default), `v_prediction`, `sample` (where the class has it).
    pub prediction_type: Option<String>,
    /// `leading`, `linspace` or `trailing`; the default depends on the class.
    pub timestep_spacing: Option<String>,
    /// Added to `leading` timesteps (default 0; SD: 1).
    pub steps_offset: Option<i64>,
    /// Rescale betas to zero terminal SNR (DDIM, Euler, Euler a, DPM).
    pub rescale_betas_zero_snr: Option<bool>,
    /// PNDM (default false) and DDIM (default true): ᾱ after the last step is 1.
    pub set_alpha_to_one: Option<bool>,
    /// PNDM: skip the Runge–Kutta warm-up (default false; SD: true; only true
    /// is implemented).
    pub skip_prk_steps: Option<bool>,
    /// DDIM: clip the x₀ prediction (default true; SD: false).
    pub clip_sample: Option<bool>,
    /// DDIM: the clipping range (default 1).
    #[serde(deserialize_with = "python_float")]
    pub clip_sample_range: Option<f64>,
    /// DDIM, DPM: dynamic thresholding (not implemented; must be false).
    pub thresholding: Option<bool>,
    /// Euler: `linear` (default) or `log_linear`.
    pub interpolation_type: Option<String>,
    /// Euler: `discrete` (default) or `continuous`.
    pub timestep_type: Option<String>,
    /// Euler, LMS, DPM: Karras σ (not implemented; must be false).
    pub use_karras_sigmas: Option<bool>,
    /// Euler, LMS, DPM: exponential σ (not implemented; must be false).
    pub use_exponential_sigmas: Option<bool>,
    /// Euler, LMS, DPM: beta-distributed σ (not implemented; must be false).
    pub use_beta_sigmas: Option<bool>,
    /// Euler, DPM: `zero` (default) or `sigma_min`.
    pub final_sigmas_type: Option<String>,
    /// DPM: multistep order, 1–3 (default 2).
    pub solver_order: Option<usize>,
    /// DPM: `dpmsolver++` (default; the only one implemented).
    pub algorithm_type: Option<String>,
    /// DPM: `midpoint` (default) or `heun`.
    pub solver_type: Option<String>,
    /// DPM: lower the order on the last steps below 15 steps (default true).
    pub lower_order_final: Option<bool>,
    /// DPM: first order on the last step (default false).
    pub euler_at_final: Option<bool>,
    /// DPM: skip timesteps with λ below this (default −∞).
    #[serde(deserialize_with = "python_float")]
    pub lambda_min_clipped: Option<f64>,
    /// DPM: `learned`/`learned_range` variance outputs (not supported).
    pub variance_type: Option<String>,
    /// DPM: Lu et al.'s λ spacing (not implemented; must be false).
    pub use_lu_lambdas: Option<bool>,
    /// DPM: flow-matching σ (not implemented; must be false).
    pub use_flow_sigmas: Option<bool>,
    /// DPM: resolution-dependent shifting (not implemented; must be false).
    pub use_dynamic_shifting: Option<bool>,
}

/// An optional float that may also be one of Python's non-finite spellings,
/// turned into strings by [`python_json`].
fn python_float<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Float {
        Number(f64),
        Word(String),
    }
    match Option::<Float>::deserialize(d)? {
        None => Ok(None),
        Some(Float::Number(x)) => Ok(Some(x)),
        Some(Float::Word(w)) => match w.as_str() {
            "NaN" => Ok(Some(f64::NAN)),
            "Infinity" => Ok(Some(f64::INFINITY)),
            "-Infinity" => Ok(Some(f64::NEG_INFINITY)),
            other => Err(serde::de::Error::custom(format!(
                "expected a number, got the string {other:?}"
            ))),
        },
    }
}

/// Parses JSON as Python's `json` module writes it: the bare tokens `NaN`,
/// `Infinity` and `-Infinity` (not valid JSON, but what diffusers saves for
/// e.g. `lambda_min_clipped`) become the strings `"NaN"`, `"Infinity"`,
/// `"-Infinity"`; everything else is standard JSON.
pub fn python_json(text: &str) -> Result<serde_json::Value, serde_json::Error> {
    const WORDS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(word) = WORDS.iter().find(|w| rest.starts_with(**w)) {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    serde_json::from_str(&out)
}

impl SchedulerConfig {
    /// Reads a config from JSON text (Python's non-finite floats accepted).
    pub fn from_json_str(text: &str) -> Result<Self, SchedulerError> {
        let value = python_json(text).map_err(SchedulerError::Json)?;
        Self::from_value(value)
    }

    /// Reads a config from a parsed JSON object.
    pub fn from_value(value: serde_json::Value) -> Result<Self, SchedulerError> {
        serde_json::from_value(value).map_err(SchedulerError::Json)
    }

    /// Reads `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, SchedulerError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&text).map_err(|e| match e {
            SchedulerError::Json(source) => SchedulerError::ConfigFile {
                path: path.to_path_buf(),
                source,
            },
            other => other,
        })
    }

    /// The scheduler the file names in `_class_name`.
    pub fn kind(&self) -> Result<SchedulerKind, SchedulerError> {
        let name = self
            .class_name
            .as_deref()
            .ok_or(SchedulerError::MissingClassName)?;
        SchedulerKind::from_class_name(name).ok_or_else(|| SchedulerError::UnknownScheduler {
            name: name.to_string(),
        })
    }

    /// The settings of class `kind` built from this config, as
    /// `Kind.from_config(config)` would: keys present and accepted by the
    /// class are used, the others take the class's own defaults (see the
    /// module documentation). Fails on values diffusers rejects and on
    /// features we do not implement (Karras σ, thresholding, PRK steps, …).
    pub fn resolve(&self, kind: SchedulerKind) -> Result<Settings, SchedulerError> {
        use SchedulerKind::*;
        let class = kind.class_name();
        let c = self;
        // Keys accepted by a subset of the classes: the value if the class
        // takes the key, else nothing (the class's behaviour without it).
        let accepts = |kinds: &[SchedulerKind]| kinds.contains(&kind);

        let num_train_timesteps = c.num_train_timesteps.unwrap_or(1000);
        if !(1..=MAX_TRAIN_TIMESTEPS).contains(&num_train_timesteps) {
            return Err(invalid(
                class,
                "num_train_timesteps",
                &num_train_timesteps.to_string(),
                "1 to 1000000",
            ));
        }
        let betas = match &c.trained_betas {
            Some(values) => BetaSource::Trained(values.clone()),
            None => {
                let schedule = pick(
                    class,
                    "beta_schedule",
                    c.beta_schedule.as_deref().unwrap_or("linear"),
                    &[
                        ("linear", BetaSchedule::Linear),
                        ("scaled_linear", BetaSchedule::ScaledLinear),
                        ("squaredcos_cap_v2", BetaSchedule::SquaredcosCapV2),
                    ],
                )?;
                let start = c.beta_start.unwrap_or(0.0001);
                let end = c.beta_end.unwrap_or(0.02);
                for (key, v) in [("beta_start", start), ("beta_end", end)] {
                    if !(v.is_finite() && (0.0..1.0).contains(&v)) {
                        return Err(invalid(class, key, &v.to_string(), "a number in [0, 1)"));
                    }
                }
                BetaSource::Schedule {
                    schedule,
                    start,
                    end,
                }
            }
        };

        let prediction_choices: &[(&str, PredictionType)] = match kind {
            Pndm | EulerAncestral => &[
                ("epsilon", PredictionType::Epsilon),
                ("v_prediction", PredictionType::VPrediction),
            ],
            Euler => &[
                ("epsilon", PredictionType::Epsilon),
                ("v_prediction", PredictionType::VPrediction),
                ("sample", PredictionType::Sample),
                ("original_sample", PredictionType::Sample),
            ],
            Ddim | Lms | DpmSolverMultistep => &[
                ("epsilon", PredictionType::Epsilon),
                ("v_prediction", PredictionType::VPrediction),
                ("sample", PredictionType::Sample),
            ],
        };
        let prediction_type = pick(
            class,
            "prediction_type",
            c.prediction_type.as_deref().unwrap_or("epsilon"),
            prediction_choices,
        )?;

        let default_spacing = match kind {
            Pndm | Ddim => "leading",
            Euler | EulerAncestral | Lms | DpmSolverMultistep => "linspace",
        };
        let timestep_spacing = pick(
            class,
            "timestep_spacing",
            c.timestep_spacing.as_deref().unwrap_or(default_spacing),
            &[
                ("leading", TimestepSpacing::Leading),
                ("linspace", TimestepSpacing::Linspace),
                ("trailing", TimestepSpacing::Trailing),
            ],
        )?;

        let rescale_betas_zero_snr = accepts(&[Ddim, Euler, EulerAncestral, DpmSolverMultistep])
            && c.rescale_betas_zero_snr.unwrap_or(false);

        // PNDM defaults to set_alpha_to_one = false, DDIM to true.
        let set_alpha_to_one = match kind {
            Pndm => c.set_alpha_to_one.unwrap_or(false),
            Ddim => c.set_alpha_to_one.unwrap_or(true),
            _ => false,
        };
        if kind == Pndm && !c.skip_prk_steps.unwrap_or(false) {
            return Err(unsupported(
                class,
                "skip_prk_steps",
                "false",
                "the Runge–Kutta warm-up steps are not implemented; Stable Diffusion configs set \
                 skip_prk_steps = true (PLMS)",
            ));
        }
        let clip_sample = if kind == Ddim && c.clip_sample.unwrap_or(true) {
            let range = c.clip_sample_range.unwrap_or(1.0);
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
        if accepts(&[Ddim, DpmSolverMultistep]) && c.thresholding.unwrap_or(false) {
            return Err(unsupported(
                class,
                "thresholding",
                "true",
                "dynamic thresholding is not implemented",
            ));
        }
        if accepts(&[Euler, Lms, DpmSolverMultistep]) {
            for (key, value) in [
                ("use_karras_sigmas", c.use_karras_sigmas),
                ("use_exponential_sigmas", c.use_exponential_sigmas),
                ("use_beta_sigmas", c.use_beta_sigmas),
            ] {
                if value.unwrap_or(false) {
                    return Err(unsupported(
                        class,
                        key,
                        "true",
                        "only the training σ schedule interpolated at the timesteps is implemented",
                    ));
                }
            }
        }

        let interpolation_type = if kind == Euler {
            pick(
                class,
                "interpolation_type",
                c.interpolation_type.as_deref().unwrap_or("linear"),
                &[
                    ("linear", InterpolationType::Linear),
                    ("log_linear", InterpolationType::LogLinear),
                ],
            )?
        } else {
            InterpolationType::Linear
        };
        let timestep_type = if kind == Euler {
            pick(
                class,
                "timestep_type",
                c.timestep_type.as_deref().unwrap_or("discrete"),
                &[
                    ("discrete", TimestepType::Discrete),
                    ("continuous", TimestepType::Continuous),
                ],
            )?
        } else {
            TimestepType::Discrete
        };
        let final_sigmas_type = if accepts(&[Euler, DpmSolverMultistep]) {
            pick(
                class,
                "final_sigmas_type",
                c.final_sigmas_type.as_deref().unwrap_or("zero"),
                &[
                    ("zero", FinalSigmas::Zero),
                    ("sigma_min", FinalSigmas::SigmaMin),
                ],
            )?
        } else {
            FinalSigmas::Zero
        };

        let mut dpm = DpmSettings::default();
        if kind == DpmSolverMultistep {
            for (key, value) in [
                ("use_lu_lambdas", c.use_lu_lambdas),
                ("use_flow_sigmas", c.use_flow_sigmas),
                ("use_dynamic_shifting", c.use_dynamic_shifting),
            ] {
                if value.unwrap_or(false) {
                    return Err(unsupported(
                        class,
                        key,
                        "true",
                        "only the training σ schedule interpolated at the timesteps is implemented",
                    ));
                }
            }
            // diffusers maps the retired "deis" to "dpmsolver++" and the
            // retired solver types to "midpoint".
            let algorithm = c.algorithm_type.as_deref().unwrap_or("dpmsolver++");
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
            dpm.solver_type = pick(
                class,
                "solver_type",
                c.solver_type.as_deref().unwrap_or("midpoint"),
                &[
                    ("midpoint", SolverType::Midpoint),
                    ("heun", SolverType::Heun),
                    ("logrho", SolverType::Midpoint),
                    ("bh1", SolverType::Midpoint),
                    ("bh2", SolverType::Midpoint),
                ],
            )?;
            dpm.solver_order = c.solver_order.unwrap_or(2);
            if !(1..=3).contains(&dpm.solver_order) {
                return Err(invalid(
                    class,
                    "solver_order",
                    &dpm.solver_order.to_string(),
                    "1, 2 or 3",
                ));
            }
            dpm.lower_order_final = c.lower_order_final.unwrap_or(true);
            dpm.euler_at_final = c.euler_at_final.unwrap_or(false);
            dpm.lambda_min_clipped = c.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY);
            if dpm.lambda_min_clipped.is_nan() {
                return Err(invalid(
                    class,
                    "lambda_min_clipped",
                    "NaN",
                    "a number or -Infinity",
                ));
            }
            if let Some(v) = c.variance_type.as_deref() {
                return Err(unsupported(
                    class,
                    "variance_type",
                    v,
                    "models that also predict the variance are not supported",
                ));
            }
        }

        Ok(Settings {
            kind,
            num_train_timesteps,
            betas,
            rescale_betas_zero_snr,
            prediction_type,
            timestep_spacing,
            steps_offset: c.steps_offset.unwrap_or(0),
            set_alpha_to_one,
            clip_sample,
            interpolation_type,
            timestep_type,
            final_sigmas_type,
            dpm,
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

fn pick<T: Copy>(
    class: &'static str,
    key: &'static str,
    value: &str,
    choices: &[(&str, T)],
) -> Result<T, SchedulerError> {
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

/// Everything that can stop building or running a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The config file could not be read.
    #[error("cannot read scheduler config {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON or has a value of the wrong type.
    #[error("scheduler config {path} is not a valid scheduler_config.json")]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// What serde found.
        #[source]
        source: serde_json::Error,
    },
    /// Config JSON given as text or value is invalid.
    #[error("invalid scheduler config JSON")]
    Json(#[source] serde_json::Error),
    /// The config names no class and none was chosen.
    #[error("the scheduler config has no \"_class_name\"; choose a scheduler explicitly")]
    MissingClassName,
    /// Neither a known CLI name nor a known diffusers class.
    #[error(
        "unknown scheduler {name:?}: expected one of pndm, ddim, euler, euler-a, lms, dpm++2m \
         or their diffusers class names"
    )]
    UnknownScheduler {
        /// The name given.
        name: String,
    },
    /// A config value diffusers itself rejects for this class.
    #[error("{class}: {key} = {value} is invalid, expected {expected}")]
    InvalidValue {
        /// The class being built.
        class: &'static str,
        /// The config key.
        key: &'static str,
        /// The offending value.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// A config value diffusers accepts but we do not implement.
    #[error("{class}: {key} = {value} is not supported: {why}")]
    Unsupported {
        /// The class being built.
        class: &'static str,
        /// The config key.
        key: &'static str,
        /// The offending value.
        value: String,
        /// Why.
        why: &'static str,
    },
    /// `trained_betas` does not have one β per training timestep.
    #[error("trained_betas has {actual} values, num_train_timesteps is {expected}")]
    TrainedBetasLength {
        /// num_train_timesteps.
        expected: usize,
        /// Length of the list.
        actual: usize,
    },
    /// A β outside [0, 1) (ᾱ would not be a probability).
    #[error("beta {index} is {value}, expected a number in [0, 1)")]
    InvalidBeta {
        /// Training timestep.
        index: usize,
        /// The β.
        value: f64,
    },
    /// Number of inference steps outside 1..=T.
    #[error("{steps} inference steps requested, expected 1 to {num_train_timesteps}")]
    Steps {
        /// Steps asked for.
        steps: usize,
        /// T.
        num_train_timesteps: usize,
    },
    /// The spacing (with `steps_offset`) produced a timestep with no ᾱ.
    #[error(
        "timestep {timestep} is outside the {num_train_timesteps} training timesteps \
         (check steps_offset and timestep_spacing)"
    )]
    TimestepOutOfRange {
        /// The timestep.
        timestep: i64,
        /// T.
        num_train_timesteps: usize,
    },
    /// η given to a scheduler without η, or outside [0, 1] for DDIM.
    #[error("eta = {eta} is not valid for {kind}: only ddim takes eta, in [0, 1]")]
    Eta {
        /// The scheduler.
        kind: SchedulerKind,
        /// The η given.
        eta: f64,
    },
    /// A call index past the schedule.
    #[error("UNet call {call} requested, the schedule has {calls} calls")]
    CallOutOfRange {
        /// The index given.
        call: usize,
        /// Number of calls.
        calls: usize,
    },
    /// `step` called out of order (multistep schedulers keep history).
    #[error("step for UNet call {got} requested, expected call {expected} next")]
    OutOfOrder {
        /// The next call in order.
        expected: usize,
        /// The index given.
        got: usize,
    },
    /// Tensors that must share a shape do not.
    #[error("{what}: expected shape {expected:?}, got {actual:?}")]
    Shape {
        /// Which tensor.
        what: &'static str,
        /// The sample's shape.
        expected: Vec<usize>,
        /// Its shape.
        actual: Vec<usize>,
    },
}

/// Call bookkeeping shared by every scheduler: range checks and order.
#[derive(Debug, Clone)]
struct Calls {
    next: usize,
    total: usize,
}

impl Calls {
    fn new(total: usize) -> Self {
        Self { next: 0, total }
    }

    fn check_range(&self, call: usize) -> Result<(), SchedulerError> {
        if call >= self.total {
            return Err(SchedulerError::CallOutOfRange {
                call,
                calls: self.total,
            });
        }
        Ok(())
    }

    /// Checks that `call` is the next step and the tensors agree in shape.
    fn begin(
        &self,
        call: usize,
        model_output: &ArrayViewD<'_, f32>,
        sample: &ArrayViewD<'_, f32>,
    ) -> Result<(), SchedulerError> {
        self.check_range(call)?;
        if call != self.next {
            return Err(SchedulerError::OutOfOrder {
                expected: self.next,
                got: call,
            });
        }
        same_shape("model_output", sample.shape(), model_output.shape())
    }

    fn finish(&mut self) {
        self.next += 1;
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
fn draw_noise(
    noise: &mut dyn FnMut(&[usize]) -> ArrayD<f32>,
    shape: &[usize],
) -> Result<ArrayD<f32>, SchedulerError> {
    let z = noise(shape);
    same_shape("noise", shape, z.shape())?;
    Ok(z)
}

/// x/√(σ² + 1), the UNet input of the σ-parameterised schedulers (float32
/// like diffusers: the divisor is rounded to f32 first).
fn scale_by_sigma(sample: ArrayViewD<'_, f32>, sigma: f64) -> ArrayD<f32> {
    let s = sigma as f32;
    let d = (s * s + 1.0).sqrt();
    sample.mapv(|x| x / d)
}

/// x₀ predicted from the model output at noise level σ (x = x₀ + σε
/// parameterisation), float32 as diffusers' Euler and LMS compute it.
fn sigma_x0(
    prediction: PredictionType,
    model_output: &ArrayViewD<'_, f32>,
    sample: &ArrayViewD<'_, f32>,
    sigma: f64,
) -> ArrayD<f32> {
    let s = sigma as f32;
    match prediction {
        PredictionType::Epsilon => ndarray::Zip::from(sample)
            .and(model_output)
            .map_collect(|&x, &e| x - s * e),
        PredictionType::VPrediction => {
            let c_out = -s / (s * s + 1.0).sqrt();
            let c_skip = 1.0 / (s * s + 1.0);
            ndarray::Zip::from(sample)
                .and(model_output)
                .map_collect(|&x, &v| v * c_out + x * c_skip)
        }
        PredictionType::Sample => model_output.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD1: &str = r#"{
        "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "num_train_timesteps": 1000, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null
    }"#;

    #[test]
    fn kinds_parse_from_cli_and_class_names() {
        for k in SchedulerKind::ALL {
            assert_eq!(k.cli_name().parse::<SchedulerKind>().unwrap(), k);
            assert_eq!(k.class_name().parse::<SchedulerKind>().unwrap(), k);
        }
        assert!(matches!(
            "heun".parse::<SchedulerKind>(),
            Err(SchedulerError::UnknownScheduler { name }) if name == "heun"
        ));
    }

    #[test]
    fn python_non_finite_floats_are_read() {
        let c = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "variance_type": null, "prediction_type": "epsilon", "x": "NaN in a string"}"#,
        )
        .unwrap();
        assert_eq!(c.lambda_min_clipped, Some(f64::NEG_INFINITY));
        assert_eq!(c.kind().unwrap(), SchedulerKind::DpmSolverMultistep);
        let v = python_json(r#"{"a": "say \"NaN\"", "b": NaN}"#).unwrap();
        assert_eq!(v["a"], "say \"NaN\"");
        assert_eq!(v["b"], "NaN");
    }

    #[test]
    fn defaults_are_per_class() {
        let c = SchedulerConfig::from_json_str(SD1).unwrap();
        let spacing = |k| c.resolve(k).unwrap().timestep_spacing;
        assert_eq!(spacing(SchedulerKind::Pndm), TimestepSpacing::Leading);
        assert_eq!(spacing(SchedulerKind::Ddim), TimestepSpacing::Leading);
        for k in [
            SchedulerKind::Euler,
            SchedulerKind::EulerAncestral,
            SchedulerKind::Lms,
            SchedulerKind::DpmSolverMultistep,
        ] {
            assert_eq!(spacing(k), TimestepSpacing::Linspace);
        }
        // DDIM's own defaults (clip_sample, set_alpha_to_one true) are
        // overridden by the SD file, which has both false.
        let ddim = c.resolve(SchedulerKind::Ddim).unwrap();
        assert_eq!(ddim.clip_sample, None);
        assert!(!ddim.set_alpha_to_one);
        let bare = SchedulerConfig::default()
            .resolve(SchedulerKind::Ddim)
            .unwrap();
        assert_eq!(bare.clip_sample, Some(1.0));
        assert!(bare.set_alpha_to_one);
    }

    #[test]
    fn unsupported_and_invalid_values_name_themselves() {
        let mut c = SchedulerConfig::from_json_str(SD1).unwrap();
        c.use_karras_sigmas = Some(true);
        let e = c.resolve(SchedulerKind::Euler).unwrap_err().to_string();
        assert!(
            e.contains("use_karras_sigmas") && e.contains("not supported"),
            "{e}"
        );
        // Euler ancestral does not take the key: ignored, as in diffusers.
        assert!(c.resolve(SchedulerKind::EulerAncestral).is_ok());
        c.use_karras_sigmas = None;
        c.timestep_spacing = Some("quadratic".into());
        let e = c.resolve(SchedulerKind::Ddim).unwrap_err().to_string();
        assert!(
            e.contains("quadratic") && e.contains("timestep_spacing"),
            "{e}"
        );
        c.timestep_spacing = None;
        c.skip_prk_steps = None;
        assert!(matches!(
            c.resolve(SchedulerKind::Pndm),
            Err(SchedulerError::Unsupported {
                key: "skip_prk_steps",
                ..
            })
        ));
        assert!(c.resolve(SchedulerKind::Ddim).is_ok());
    }

    #[test]
    fn build_rejects_bad_steps_and_eta() {
        let c = SchedulerConfig::from_json_str(SD1).unwrap();
        assert!(matches!(
            build(&c, SchedulerKind::Euler, 0, 0.0),
            Err(SchedulerError::Steps { steps: 0, .. })
        ));
        assert!(matches!(
            build(&c, SchedulerKind::Euler, 10, 0.5),
            Err(SchedulerError::Eta { .. })
        ));
        assert!(build(&c, SchedulerKind::Ddim, 10, 0.5).is_ok());
        // leading + steps_offset 1 at 1000 steps reaches t = 1000, past ᾱ
        // (an IndexError in diffusers)
        assert!(matches!(
            build(&c, SchedulerKind::Ddim, 1000, 0.0),
            Err(SchedulerError::TimestepOutOfRange { timestep: 1000, .. })
        ));
        assert!(build(&c, SchedulerKind::Euler, 1000, 0.0).is_ok());
        assert!(matches!(
            build(&c, SchedulerKind::Ddim, 1001, 0.0),
            Err(SchedulerError::Steps { .. })
        ));
    }

    #[test]
    fn steps_offset_past_the_schedule_is_an_error() {
        let mut c = SchedulerConfig::from_json_str(SD1).unwrap();
        c.steps_offset = Some(200);
        let r = build(&c, SchedulerKind::Ddim, 10, 0.0);
        assert!(
            matches!(
                r,
                Err(SchedulerError::TimestepOutOfRange { timestep: 1100, .. })
            ),
            "{r:?}"
        );
    }

    #[test]
    fn hostile_numbers_are_errors_not_panics() {
        let mut c = SchedulerConfig::from_json_str(SD1).unwrap();
        for offset in [i64::MAX, i64::MIN] {
            c.steps_offset = Some(offset);
            for kind in [SchedulerKind::Pndm, SchedulerKind::Ddim] {
                assert!(matches!(
                    build(&c, kind, 10, 0.0),
                    Err(SchedulerError::TimestepOutOfRange { .. })
                ));
            }
            // σ schedulers clamp like np.interp, as diffusers does
            assert!(build(&c, SchedulerKind::DpmSolverMultistep, 10, 0.0).is_ok());
            assert!(build(&c, SchedulerKind::Euler, 10, 0.0).is_ok());
        }
        let c =
            SchedulerConfig::from_json_str(r#"{"num_train_timesteps": 1000000000000}"#).unwrap();
        assert!(matches!(
            c.resolve(SchedulerKind::Euler),
            Err(SchedulerError::InvalidValue {
                key: "num_train_timesteps",
                ..
            })
        ));
        let c = SchedulerConfig::from_json_str(r#"{"trained_betas": [0.1, 1.5]}"#).unwrap();
        assert!(matches!(
            build(&c, SchedulerKind::Euler, 1, 0.0),
            Err(SchedulerError::TrainedBetasLength {
                expected: 1000,
                actual: 2
            })
        ));
        let c = SchedulerConfig::from_json_str(
            r#"{"num_train_timesteps": 2, "trained_betas": [0.1, 1.5]}"#,
        )
        .unwrap();
        assert!(matches!(
            build(&c, SchedulerKind::Euler, 1, 0.0),
            Err(SchedulerError::InvalidBeta { index: 1, .. })
        ));
        assert!(matches!(
            SchedulerConfig::from_json_str(r#"{"steps_offset": "one"}"#),
            Err(SchedulerError::Json(_))
        ));
    }

    #[test]
    fn calls_must_come_in_order_with_matching_shapes() {
        let c = SchedulerConfig::from_json_str(SD1).unwrap();
        let mut s = build(&c, SchedulerKind::Lms, 4, 0.0).unwrap();
        let x = ArrayD::<f32>::zeros(vec![1, 4, 2, 2]);
        let bad = ArrayD::<f32>::zeros(vec![1, 4, 2, 3]);
        let mut no_noise = |_: &[usize]| -> ArrayD<f32> { unreachable!() };
        assert!(matches!(
            s.step(x.view(), 1, x.view(), &mut no_noise),
            Err(SchedulerError::OutOfOrder {
                expected: 0,
                got: 1
            })
        ));
        assert!(matches!(
            s.step(bad.view(), 0, x.view(), &mut no_noise),
            Err(SchedulerError::Shape { .. })
        ));
        assert!(matches!(
            s.scale_model_input(x.view(), 4),
            Err(SchedulerError::CallOutOfRange { call: 4, calls: 4 })
        ));
        assert!(s.step(x.view(), 0, x.view(), &mut no_noise).is_ok());
    }
}
