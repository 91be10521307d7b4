//! Finding and loading the ONNX Runtime shared library.
//!
//! `ort` is built with `load-dynamic`: nothing is linked at build time and the
//! library is opened on first use. Left to itself `ort` would panic when the
//! library is missing; we look for it ourselves, in a documented order, and turn
//! every failure into an error that lists where we looked and how to fix it.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The environment variable that names the library file explicitly.
pub const DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// File name of the library on this platform (the SONAME on Linux).
pub const LIB_NAME: &str = if cfg!(target_os = "windows") {
    "onnxruntime.dll"
} else if cfg!(target_os = "macos") {
    "libonnxruntime.dylib"
} else {
    "libonnxruntime.so.1"
};

/// Where `scripts/setup.sh` unpacks the library, fixed when this binary was built.
const SETUP_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/third_party/onnxruntime");

/// The command that installs the library.
const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup.sh");

/// Why ONNX Runtime could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// None of the candidate files exists.
    #[error(
        "ONNX Runtime library not found (looked in: {}); run {FIX} or set {DYLIB_ENV} to the path of {LIB_NAME}",
        .tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound {
        /// Every place that was tried, in order.
        tried: Vec<PathBuf>,
    },
    /// A file was found but could not be used (wrong format, too old, missing symbols).
    #[error("cannot use ONNX Runtime library {path}: {source}; run {FIX} or set {DYLIB_ENV}")]
    Unusable {
        /// The file that failed.
        path: PathBuf,
        /// What `ort` reported.
        #[source]
        source: ort::LoadDynamicError,
    },
    /// The library loaded but the environment could not be created.
    #[error("ONNX Runtime failed to start: {0}")]
    Environment(#[source] ort::Error),
}

/// Where the library is looked for, in order: `$ORT_DYLIB_PATH`; beside the
/// running executable; the project's setup folder; the system search path
/// (a bare file name, resolved by the dynamic loader).
pub fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os(DYLIB_ENV).filter(|p| !p.is_empty()) {
        out.push(PathBuf::from(p));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        out.push(dir.join(LIB_NAME));
    }
    out.push(Path::new(SETUP_DIR).join(LIB_NAME));
    out.push(PathBuf::from(LIB_NAME));
    out
}

/// Loads ONNX Runtime and creates the environment sessions are built from.
///
/// ONNX Runtime allows one environment per process, ever: the first success
/// is kept and every later call shares it. Failures are not kept, so a caller
/// may fix the environment variable and try again.
///
/// Returns the environment and the library path it came from.
pub fn load() -> Result<(ort::environment::Environment, PathBuf), LoadError> {
    static LOADED: Mutex<Option<(ort::environment::Environment, PathBuf)>> = Mutex::new(None);
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(found) = loaded.as_ref() {
        return Ok(found.clone());
    }
    let found = search()?;
    *loaded = Some(found.clone());
    Ok(found)
}

fn search() -> Result<(ort::environment::Environment, PathBuf), LoadError> {
    let candidates = candidates();
    // An explicit path is the only candidate when given: silently using another
    // library than the one the user named would hide their mistake.
    let explicit = std::env::var_os(DYLIB_ENV).is_some_and(|p| !p.is_empty());
    let to_try: &[PathBuf] = if explicit {
        &candidates[..1]
    } else {
        &candidates
    };
    for path in to_try {
        let is_bare = path.components().count() == 1;
        if !is_bare && !path.exists() {
            continue;
        }
        return match ort::init_from(path) {
            Ok(builder) => {
                let env = builder
                    .with_name("time-onnx")
                    .build()
                    .map_err(LoadError::Environment)?;
                tracing::debug!(path = %path.display(), "loaded ONNX Runtime");
                Ok((env, path.clone()))
            }
            // The loader's own search failing just means "not on the system path".
            Err(ort::LoadDynamicError::Dlopen { .. }) if is_bare => continue,
            Err(source) => Err(LoadError::Unusable {
                path: path.clone(),
                source,
            }),
        };
    }
    Err(LoadError::NotFound {
        tried: to_try.to_vec(),
    })
}
