//! Saving without ever leaving a half-written file: write a temporary file in the target's
//! folder, flush it to disk, then rename it over the target (atomic on POSIX and Windows).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Calls `write` on a buffered temporary file beside `path`, then renames it to `path`.
/// On any error the temporary file is removed and an existing `path` is left untouched.
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    stage(path, write)?.commit()
}

/// A file written and flushed beside its target, not yet in place: several files that
/// belong together (a PEFT directory's weights and config) are all staged before any
/// replaces its target, so that a failed write changes none of them. Dropped uncommitted,
/// the temporary file is removed.
pub struct Staged {
    temp: tempfile::NamedTempFile,
    path: PathBuf,
}

impl Staged {
    /// Renames the temporary file over the target.
    pub fn commit(self) -> Result<()> {
        let path = self.path;
        self.temp
            .persist(&path)
            .map_err(|e| Error::io(&path, e.error))?;
        Ok(())
    }
}

/// Calls `write` on a buffered temporary file beside `path` and flushes it to disk.
pub fn stage(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<Staged> {
    let io_err = |e| Error::io(path, e);
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if path.is_dir() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        )));
    }
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(folder)
        .map_err(io_err)?;
    let mut out = BufWriter::new(temp);
    write(&mut out).map_err(io_err)?;
    let temp = out.into_inner().map_err(|e| io_err(e.into_error()))?;
    temp.as_file().sync_all().map_err(io_err)?;
    Ok(Staged {
        temp,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        std::fs::write(&path, b"old").unwrap();
        let err = write_atomically(&path, |w| {
            w.write_all(b"partial")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn staged_files_replace_nothing_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"old a").unwrap();
        let staged = stage(&a, |w| w.write_all(b"new a")).unwrap();
        assert!(stage(&b, |_| Err(std::io::Error::other("disk full"))).is_err());
        drop(staged);
        assert_eq!(std::fs::read(&a).unwrap(), b"old a");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        stage(&a, |w| w.write_all(b"new a"))
            .unwrap()
            .commit()
            .unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"new a");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_folder_is_an_io_error() {
        let err = write_atomically(Path::new("/nonexistent-lugh-dir/x.gguf"), |_| Ok(()));
        assert!(matches!(err, Err(Error::Io { .. })));
    }
}
