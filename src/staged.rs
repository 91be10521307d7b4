//! Output files that appear whole or not at all, and leave nothing behind.
//!
//! Every file the tool writes (edited models and their external data,
//! operator files, images, arrays, reports) is written into a file with no
//! name in its destination folder (`O_TMPFILE`), which the kernel frees on
//! any exit, SIGKILL and crashes included. Only when all of a set is
//! complete does each get a hidden name (`linkat`) and is renamed over its
//! destination. A failure, a full disk or a kill therefore never leaves a
//! partial file under an output name, and an input that is also mapped is
//! never truncated.
//!
//! Where the filesystem cannot make unnamed files, the file has its hidden
//! name, `.<output>.tmp.<host>.<pid>.<n>`, from the start. Hidden names left
//! by a SIGKILL (of such a write, or between the links and the renames) are
//! removed before the next write into that folder, when their owner is a
//! process of this host that is gone; another host's names are never
//! touched, as that host may still be writing them.
//!
//! Missing output folders are created, and removed again (when still empty)
//! if the files meant for them are not committed.
//!
//! The hidden names live in a process-wide registry so that an interrupt
//! handler can remove them ([`abandon_all`]) before the process exits.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// Hidden names of this process's files that are not yet renamed into place.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes every hidden file of this process and keeps the registry locked
/// for good, so no other thread can create or commit one afterwards. For an
/// interrupt handler, which exits right after (unnamed files go with it).
pub fn abandon_all() {
    let guard = live();
    for path in guard.iter() {
        let _ = std::fs::remove_file(path);
    }
    std::mem::forget(guard);
}

/// One file being written: `file`, to become `dest`.
pub struct TempFile {
    /// Open for reading and writing.
    pub file: File,
    /// The final name.
    pub dest: PathBuf,
    /// The hidden name the file has: from the start where unnamed files are
    /// not available, else from [`Staged::commit`] on.
    hidden: Option<PathBuf>,
}

/// A set of files that become their destinations together, on
/// [`Staged::commit`], and vanish if dropped before.
#[derive(Default)]
pub struct Staged {
    files: Vec<TempFile>,
    /// Folders this set created, outermost first.
    created: Vec<PathBuf>,
}

impl Staged {
    /// Creates the file for `dest`, and its folder if missing.
    pub fn create(&mut self, dest: &Path) -> std::io::Result<&TempFile> {
        if dest.file_name().is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a file path",
            ));
        }
        let dir = folder_of(dest);
        self.create_folders(dir)?;
        remove_stale_once(dir);
        let mut registry = live();
        let (file, hidden) = match open_unnamed(dir)? {
            Some(file) => (file, None),
            None => {
                let path = hidden_name(dest);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)?;
                registry.push(path.clone());
                (file, Some(path))
            }
        };
        self.files.push(TempFile {
            file,
            dest: dest.to_path_buf(),
            hidden,
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

    /// The file created for `dest`, if any.
    pub fn find(&self, dest: &Path) -> Option<&TempFile> {
        self.files.iter().find(|f| f.dest == dest)
    }

    /// Names every file (hidden), then renames them into place in the order
    /// they were created (data files before the model that points at them).
    /// The first destination's folder is locked meanwhile, so two processes
    /// writing the same output cannot interleave their renames (which would
    /// pair one's model with the other's data), and so is the registry, so
    /// an interrupt waits for the renames to finish rather than leaving half
    /// a set.
    ///
    /// No fsync: the rename makes an output appear whole or not at all to
    /// every process, including after this one is killed; surviving a power
    /// cut is left to the OS's writeback, as for `cp`. Forcing gigabytes to
    /// disk would cost more than the whole copy.
    ///
    /// On failure, the error names the file that could not be put in place.
    pub fn commit(mut self) -> Result<(), (PathBuf, std::io::Error)> {
        let Some(first) = self.files.first() else {
            return Ok(());
        };
        let dir = folder_of(&first.dest).to_path_buf();
        let lock = File::open(&dir).map_err(|e| (dir.clone(), e))?;
        lock.lock().map_err(|e| (dir.clone(), e))?;
        let mut registry = live();
        for f in &mut self.files {
            if f.hidden.is_none() {
                let path = hidden_name(&f.dest);
                link_unnamed(&f.file, &path).map_err(|e| (f.dest.clone(), e))?;
                registry.push(path.clone());
                f.hidden = Some(path);
            }
        }
        for f in &self.files {
            let hidden = f.hidden.as_ref().expect("named above");
            std::fs::rename(hidden, &f.dest).map_err(|e| (f.dest.clone(), e))?;
            registry.retain(|p| p != hidden);
        }
        self.files.clear();
        self.created.clear();
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let mut registry = live();
        for hidden in self.files.iter().filter_map(|f| f.hidden.as_ref()) {
            let _ = std::fs::remove_file(hidden);
            registry.retain(|p| p != hidden);
        }
        drop(registry);
        // Innermost first; a folder something else has written into stays.
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// A fresh hidden name beside `dest`: `.<name>.tmp.<host>.<pid>.<n>`.
fn hidden_name(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    folder_of(dest).join(format!(".{name}.tmp.{}.{}.{n}", host(), std::process::id()))
}

/// This machine's host name, reduced to letters, digits, `-` and `_` (dots
/// become `_`) so that a hidden name splits unambiguously from the right.
fn host() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: gethostname writes at most buf.len() bytes into buf.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let raw = if ok { &buf[..] } else { &[][..] };
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let name: String = raw[..end]
            .iter()
            .map(|&b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' => b as char,
                _ => '_',
            })
            .collect();
        if name.is_empty() {
            "unknown-host".into()
        } else {
            name
        }
    })
}

