//! ONNX Runtime: loading the library, choosing the device, opening sessions.
//! The only module that knows `ort`; everything else sees [`Session`].

pub mod library;
mod session;

pub use library::LoadError;
pub use session::{Binding, ElementType, Outputs, Port, Session, Value};

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::onnx::upcast::Given;

/// A loaded ONNX Runtime and its environment; sessions are created from it.
/// Cloning shares the environment and the device decision.
#[derive(Clone)]
pub struct Runtime {
    env: ort::environment::Environment,
    library: PathBuf,
    /// Whether the CUDA provider starts, asked once: `Err` holds why not.
    cuda: Arc<OnceLock<Result<(), String>>>,
}

/// Where a session runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA when its provider starts, CPU otherwise.
    #[default]
    Auto,
    /// CUDA or an error.
    Cuda,
    /// CPU only.
    Cpu,
}

/// The device `Auto` became, and why not CUDA when it fell back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceChoice {
    /// [`Device::Cpu`] or [`Device::Cuda`].
    pub device: Device,
    /// Why CUDA was not chosen for `Auto` although this build of ONNX Runtime
    /// has its provider (ONNX Runtime's message).
    pub cuda_unavailable: Option<String>,
}

impl Runtime {
    /// Finds and loads the ONNX Runtime library (see [`library::candidates`]).
    pub fn load() -> Result<Self, LoadError> {
        let (env, library) = library::load()?;
        Ok(Self {
            env,
            library,
            cuda: Arc::default(),
        })
    }

    /// The library file this runtime was loaded from.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// ONNX Runtime's build description ("ORT Build Info: git-branch=rel-1.31.1, ...").
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }

    /// Whether this build of ONNX Runtime has the CUDA provider at all.
    pub fn cuda_in_build(&self) -> Result<bool, String> {
        use ort::ep::ExecutionProvider;
        ort::ep::CUDA::is_available().map_err(|e| e.to_string())
    }

    /// Whether the CUDA provider starts here: registered on a throwaway
    /// session builder with `error_on_failure` (ort would otherwise fall back
    /// to CPU silently). Asked once per runtime.
    pub fn cuda_check(&self) -> Result<(), String> {
        self.cuda
            .get_or_init(|| {
                let builder =
                    ort::session::Session::builder(&self.env).map_err(|e| e.to_string())?;
                builder
                    .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                    .map(drop)
                    .map_err(|e| ort::Error::<()>::from(e).to_string())
            })
            .clone()
    }

    /// Decides `Auto` (once per runtime); `Cuda` and `Cpu` stay as asked.
    /// With a build of ONNX Runtime that has no CUDA provider, `Auto` is
    /// simply the CPU: nothing failed, so there is nothing to report.
    pub fn choose_device(&self, requested: Device) -> DeviceChoice {
        match requested {
            Device::Auto if self.cuda_in_build() == Ok(false) => DeviceChoice {
                device: Device::Cpu,
                cuda_unavailable: None,
            },
            Device::Auto => match self.cuda_check() {
                Ok(()) => DeviceChoice {
                    device: Device::Cuda,
                    cuda_unavailable: None,
                },
                Err(why) => DeviceChoice {
                    device: Device::Cpu,
                    cuda_unavailable: Some(why),
                },
            },
            other => DeviceChoice {
                device: other,
                cuda_unavailable: None,
            },
        }
    }

    /// Whether sessions built with `opts` run on the CPU.
    pub fn on_cpu(&self, opts: SessionOptions) -> bool {
        self.choose_device(opts.device).device == Device::Cpu
    }
}

/// Why a model could not be opened or run.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// ONNX Runtime refused the model or failed while running it.
    #[error("{path}: {source}")]
    Ort {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        #[source]
        source: ort::Error,
    },
    /// CUDA was asked for and its execution provider did not start.
    #[error("{path}: the CUDA execution provider did not start")]
    Cuda {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        #[source]
        source: ort::Error,
    },
    /// The model uses ONNX Runtime contrib operators that only the CUDA
    /// provider implements (ORT-optimized UNets: packed K/V attention,
    /// NhwcConv, GroupNorm).
    #[error(
        "{path}: this UNet was optimized by ONNX Runtime's transformer optimizer for GPUs and uses \
         operators the CPU provider lacks ({refusal})"
    )]
    GpuOnlyOperators {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's refusal (quoted, not a source: the message is whole).
        refusal: ort::Error,
    },
    /// The model's inputs or outputs are not what its role needs.
    #[error("{path}: {why}")]
    Interface {
        /// The model file.
        path: PathBuf,
        /// What does not fit.
        why: String,
    },
}

