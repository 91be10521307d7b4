//! The operator folder: every edit the server knows, one operator file per
//! id, written whole or not at all (`staged`).
//!
//! A computed edit's id is the SHA-256 of the text encoder's fingerprint and
//! the edit's parameters, so asking twice for the same edit, on any replica
//! sharing the folder, finds the same file; an uploaded operator's id is the
//! SHA-256 of its bytes. Ids are 64 lowercase hex digits and nothing else,
//! so that no id names a path outside the folder.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::edit::Operator;
use crate::edit::operator_file::{self, OperatorFileError, OperatorMeta};
use crate::eval::digest;

/// The parameters that make an edit (what its id hashes).
#[derive(Clone, Debug, Serialize)]
pub struct EditParams {
    /// Source prompt.
    pub src: String,
    /// Destination prompt.
    pub dst: String,
    /// TIME's λ.
    pub lambda: f64,
    /// The augmentation prefixes.
    pub augmentations: Vec<String>,
}

/// What can go wrong with a stored edit.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not the shape of an id.
    #[error("{0:?} is not an edit id (64 hexadecimal digits)")]
    BadId(String),
    /// No such edit.
    #[error("no edit {0}")]
    NotFound(String),
    /// An uploaded file that is not an operator file.
    #[error("not an operator file: {0}")]
    Invalid(String),
    /// An operator made with another text encoder.
    #[error(
        "this operator was computed with another text encoder (fingerprint {theirs}, ours {ours})"
    )]
    OtherEncoder {
        /// The operator's.
        theirs: String,
        /// The server's.
        ours: String,
    },
    /// The folder could not be read or written.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The operator folder of one text encoder.
pub struct Store {
    dir: PathBuf,
    fingerprint: String,
    width: usize,
}

impl Store {
    /// The folder `dir` (created if missing) for operators of the text
    /// encoder with `fingerprint` and embedding `width`.
    pub fn open(dir: &Path, fingerprint: String, width: usize) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
            fingerprint,
            width,
        })
    }

    /// The text encoder's fingerprint.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The id of the edit `params` make with this text encoder.
    pub fn id(&self, params: &EditParams) -> String {
        let json = serde_json::to_string(params).unwrap_or_default();
        digest::bytes(format!("{}\n{json}", self.fingerprint).as_bytes())
    }

    /// The file of edit `id`, which must be an id.
    pub fn path(&self, id: &str) -> Result<PathBuf, StoreError> {
        let hex = id.len() == 64
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex {
            return Err(StoreError::BadId(shorten(id)));
        }
        Ok(self.dir.join(format!("{id}.safetensors")))
    }

    /// Whether edit `id` is stored.
    pub fn has(&self, id: &str) -> bool {
        self.path(id).is_ok_and(|p| p.is_file())
    }

    /// Edit `id`'s operator and record.
    pub fn load(&self, id: &str) -> Result<(Operator, OperatorMeta), StoreError> {
        let path = self.path(id)?;
        if !path.is_file() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        let (op, meta) = operator_file::load(&path).map_err(|e| match e {
            OperatorFileError::Io { path, source } => StoreError::Io { path, source },
            other => StoreError::Invalid(other.to_string()),
        })?;
        self.check(&meta)?;
        Ok((op, meta))
    }

    /// Stores an operator file made by `edit --save-operator`, checked as
    /// `generate --edit` checks it: its id and record.
    pub fn upload(&self, bytes: &[u8]) -> Result<(String, OperatorMeta), StoreError> {
        let (_, meta) = operator_file::parse(bytes, Path::new("the upload"))
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.check(&meta)?;
        let id = digest::bytes(bytes);
        let path = self.path(&id)?;
        if !path.is_file() {
            use std::io::Write;
            crate::staged::write_file(&path, |w| w.write_all(bytes))
                .map_err(|source| StoreError::Io { path, source })?;
        }
        Ok((id, meta))
    }

    fn check(&self, meta: &OperatorMeta) -> Result<(), StoreError> {
        if meta.text_encoder != self.fingerprint || meta.width != self.width {
            return Err(StoreError::OtherEncoder {
                theirs: meta.text_encoder.clone(),
                ours: self.fingerprint.clone(),
            });
        }
        Ok(())
    }
}

/// An id as an error shows it: at most 80 characters.
fn shorten(id: &str) -> String {
    if id.chars().count() <= 80 {
        return id.to_string();
    }
    let mut s: String = id.chars().take(77).collect();
    s.push_str("...");
    s
}
