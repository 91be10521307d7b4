//! Opening an ONNX file: memory map, decode, locate tensor bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use bytes::Bytes;
use prost::Message;

use super::proto::{DATA_LOCATION_EXTERNAL, GraphProto, ModelProto, TensorProto};
use super::{DataType, OnnxError};

/// An ONNX model opened read-only.
///
/// The file is memory-mapped and decoded with zero-copy `raw_data`, so a
/// multi-gigabyte single-file model costs address space, not memory.
pub struct Model {
    path: PathBuf,
    dir: PathBuf,
    file: Bytes,
    proto: ModelProto,
    external: Mutex<HashMap<PathBuf, Bytes>>,
}

/// Where a tensor's bytes are stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `raw_data` inside the model file, at this byte range of the file.
    Inline {
        /// Byte offset in the model file.
        offset: u64,
    },
    /// An external data file, `location` relative to the model's folder.
    External {
        /// The `location` entry as written in the model.
        location: String,
        /// Byte offset in that file.
        offset: u64,
    },
    /// Typed fields (`float_data`, `int64_data`, ...) rather than raw bytes.
    Typed,
}

/// What a tensor is: element type, shape, size, and where its bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Initializer name.
    pub name: String,
    /// Element type.
    pub dtype: DataType,
    /// Dimensions, validated non-negative.
    pub shape: Vec<usize>,
    /// Byte length of the data (`elements × element size`).
    pub nbytes: u64,
    /// Where the bytes are.
    pub storage: Storage,
}

impl Model {
    /// Maps and decodes `path`. External data is not touched until asked for.
    pub fn open(path: &Path) -> Result<Self, OnnxError> {
        let io = |source| OnnxError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len == 0 {
            return Err(OnnxError::Empty {
                path: path.to_path_buf(),
            });
        }
        // SAFETY: the map is read-only. Another process truncating the file
        // while we run is outside what any reader can defend against; we never
        // write to an input.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_bytes(path, Bytes::from_owner(map))
    }

