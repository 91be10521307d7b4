//! ONNX Runtime: loading the library, creating sessions, execution providers.

pub mod library;

pub use library::LoadError;

use std::path::{Path, PathBuf};

/// A loaded ONNX Runtime and its environment; sessions are created from it.
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
    /// The model's inputs or outputs are not what its role needs.
    #[error("{path}: {why}")]
    Interface {
        /// The model file.
        path: PathBuf,
        /// What does not fit.
        why: String,
    },
}

impl Runtime {
    /// Opens a session for `path` on the CPU provider.
    pub fn session(&self, path: &Path) -> Result<ort::session::Session, SessionError> {
        let err = |source: ort::Error| SessionError::Ort {
            path: path.to_path_buf(),
            source,
        };
        ort::session::Session::builder(&self.env)
            .map_err(err)?
            .commit_from_file(path)
            .map_err(err)
    }
}
