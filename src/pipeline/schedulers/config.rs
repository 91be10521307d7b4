//! `scheduler_config.json` as diffusers writes it, read without loss: field
//! names are diffusers' own, unknown keys are ignored, every field is
//! optional, and Python's `NaN`/`Infinity`/`-Infinity` are accepted.
//! [`SchedulerConfig::resolve`] (in `settings`) turns it into one class's
//! settings.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use super::{SchedulerError, SchedulerKind};

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
    /// LCM: the distillation schedule's step count (default 50).
    pub original_inference_steps: Option<usize>,
    /// LCM: timesteps are multiplied by this in the boundary conditions
    /// (default 10).
    #[serde(deserialize_with = "python_float")]
    pub timestep_scaling: Option<f64>,
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
}
