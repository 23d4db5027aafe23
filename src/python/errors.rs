//! The one conversion from `lugh::Error` to Python exceptions.

use pyo3::exceptions::{
    PyFileNotFoundError, PyIndexError, PyIsADirectoryError, PyOSError, PyPermissionError,
    PyRuntimeError, PyValueError,
};
use pyo3::PyErr;

use crate::error::Error;

/// Missing files → FileNotFoundError, directories → IsADirectoryError, other OS failures →
/// OSError, token ids → IndexError, a device that is missing or fails → RuntimeError,
/// everything else (bad files, values, mismatches) →
/// ValueError. The message is the error's own, naming file, tensor, shape or value.
pub fn to_py_err(err: Error) -> PyErr {
    let message = err.to_string();
    match err.root() {
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
            std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(message),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
            _ => PyOSError::new_err(message),
        },
        Error::TokenOutOfRange { .. } => PyIndexError::new_err(message),
        Error::DeviceUnavailable { .. } | Error::Device(_) => PyRuntimeError::new_err(message),
        _ => PyValueError::new_err(message),
    }
}

/// `?` on core results inside PyO3 methods.
pub trait IntoPyResult<T> {
    fn py(self) -> pyo3::PyResult<T>;
}

impl<T> IntoPyResult<T> for crate::Result<T> {
    fn py(self) -> pyo3::PyResult<T> {
        self.map_err(to_py_err)
    }
}