    /// Decodes a model already in memory, as if read from `path`: external
    /// data is looked up beside `path`, and errors name it. Used by the
    /// fuzzers, which feed bytes without a file per input.
    pub fn from_bytes(path: &Path, file: Bytes) -> Result<Self, OnnxError> {
        let proto = ModelProto::decode(file.clone()).map_err(|source| OnnxError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            dir,
            file,
            proto,
            external: Mutex::new(HashMap::new()),
        })
    }

    /// The file this model was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole model file, as mapped.
    pub fn file_bytes(&self) -> &Bytes {
        &self.file
    }

    /// The decoded model.
    pub fn proto(&self) -> &ModelProto {
        &self.proto
    }

    /// The main graph; a model without one is an error.
    pub fn graph(&self) -> Result<&GraphProto, OnnxError> {
        self.proto.graph.as_ref().ok_or_else(|| OnnxError::NoGraph {
            path: self.path.clone(),
        })
    }

    /// The declared dims of graph input `name`: `Some(n)` where the export
    /// fixes a dimension, `None` where it is symbolic or missing. `None` when
    /// there is no such tensor input.
    pub fn input_dims(&self, name: &str) -> Option<Vec<Option<usize>>> {
        use super::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
        let input = self.graph().ok()?.input.iter().find(|i| i.name == name)?;
        let Some(Value::TensorType(t)) = input.r#type.as_ref()?.value.as_ref() else {
            return None;
        };
        let fixed = |d: &super::proto::tensor_shape_proto::Dimension| match d.value.as_ref() {
            Some(Dim::DimValue(v)) if *v > 0 => usize::try_from(*v).ok(),
            _ => None,
        };
        Some(t.shape.as_ref()?.dim.iter().map(fixed).collect())
    }

    /// Validates a tensor's header and finds its bytes.
    pub fn tensor_info(&self, t: &TensorProto) -> Result<TensorInfo, OnnxError> {
        let bad = |why: String| OnnxError::BadTensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            why,
        };
        let dtype = DataType::from_i32(t.data_type);
        let elem = dtype
            .size()
            .ok_or_else(|| bad(format!("unsupported element type {dtype}")))?;
        let mut shape = Vec::with_capacity(t.dims.len());
        let mut count: u64 = 1;
        for &d in &t.dims {
            let d = u64::try_from(d).map_err(|_| bad(format!("negative dimension {d}")))?;
            count = count
                .checked_mul(d)
                .ok_or_else(|| bad("element count overflows".into()))?;
            shape.push(usize::try_from(d).map_err(|_| bad(format!("dimension {d} too large")))?);
        }
        let nbytes = count
            .checked_mul(elem as u64)
            .ok_or_else(|| bad("byte length overflows".into()))?;

        let storage = if t.data_location == DATA_LOCATION_EXTERNAL {
            let ext = ExternalRef::parse(t).map_err(bad)?;
            if ext.length.is_some_and(|l| l != nbytes) {
                return Err(bad(format!(
                    "external length {} does not match {nbytes} bytes for {dtype} {shape:?}",
                    ext.length.unwrap_or_default()
                )));
            }
            Storage::External {
                location: ext.location,
                offset: ext.offset,
            }
        } else if !t.raw_data.is_empty() || nbytes == 0 {
            if t.raw_data.len() as u64 != nbytes {
                return Err(bad(format!(
                    "raw_data has {} bytes, {dtype} {shape:?} needs {nbytes}",
                    t.raw_data.len()
                )));
            }
            Storage::Inline {
                offset: self
                    .offset_in_file(&t.raw_data)
                    .ok_or_else(|| bad("raw_data not in file".into()))?,
            }
        } else {
            Storage::Typed
        };
        Ok(TensorInfo {
            name: t.name.clone(),
            dtype,
            shape,
            nbytes,
            storage,
        })
    }

    /// The raw little-endian bytes of a tensor (inline or external).
    ///
    /// Typed-field tensors have no raw bytes and give an error.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> Result<Bytes, OnnxError> {
        match &info.storage {
            Storage::Inline { offset } => Ok(slice(&self.file, *offset, info.nbytes)
                .ok_or_else(|| self.out_of_range(&info.name, &self.path))?),
            Storage::External { location, offset } => {
                let file = self.external_file(location)?;
                let path = self.dir.join(location);
                slice(&file, *offset, info.nbytes)
                    .ok_or_else(|| self.out_of_range(&info.name, &path))
            }
            Storage::Typed => Err(OnnxError::BadTensor {
                path: self.path.clone(),
                tensor: info.name.clone(),
                why: "stored in typed fields, not raw bytes".into(),
            }),
        }
    }

    /// Resolves an external-data `location` to a path inside the model's folder.
    ///
    /// Absolute paths, `..`, and symlinks that leave the folder are refused, as
    /// ONNX Runtime does: a model from the internet must not make us read
    /// `/etc/passwd`.
    pub fn external_path(&self, location: &str) -> Result<PathBuf, OnnxError> {
        let bad = |why: &str| OnnxError::BadLocation {
            path: self.path.clone(),
            location: location.to_string(),
            why: why.to_string(),
        };
        let rel = Path::new(location);
        if location.is_empty() || rel.is_absolute() {
            return Err(bad("must be a relative path"));
        }
        if !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(bad("must stay inside the model's folder"));
        }
        let full = self.dir.join(rel);
        let io = |source| OnnxError::Io {
            path: full.clone(),
            source,
        };
        let dir = if self.dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &self.dir
        };
        let real = full.canonicalize().map_err(io)?;
        let real_dir = dir.canonicalize().map_err(|source| OnnxError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if !real.starts_with(&real_dir) {
            return Err(bad("is a link that leaves the model's folder"));
        }
        Ok(full)
    }

    fn external_file(&self, location: &str) -> Result<Bytes, OnnxError> {
        let path = self.external_path(location)?;
        let mut cache = self.external.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = cache.get(&path) {
            return Ok(b.clone());
        }
        let io = |source| OnnxError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let bytes = if file.metadata().map_err(io)?.len() == 0 {
            Bytes::new()
        } else {
            // SAFETY: read-only map, as for the model file.
            Bytes::from_owner(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        cache.insert(path, bytes.clone());
        Ok(bytes)
    }

    fn offset_in_file(&self, part: &Bytes) -> Option<u64> {
        let base = self.file.as_ptr() as usize;
        let at = (part.as_ptr() as usize).checked_sub(base)?;
        (at + part.len() <= self.file.len()).then_some(at as u64)
    }

    fn out_of_range(&self, tensor: &str, file: &Path) -> OnnxError {
        OnnxError::BadTensor {
            path: self.path.clone(),
            tensor: tensor.to_string(),
            why: format!("data range lies past the end of {}", file.display()),
        }
    }
}

fn slice(file: &Bytes, offset: u64, len: u64) -> Option<Bytes> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= file.len()).then(|| file.slice(start..end))
}

/// The parsed `external_data` entries of one tensor.
struct ExternalRef {
    location: String,
    offset: u64,
    length: Option<u64>,
}

impl ExternalRef {
    fn parse(t: &TensorProto) -> Result<Self, String> {
        let mut location = None;
        let mut offset = 0;
        let mut length = None;
        for e in &t.external_data {
            let num = || {
                e.value
                    .parse::<u64>()
                    .map_err(|_| format!("external {} {:?} is not a number", e.key, e.value))
            };
            match e.key.as_str() {
                "location" => location = Some(e.value.clone()),
                "offset" => offset = num()?,
                "length" => length = Some(num()?),
                _ => {}
            }
        }
        let location = location.ok_or("external data without a location")?;
        Ok(Self {
            location,
            offset,
            length,
        })
    }
}
