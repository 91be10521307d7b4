//! Everything that can stop building or running a scheduler.

use std::path::PathBuf;

use super::SchedulerKind;

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
        "unknown scheduler {name:?}: expected one of pndm, ddim, euler, euler-a, lms, dpm++2m, \
         lcm or their diffusers class names"
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
    /// More LCM steps than its distillation schedule has timesteps.
    #[error(
        "{steps} inference steps requested, but LCM takes at most original_inference_steps \
         ({original}) steps"
    )]
    LcmSteps {
        /// Steps asked for.
        steps: usize,
        /// `original_inference_steps`.
        original: usize,
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
