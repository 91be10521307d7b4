//! ONNX Runtime: loading the library, creating sessions, execution providers.

pub mod library;
pub mod tensors;

pub use library::LoadError;

use std::path::{Path, PathBuf};

/// A loaded ONNX Runtime and its environment; sessions are created from it.
/// Cloning shares the environment.
#[derive(Clone)]
pub struct Runtime {
    env: ort::environment::Environment,
    library: PathBuf,
}

impl Runtime {
    /// Finds and loads the ONNX Runtime library (see [`library::candidates`]).
    pub fn load() -> Result<Self, LoadError> {
        let (env, library) = library::load()?;
        Ok(Self { env, library })
    }

    /// The library file this runtime was loaded from.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// ONNX Runtime's build description ("ORT Build Info: git-branch=rel-1.31.1, ...").
    pub fn build_info(&self) -> &'static str {
        ort::info()
    }

    /// The environment sessions are built from.
    pub fn environment(&self) -> &ort::environment::Environment {
        &self.env
    }
}

impl Runtime {
    /// Registers the CUDA execution provider on a throwaway session builder,
    /// failing (rather than falling back to CPU as ort would) when it cannot start.
    pub fn cuda_check(&self) -> Result<(), ort::Error> {
        let builder = ort::session::Session::builder(&self.env)?;
        builder
            .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
            .map_err(ort::Error::<()>::from)?;
        Ok(())
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
    /// `--device cuda` was asked for and the CUDA provider did not start.
    #[error(
        "{path}: the CUDA execution provider did not start (run `time-onnx doctor`, or use --device cpu)"
    )]
    Cuda {
        /// The model file.
        path: PathBuf,
        /// ONNX Runtime's message.
        #[source]
        source: ort::Error,
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

/// Where models run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    /// CUDA when its provider starts, CPU otherwise (with a warning saying why).
    #[default]
    Auto,
    /// CUDA or an error.
    Cuda,
    /// CPU only.
    Cpu,
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
}

impl Runtime {
    /// Opens a session for `path` on the CPU provider with default options.
    pub fn session(&self, path: &Path) -> Result<ort::session::Session, SessionError> {
        self.session_with(
            path,
            SessionOptions {
                device: Device::Cpu,
                ..SessionOptions::default()
            },
        )
    }

    /// Opens a session for `path` as `opts` say.
    pub fn session_with(
        &self,
        path: &Path,
        opts: SessionOptions,
    ) -> Result<ort::session::Session, SessionError> {
        self.builder(path, opts)?
            .commit_from_file(path)
            .map_err(|source| ort_error(path, source))
    }

    /// Opens a session for a model held in memory, `bytes`, derived from the
    /// file `path`: its external data is read from `path`'s folder, and errors
    /// name `path`.
    pub fn session_from_bytes(
        &self,
        path: &Path,
        bytes: &[u8],
        opts: SessionOptions,
    ) -> Result<ort::session::Session, SessionError> {
        let folder = crate::staged::folder_of(path);
        self.builder(path, opts)?
            .with_config_entry(
                "session.model_external_initializers_file_folder_path",
                folder.to_string_lossy(),
            )
            .map_err(|e| ort_error(path, e.into()))?
            .commit_from_memory(bytes)
            .map_err(|source| ort_error(path, source))
    }

    /// A session builder configured as `opts` say.
    ///
    /// ort falls back to CPU silently when a provider fails to register; we
    /// register CUDA with `error_on_failure` and decide ourselves, so `--device
    /// cuda` fails loudly and `auto` says why it fell back.
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
        if opts.device != Device::Cpu {
            let cuda = ort::ep::CUDA::default().build().error_on_failure();
            match builder.with_execution_providers([cuda]) {
                Ok(b) => {
                    tracing::info!(model = %path.display(), "running on CUDA");
                    builder = b;
                }
                Err(e) if opts.device == Device::Auto => {
                    tracing::warn!("CUDA unavailable, running on CPU: {e}");
                    builder = e.recover();
                }
                Err(e) => {
                    return Err(SessionError::Cuda {
                        path: path.to_path_buf(),
                        source: e.into(),
                    });
                }
            }
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
