//! Output files that appear whole or not at all.
//!
//! Every file the tool writes (edited models and their external data,
//! operator files, images, arrays) is written under a hidden temporary name
//! in its destination folder and renamed into place only when complete. A
//! failure, a full disk or a kill therefore never leaves a partial file under
//! an output name, and an input that is also mapped is never truncated.
//!
//! Missing output folders are created, and removed again (when still empty)
//! if the files meant for them are not committed.
//!
//! The temporary names live in a process-wide registry so that an interrupt
//! handler can remove them ([`abandon_all`]) before the process exits; only
//! SIGKILL, which no process can intercept, leaves one behind (hidden, named
//! `.<output>.tmp.<pid>.<n>`).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Temporary files of this process that are not yet renamed into place.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes every temporary file of this process and keeps the registry
/// locked for good, so no other thread can create or commit one afterwards.
/// For an interrupt handler, which exits right after.
pub fn abandon_all() {
    let guard = live();
    for path in guard.iter() {
        let _ = std::fs::remove_file(path);
    }
    std::mem::forget(guard);
}

/// One file being written: `file` at `path`, to become `dest`.
pub struct TempFile {
    /// The hidden temporary name, in the destination's folder.
    pub path: PathBuf,
    /// Open for reading and writing.
    pub file: File,
    /// The final name.
    pub dest: PathBuf,
}

/// A set of files that become their destinations together, on
/// [`Staged::commit`], and are removed if dropped before.
#[derive(Default)]
pub struct Staged {
    files: Vec<TempFile>,
    /// Folders this set created, outermost first.
    created: Vec<PathBuf>,
}

impl Staged {
    /// Creates the temporary file for `dest`, and its folder if missing.
    pub fn create(&mut self, dest: &Path) -> std::io::Result<&TempFile> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = dest.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path")
        })?;
        self.create_folders(folder_of(dest))?;
        let path = folder_of(dest).join(format!(
            ".{}.tmp.{}.{n}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let mut registry = live();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        registry.push(path.clone());
        self.files.push(TempFile {
            path,
            file,
            dest: dest.to_path_buf(),
        });
        Ok(self.files.last().expect("just pushed"))
    }

    /// Creates `dir` and its missing parents one by one, remembering each, so
    /// that a failure removes exactly what this set made.
    fn create_folders(&mut self, dir: &Path) -> std::io::Result<()> {
        let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
        for d in missing.into_iter().rev() {
            match std::fs::create_dir(d) {
                Ok(()) => self.created.push(d.to_path_buf()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The temporary file created for `dest`, if any.
    pub fn find(&self, dest: &Path) -> Option<&TempFile> {
        self.files.iter().find(|f| f.dest == dest)
    }

    /// Renames the files into place in the order they were created (data
    /// files before the model that points at them). The first destination's
    /// folder is locked meanwhile, so two processes writing the same output
    /// cannot interleave their renames (which would pair one's model with the
    /// other's data), and so is the registry, so an interrupt waits for the
    /// renames to finish rather than leaving half a set.
    ///
    /// No fsync: the rename makes an output appear whole or not at all to
    /// every process, including after this one is killed; surviving a power
    /// cut is left to the OS's writeback, as for `cp`. Forcing gigabytes to
    /// disk would cost more than the whole copy.
    ///
    /// On failure, the error names the file that could not be renamed.
    pub fn commit(mut self) -> Result<(), (PathBuf, std::io::Error)> {
        let Some(first) = self.files.first() else {
            return Ok(());
        };
        let dir = folder_of(&first.dest).to_path_buf();
        let lock = File::open(&dir).map_err(|e| (dir.clone(), e))?;
        lock.lock().map_err(|e| (dir.clone(), e))?;
        let mut registry = live();
        for f in &self.files {
            std::fs::rename(&f.path, &f.dest).map_err(|e| (f.dest.clone(), e))?;
            registry.retain(|p| p != &f.path);
        }
        self.files.clear();
        self.created.clear();
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.files.is_empty() {
            let mut registry = live();
            for f in &self.files {
                let _ = std::fs::remove_file(&f.path);
                registry.retain(|p| p != &f.path);
            }
        }
        // Innermost first; a folder something else has written into stays.
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Checks, before any work, that files can be written into `dir`: the
/// nearest part of it that exists is a folder (the rest is created by
/// [`Staged::create`]).
pub fn check_folder(dir: &Path) -> std::io::Result<()> {
    match dir
        .ancestors()
        .find(|d| d.as_os_str().is_empty() || d.exists())
    {
        Some(d) if !d.as_os_str().is_empty() && !d.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::NotADirectory,
            format!("{} is not a folder", d.display()),
        )),
        _ => Ok(()),
    }
}

/// Writes one file through `write`, appearing at `dest` only once complete.
pub fn write_file(
    dest: &Path,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut staged = Staged::default();
    let tmp = staged.create(dest)?;
    let mut out = BufWriter::new(&tmp.file);
    write(&mut out)?;
    out.flush()?;
    drop(out);
    staged.commit().map_err(|(_, e)| e)
}

/// The folder a path is in; `.` for a bare file name.
pub fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hidden_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        let err = write_file(&dest, |w| {
            w.write_all(b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert!(!dest.exists());
        assert!(hidden_files(dir.path()).is_empty());
    }

    #[test]
    fn missing_folders_are_created_and_removed_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("a/b/out.bin");
        let err = write_file(&dest, |_| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert!(!dir.path().join("a").exists());
        write_file(&dest, |w| w.write_all(b"ok")).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"ok");
        // A folder that already existed is never removed.
        let other = dir.path().join("a/c/out.bin");
        write_file(&other, |_| Err(std::io::Error::other("no"))).unwrap_err();
        assert!(dir.path().join("a/b/out.bin").exists());
        assert!(!dir.path().join("a/c").exists());
    }

    #[test]
    fn check_folder_refuses_a_file_in_the_way() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_folder(&dir.path().join("new/deeper")).is_ok());
        assert!(check_folder(Path::new("")).is_ok());
        let err = check_folder(&file.join("sub")).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotADirectory);
        assert!(err.to_string().ends_with("f is not a folder"), "{err}");
    }

    #[test]
    fn a_committed_set_appears_whole_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("m.onnx_data"), dir.path().join("m.onnx"));
        let mut staged = Staged::default();
        (&staged.create(&a).unwrap().file)
            .write_all(b"data")
            .unwrap();
        (&staged.create(&b).unwrap().file)
            .write_all(b"model")
            .unwrap();
        assert!(!a.exists() && !b.exists());
        assert_eq!(hidden_files(dir.path()).len(), 2);
        staged.commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"data");
        assert_eq!(std::fs::read(&b).unwrap(), b"model");
        assert!(hidden_files(dir.path()).is_empty());
    }
}