/// How much ONNX Runtime rewrites a graph when it loads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GraphOptimization {
    /// Fusions and constant folding (ORT's "extended" level). The default:
    /// measured on SD 1.x's UNet on 2 cores it loads in ~1.4 s instead of
    /// 4–8 s, for steps ~1 % slower (~4 % when the guided batch runs as one
    /// run), which pays off below several hundred UNet calls.
    #[default]
    Extended,
    /// Also CPU layout transforms (NCHWc): slower to load, a little faster per
    /// call. ORT's own default, and diffusers'.
    All,
}

/// How sessions are built.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionOptions {
    /// Execution provider choice.
    pub device: Device,
    /// Intra-op threads; `None` lets ONNX Runtime choose (one per core).
    pub threads: Option<usize>,
    /// Graph optimization level.
    pub optimization: GraphOptimization,
    /// The session will run a few times only: skip ONNX Runtime's
    /// pre-packing of weights at load. For SDXL's second text encoder this
    /// takes its session from 4.5 s to 0.3 s for a run of 8 prompts 0.9 s
    /// slower (measured on 2 cores), a win below a handful of runs.
    pub few_runs: bool,
}

impl Runtime {
    /// Opens a session for the model file `path` as `opts` say.
    pub fn open(&self, path: &Path, opts: SessionOptions) -> Result<Session, SessionError> {
        let inner = self
            .builder(path, opts)?
            .commit_from_file(path)
            .map_err(|source| ort_error(path, source))?;
        Ok(Session::new(path, inner))
    }

    /// Opens a session for a model held in memory, `bytes`, derived from the
    /// file `path`: its external data is read from `path`'s folder, and errors
    /// name `path`. The `given` weights live as long as the session. Below
    /// the "all" level they are handed over as they are, not copied
    /// (`AddInitializer`); but those take their place only once the graph is
    /// optimized, and the "all" level's layout transforms read weights while
    /// optimizing, so there they go in as external data instead
    /// (`AddExternalInitializers`), which ONNX Runtime copies.
    pub fn open_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        opts: SessionOptions,
        given: Vec<Given>,
    ) -> Result<Session, SessionError> {
        let err = |e: ort::Error| ort_error(path, e);
        let folder = crate::staged::folder_of(path);
        let mut builder = self
            .builder(path, opts)?
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                folder.to_string_lossy(),
            )
            .map_err(|e| err(e.into()))?;
        let during_optimization = opts.optimization == GraphOptimization::All;
        for g in given {
            let value = ort::value::Tensor::from_array((g.shape, g.values))
                .map_err(err)?
                .into_dyn();
            builder = if during_optimization {
                builder.with_external_initializer(&g.name, value)
            } else {
                builder.with_initializer(&g.name, value)
            }
            .map_err(|e| err(e.into()))?;
        }
        let inner = builder.commit_from_memory(bytes).map_err(err)?;
        Ok(Session::new(path, inner))
    }

    /// A session builder configured as `opts` say. CUDA is registered with
    /// `error_on_failure`, so asking for it fails loudly instead of running
    /// on the CPU behind the user's back.
    fn builder(
        &self,
        path: &Path,
        opts: SessionOptions,
    ) -> Result<ort::session::builder::SessionBuilder, SessionError> {
        let err = |source: ort::Error| ort_error(path, source);
        let mut builder = ort::session::Session::builder(&self.env).map_err(err)?;
        if let Some(n) = opts.threads {
            builder = builder.with_intra_threads(n).map_err(|e| err(e.into()))?;
        }
        let level = match opts.optimization {
            GraphOptimization::Extended => ort::session::builder::GraphOptimizationLevel::Level2,
            GraphOptimization::All => ort::session::builder::GraphOptimizationLevel::All,
        };
        builder = builder
            .with_optimization_level(level)
            .map_err(|e| err(e.into()))?;
        if opts.few_runs {
            builder = builder
                .with_config_entry("session.disable_prepacking", "1")
                .map_err(|e| err(e.into()))?;
        }
        if self.choose_device(opts.device).device == Device::Cuda {
            let cuda = ort::ep::CUDA::default().build().error_on_failure();
            builder = builder
                .with_execution_providers([cuda])
                .map_err(|e| SessionError::Cuda {
                    path: path.to_path_buf(),
                    source: e.into(),
                })?;
            tracing::info!(model = %path.display(), "running on CUDA");
        }
        Ok(builder)
    }
}

fn ort_error(path: &Path, source: ort::Error) -> SessionError {
    SessionError::Ort {
        path: path.to_path_buf(),
        source,
    }
}