/// The process a hidden name of this host belongs to, or `None` for any
/// other name (another host's, an older format's, a user's file).
fn owner_on_this_host(name: &str) -> Option<i32> {
    let rest = name.strip_prefix('.')?;
    let mut parts = rest.rsplitn(3, '.');
    parts.next()?.parse::<u32>().ok()?;
    let pid = parts.next()?.parse::<i32>().ok().filter(|&p| p > 0)?;
    parts
        .next()?
        .strip_suffix(host())?
        .ends_with(".tmp.")
        .then_some(pid)
}

/// Whether process `pid` exists (on this host, in our pid namespace).
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let found = unsafe { libc::kill(pid, 0) } == 0;
    found || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes hidden files in `dir` left by processes of this host that are
/// gone, once per folder per process (a folder of many images is read once).
/// Best effort: a folder that cannot be read is simply written into.
fn remove_stale_once(dir: &Path) {
    static SWEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let mut swept = SWEPT.lock().unwrap_or_else(|p| p.into_inner());
    if swept.iter().any(|d| d == dir) {
        return;
    }
    swept.push(dir.to_path_buf());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let own = std::process::id() as i32;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = owner_on_this_host(&name.to_string_lossy()) else {
            continue;
        };
        if pid != own && !alive(pid) && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Whether unnamed files can later be given a name: `linkat` reaches them
/// through /proc/self/fd (without CAP_DAC_READ_SEARCH, the only way).
fn can_link_unnamed() -> bool {
    static PROC: OnceLock<bool> = OnceLock::new();
    *PROC.get_or_init(|| Path::new("/proc/self/fd").is_dir())
}

/// Opens a file with no name in `dir`, or `None` where the kernel or the
/// filesystem cannot (then the caller names it from the start).
#[cfg(target_os = "linux")]
fn open_unnamed(dir: &Path) -> std::io::Result<Option<File>> {
    use std::os::fd::FromRawFd;
    if !can_link_unnamed() {
        return Ok(None);
    }
    let c_dir = CString::new(dir.as_os_str().as_bytes())?;
    let flags = libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC;
    // SAFETY: a NUL-terminated path; the descriptor returned is owned below.
    let fd = unsafe { libc::open(c_dir.as_ptr(), flags, 0o666 as libc::c_uint) };
    if fd >= 0 {
        // SAFETY: fd is a fresh descriptor nothing else owns.
        return Ok(Some(unsafe { File::from_raw_fd(fd) }));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        // No O_TMPFILE in this filesystem (EOPNOTSUPP), or a kernel that
        // predates it and took the flag for O_DIRECTORY (EISDIR).
        Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL) => Ok(None),
        _ => Err(err),
    }
}

#[cfg(not(target_os = "linux"))]
fn open_unnamed(_dir: &Path) -> std::io::Result<Option<File>> {
    Ok(None)
}

/// Gives the unnamed `file` the name `path`.
fn link_unnamed(file: &File, path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let to = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: two NUL-terminated paths.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
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
        // ext4 and tmpfs make unnamed files: nothing to see until the commit.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        staged.commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"data");
        assert_eq!(std::fs::read(&b).unwrap(), b"model");
        assert!(hidden_files(dir.path()).is_empty());
    }

    #[test]
    fn hidden_names_split_from_the_right_and_name_this_host() {
        let pid = std::process::id();
        let ours = hidden_name(Path::new("out/m.onnx.tmp.1.2"));
        let name = ours.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(owner_on_this_host(&name), Some(pid as i32), "{name}");
        let h = host();
        for other in [
            format!(".m.onnx.tmp.x{h}.12.3"),
            ".m.onnx.tmp.12.3".to_string(), // no host: an older name
            format!(".m.onnx.tmp.{h}.0.3"),
            format!(".m.onnx.tmp.{h}.12"),
            format!("m.onnx.tmp.{h}.12.3"),
        ] {
            assert_eq!(owner_on_this_host(&other), None, "{other}");
        }
    }

    #[test]
    fn stale_hidden_files_of_this_host_are_removed_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let h = host();
        let stale = dir.path().join(format!(".m.onnx_data.tmp.{h}.{dead}.0"));
        let elsewhere = dir
            .path()
            .join(format!(".m.onnx_data.tmp.otherhost.{dead}.0"));
        let running = dir.path().join(format!(".m.onnx_data.tmp.{h}.1.0"));
        let users = dir.path().join(format!("m.onnx_data.tmp.{h}.{dead}.0"));
        for f in [&stale, &elsewhere, &running, &users] {
            std::fs::write(f, b"x").unwrap();
        }
        write_file(&dir.path().join("m.onnx"), |w| w.write_all(b"m")).unwrap();
        assert!(!stale.exists());
        assert!(elsewhere.exists() && running.exists() && users.exists());
    }
}
