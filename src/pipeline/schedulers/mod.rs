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
//! Randomness is explicit: only DDIM with η > 0, Euler ancestral and LCM
//! draw from the `noise` function, once per call (LCM: but the last), with
//! the sample's shape; the others never call it. Tests pass recorded noise; the generator passes
//! [`crate::pipeline::rng::Rng::randn`].
//!
//! Each scheduler file holds only its update rule and the history it keeps;
//! the plan every scheduler fixes at build time (timesteps, σ, initial noise
//! scale) and the order and shape checks of each call are shared (`plan`),
//! and so is the noise schedule (`schedule`: betas, ᾱ, σ, spacings).
//!
//! # Configuration and switching scheduler
//!
//! [`SchedulerConfig`] (`config`) reads `scheduler/scheduler_config.json` as diffusers
//! writes it: field names are diffusers' own, unknown keys are ignored, every
//! field is optional, and Python's `NaN`/`Infinity`/`-Infinity` (DPM-Solver
//! configs save `"lambda_min_clipped": -Infinity`) are accepted.
//! [`SchedulerConfig::resolve`] (`settings`) then gives the [`Settings`] of one class,
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

mod config;
mod error;
mod plan;
mod settings;

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;
mod lcm;
mod lms;
mod pndm;

use std::fmt;
use std::str::FromStr;

pub use config::{SchedulerConfig, python_json};
pub use error::SchedulerError;
pub use plan::Scheduler;
pub use schedule::{BetaSchedule, BetaSource, NoiseSchedule, TimestepSpacing};
pub use settings::{
    DpmSettings, FinalSigmas, InterpolationType, LcmSettings, PredictionType, Settings, SolverType,
    TimestepType,
};

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
) -> Result<Scheduler, SchedulerError> {
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
    match kind {
        SchedulerKind::Pndm => pndm::new(&settings, steps),
        SchedulerKind::Ddim => ddim::new(&settings, steps, eta),
        SchedulerKind::Euler => euler::new(&settings, steps),
        SchedulerKind::EulerAncestral => euler_ancestral::new(&settings, steps),
        SchedulerKind::Lms => lms::new(&settings, steps),
        SchedulerKind::DpmSolverMultistep => dpmpp_2m::new(&settings, steps),
        SchedulerKind::Lcm => lcm::new(&settings, steps),
    }
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
    /// `LCMScheduler` (`lcm`): latent consistency models' sampler, for
    /// LCM-distilled UNets; stochastic.
    Lcm,
}

impl SchedulerKind {
    /// Every kind, in CLI listing order.
    pub const ALL: [SchedulerKind; 7] = [
        Self::Pndm,
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::Lms,
        Self::DpmSolverMultistep,
        Self::Lcm,
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
            Self::Lcm => "LCMScheduler",
        }
    }

    /// Whether its steps draw noise (with DDIM's η at 0): such images depend
    /// on the batch they were drawn in, so a server never batches them.
    pub fn draws_noise(self) -> bool {
        matches!(self, Self::EulerAncestral | Self::Lcm)
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
            Self::Lcm => "lcm",
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

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::ArrayD;

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
    fn lcm_keys_are_checked_and_its_spacing_does_not_matter() {
        let mut c = SchedulerConfig::from_json_str(SD1).unwrap();
        c.thresholding = Some(true);
        assert!(matches!(
            build(&c, SchedulerKind::Lcm, 4, 0.0),
            Err(SchedulerError::Unsupported {
                key: "thresholding",
                ..
            })
        ));
        c.thresholding = None;
        c.timestep_scaling = Some(f64::NAN);
        assert!(matches!(
            build(&c, SchedulerKind::Lcm, 4, 0.0),
            Err(SchedulerError::InvalidValue {
                key: "timestep_scaling",
                ..
            })
        ));
        c.timestep_scaling = None;
        c.original_inference_steps = Some(2000);
        assert!(matches!(
            build(&c, SchedulerKind::Lcm, 4, 0.0),
            Err(SchedulerError::InvalidValue {
                key: "original_inference_steps",
                ..
            })
        ));
        c.original_inference_steps = Some(8);
        let e = build(&c, SchedulerKind::Lcm, 9, 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most original_inference_steps (8)"), "{e}");
        // diffusers' LCMScheduler ignores timestep_spacing and steps_offset
        let a = build(&c, SchedulerKind::Lcm, 4, 0.0).unwrap();
        c.timestep_spacing = Some("trailing".into());
        c.steps_offset = Some(7);
        let b = build(&c, SchedulerKind::Lcm, 4, 0.0).unwrap();
        assert_eq!(a.timesteps(), b.timesteps());
        assert!(SchedulerKind::Lcm.draws_noise());
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
