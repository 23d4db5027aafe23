//! One error type for the whole crate. `src/python/` maps each variant to a Python exception
//! in one place; everything else returns `Result<T>` and never panics on input it was given.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS refused a file operation (missing file, directory, permission, full disk).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Any error found while reading or validating one file: says which file.
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<Error>,
    },

    #[error("not a GGUF file (magic bytes {magic:02x?}, expected \"GGUF\")")]
    NotGguf { magic: Vec<u8> },

    #[error("GGUF version {version} is not supported (lugh reads versions 2 and 3)")]
    UnsupportedGgufVersion { version: u32 },

    /// The file's structure is inconsistent (truncated, offsets past the end, overflowing sizes).
    #[error("malformed {format}: {reason}")]
    Malformed {
        format: &'static str,
        reason: String,
    },

    #[error("tensor '{name}' has type {type_name}, which lugh does not support")]
    UnsupportedTensorType { name: String, type_name: String },

    #[error("missing metadata key '{key}'")]
    MissingKey { key: String },

    #[error("metadata key '{key}' has type {got}, expected {expected}")]
    WrongValueType {
        key: String,
        expected: &'static str,
        got: String,
    },

    #[error("architecture '{arch}' is not supported (lugh runs: {supported})")]
    UnsupportedArchitecture { arch: String, supported: String },

    #[error("{what} '{feature}' is not supported: {hint}")]
    Unsupported {
        what: &'static str,
        feature: String,
        hint: &'static str,
    },

    #[error("tensor '{name}' not found")]
    TensorNotFound { name: String },

    #[error("tensor '{name}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("the model has no tensor weights (a vocabulary-only GGUF?): it cannot run inference")]
    NoWeights,

    #[error("this GGUF is a LoRA adapter, not a base model: load it with lugh.LoRA(path, model)")]
    AdapterNotModel,

    #[error(
        "adapter architecture '{adapter}' does not match the model's '{model}': is this adapter for another base model?"
    )]
    ArchMismatch { model: String, adapter: String },

    #[error("{what}")]
    BadAdapter { what: String },

    #[error("token id {token} is out of range (vocabulary size {n_vocab})")]
    TokenOutOfRange { token: i64, n_vocab: usize },

    #[error("{what} is empty")]
    Empty { what: &'static str },

    #[error("context overflow: {needed} positions needed, the context holds {n_ctx}")]
    ContextOverflow { needed: usize, n_ctx: usize },

    #[error("invalid {name}: {reason}")]
    InvalidArgument { name: &'static str, reason: String },

    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),

    #[error("device '{device}' is not available: {reason}")]
    DeviceUnavailable { device: String, reason: String },

    /// A computation on a candle device failed (out of device memory, a driver error).
    #[error("device computation failed: {0}")]
    Device(#[from] candle_core::Error),
}

impl Error {
    /// Attaches the file a lower-level error came from, once.
    pub fn in_file(self, path: impl Into<PathBuf>) -> Error {
        match self {
            Error::Io { .. } | Error::InFile { .. } => self,
            other => Error::InFile {
                path: path.into(),
                source: Box::new(other),
            },
        }
    }

    /// The error under any `InFile` wrapper: decides the Python exception type.
    pub fn root(&self) -> &Error {
        match self {
            Error::InFile { source, .. } => source.root(),
            other => other,
        }
    }

    pub(crate) fn malformed(format: &'static str, reason: impl Into<String>) -> Error {
        Error::Malformed {
            format,
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Error {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Adds the file to errors from reading it.
pub(crate) trait ResultExt<T> {
    fn in_file(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> ResultExt<T> for Result<T> {
    fn in_file(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| e.in_file(path))
    }
}
