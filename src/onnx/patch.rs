//! Writing a model with some initializers replaced, without re-encoding it.
//!
//! prost drops fields it does not know, so a decoded-then-encoded model could
//! silently lose data. Instead the output is a copy of the input in which only
//! the edited tensors' bytes differ (same dtype and shape, same byte length),
//! plus `metadata_props` entries appended at the end of the file (a repeated
//! top-level field may appear anywhere, so appending is valid protobuf).
//!
//! External data is copied beside the output under a name derived from it. The
//! model file's `location` strings must then change, which changes lengths of
//! the messages that enclose them: those few messages are re-emitted at the
//! wire level, every other byte copied verbatim.
//!
//! Every file is written to a temporary name in the destination folder and
//! renamed into place at the end, so a failure never leaves a half file under
//! the output name, and the input is only ever read.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use prost::Message;

use super::proto::StringStringEntryProto;
use super::wire;
use super::{Model, OnnxError, Storage, TensorInfo};
use crate::staged::{Staged, TempFile, folder_of};

/// New bytes for one initializer; as long as the old ones.
pub struct TensorPatch {
    /// Where the old bytes are.
    pub tensor: TensorInfo,
    /// The replacement, little-endian, `tensor.nbytes` long.
    pub data: Vec<u8>,
}

/// Why writing failed. Nothing is left under the output names when it does.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Reading the input went wrong.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The output would overwrite the input or its data.
    #[error("output {output} would overwrite the input {input}; choose another output path")]
    SameAsInput {
        /// The output path.
        output: PathBuf,
        /// The input file it collides with.
        input: PathBuf,
    },
    /// A replacement of the wrong length.
    #[error("replacement for {tensor:?} has {got} bytes, the tensor has {expected}")]
    LengthMismatch {
        /// The tensor.
        tensor: String,
        /// Bytes given.
        got: usize,
        /// Bytes stored.
        expected: u64,
    },
    /// A tensor stored in typed fields cannot be patched in place.
    #[error("tensor {0:?} is stored in typed fields, which time-onnx cannot patch")]
    Unpatchable(String),
    /// The model's wire format has something we cannot walk.
    #[error("{path}: unexpected protobuf structure: {why}")]
    Wire {
        /// The model.
        path: PathBuf,
        /// What was found.
        why: String,
    },
    /// A filesystem operation failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file being written.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What was written.
#[derive(Debug)]
pub struct Written {
    /// The model file.
    pub model: PathBuf,
    /// External data files written beside it.
    pub data_files: Vec<PathBuf>,
}

/// The copy of a model's bulk (its external data files, or the model file
/// itself when it has none) into temporary files beside `output`, under way
/// in a background thread while the caller computes the patches.
///
/// The copy is the floor of the whole edit: gigabytes written at the speed
/// of the disk, directly from the source's pages where the filesystem lets
/// us (`copy_direct`), so that it costs the text encoders running
/// meanwhile almost no CPU. Starting it before the text encoder runs hides
/// that work behind the computation instead of adding to it. Dropping a
/// `Copying` stops the thread within one step and removes the temporary
/// files.
pub struct Copying {
    /// Old location → new file name, for every external file.
    locations: BTreeMap<String, String>,
    out_dir: PathBuf,
    output: PathBuf,
    staged: Staged,
    thread: Option<std::thread::JoinHandle<Result<(), WriteError>>>,
    /// Closed by the thread when it ends, which wakes [`Copying::finish`].
    ended: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    total: u64,
}

impl Copying {
    /// Checks the output names and starts copying. Refuses to write over any
    /// file the model reads.
    pub fn start(model: &Model, output: &Path) -> Result<Self, WriteError> {
        let out_dir = folder_of(output).to_path_buf();
        let out_name = output
            .file_name()
            .ok_or_else(|| WriteError::Io {
                path: output.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
            })?
            .to_string_lossy()
            .into_owned();

        // Every external file the graph's initializers use, and its new name.
        let mut locations = BTreeMap::new();
        for t in &model.graph()?.initializer {
            if let Storage::External { location, .. } = model.tensor_info(t)?.storage {
                locations.entry(location).or_insert_with(String::new);
            }
        }
        let single = locations.len() == 1;
        for (old, new) in locations.iter_mut() {
            *new = if single {
                format!("{out_name}_data")
            } else {
                format!("{out_name}_data.{}", sanitize(old))
            };
        }

        // Refuse to write over any file we read.
        let mut inputs = vec![model.path().to_path_buf()];
        for old in locations.keys() {
            inputs.push(model.external_path(old)?);
        }
        let outputs = std::iter::once(output.to_path_buf())
            .chain(locations.values().map(|n| out_dir.join(n)));
        for o in outputs {
            for i in &inputs {
                if same_file(&o, i) {
                    return Err(WriteError::SameAsInput {
                        output: o.clone(),
                        input: i.clone(),
                    });
                }
            }
        }

        // (source, temporary file) pairs: the external files, or the model.
        let mut staged = Staged::default();
        let mut jobs = Vec::new();
        let mut total = 0u64;
        let mut add = |src: PathBuf, dest: &Path, staged: &mut Staged| {
            total += std::fs::metadata(&src).map(|m| m.len()).unwrap_or(0);
            let tmp = staged.create(dest).map_err(|source| io(dest, source))?;
            let file = tmp
                .file
                .try_clone()
                .map_err(|source| io(&tmp.dest, source))?;
            jobs.push((src, file, tmp.dest.clone()));
            Ok::<_, WriteError>(())
        };
        for (old, new) in &locations {
            add(model.external_path(old)?, &out_dir.join(new), &mut staged)?;
        }
        if locations.is_empty() {
            add(model.path().to_path_buf(), output, &mut staged)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let (ending, ended) = mpsc::channel::<()>();
        let thread = {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            std::thread::Builder::new()
                .name("copy".into())
                .spawn(move || {
                    let _ending = ending; // dropped, hence closed, however the thread ends
                    for (src, file, path) in jobs {
                        copy_into(&src, &file, &path, &stop, &done)?;
                    }
                    Ok(())
                })
                .map_err(|source| io(output, source))?
        };
        Ok(Self {
            locations,
            out_dir,
            output: output.to_path_buf(),
            staged,
            thread: Some(thread),
            ended,
            stop,
            done,
            total,
        })
    }

    /// Waits for the copy, telling `progress(bytes copied, bytes to copy)`
    /// every tenth of a second, then writes `patches` over the copied bytes,
    /// writes the model file with `metadata` appended, and renames every file
    /// into place. `model` must be the one the copy started from.
    pub fn finish(
        mut self,
        model: &Model,
        patches: &[TensorPatch],
        metadata: &[(String, String)],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Written, WriteError> {
        for p in patches {
            if p.data.len() as u64 != p.tensor.nbytes {
                return Err(WriteError::LengthMismatch {
                    tensor: p.tensor.name.clone(),
                    got: p.data.len(),
                    expected: p.tensor.nbytes,
                });
            }
            if p.tensor.storage == Storage::Typed {
                return Err(WriteError::Unpatchable(p.tensor.name.clone()));
            }
        }
        self.wait(progress)?;
        self.patch_external(patches)?;
        let tmp = self.write_model(model, patches)?;
        (&tmp.file)
            .write_all(&encode_metadata(metadata))
            .map_err(|source| io(&tmp.dest, source))?;
        let written = Written {
            model: self.output.clone(),
            data_files: self
                .locations
                .values()
                .map(|n| self.out_dir.join(n))
                .collect(),
        };
        std::mem::take(&mut self.staged)
            .commit()
            .map_err(|(path, source)| io(&path, source))?;
        Ok(written)
    }

    /// Waits for the copying thread, reporting progress.
    fn wait(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<(), WriteError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let tick = std::time::Duration::from_millis(100);
        while self.ended.recv_timeout(tick) == Err(mpsc::RecvTimeoutError::Timeout) {
            progress(self.done.load(Ordering::Relaxed), self.total);
        }
        thread.join().map_err(|_| {
            io(
                &self.output,
                std::io::Error::other("the copying thread panicked"),
            )
        })??;
        progress(self.done.load(Ordering::Relaxed), self.total);
        Ok(())
    }

    /// Writes the externally stored patches over the copied data files.
    /// Directly where the filesystem allows it ([`write_direct_at`]).
    fn patch_external(&self, patches: &[TensorPatch]) -> Result<(), WriteError> {
        let mut bounce = Vec::new();
        for (old, new) in &self.locations {
            let tmp = self.temporary(&self.out_dir.join(new))?;
            let err = |source| io(&tmp.dest, source);
            let mut direct = reopen_direct(&tmp.file).map_err(err)?;
            for p in patches {
                if let Storage::External { location, offset } = &p.tensor.storage
                    && location == old
                {
                    let written = match &direct {
                        Some(d) => write_direct_at(&tmp.file, d, &p.data, *offset, &mut bounce)
                            .map_err(err)?,
                        None => false,
                    };
                    if !written {
                        direct = None;
                        tmp.file.write_all_at(&p.data, *offset).map_err(err)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The model file, positioned at its end for the metadata: the patched
    /// copy when the model has no external data, else re-emitted with the
    /// new locations and its inline patches.
    fn write_model(
        &mut self,
        model: &Model,
        patches: &[TensorPatch],
    ) -> Result<&TempFile, WriteError> {
        if self.locations.is_empty() {
            let tmp = self.temporary(&self.output)?;
            for p in patches {
                if let Storage::Inline { offset } = p.tensor.storage {
                    tmp.file
                        .write_all_at(&p.data, offset)
                        .map_err(|source| io(&tmp.dest, source))?;
                }
            }
            (&tmp.file)
                .seek(SeekFrom::End(0))
                .map_err(|source| io(&tmp.dest, source))?;
            return Ok(tmp);
        }
        let inline: HashMap<&str, &[u8]> = patches
            .iter()
            .filter(|p| matches!(p.tensor.storage, Storage::Inline { .. }))
            .map(|p| (p.tensor.name.as_str(), p.data.as_slice()))
            .collect();
        let rename: HashMap<&str, &str> = self
            .locations
            .iter()
            .map(|(o, n)| (o.as_str(), n.as_str()))
            .collect();
        let rewritten =
            wire::rewrite_model(model.file_bytes(), &rename, &inline).map_err(|why| {
                WriteError::Wire {
                    path: model.path().to_path_buf(),
                    why,
                }
            })?;
        let tmp = self
            .staged
            .create(&self.output)
            .map_err(|source| io(&self.output, source))?;
        (&tmp.file)
            .write_all(&rewritten)
            .map_err(|source| io(&tmp.dest, source))?;
        Ok(tmp)
    }

    /// The temporary file staged for `dest`.
    fn temporary(&self, dest: &Path) -> Result<&TempFile, WriteError> {
        self.staged
            .find(dest)
            .ok_or_else(|| io(&self.output, std::io::Error::other("lost a temporary file")))
    }
}

impl Drop for Copying {
    /// Stops the copy; the temporary files go with `staged`.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Checks, before any work, that `output` can be written: its folder exists
/// or can be created, and it is not the input itself.
pub fn check_output(model: &Model, output: &Path) -> Result<(), WriteError> {
    let dir = folder_of(output);
    crate::staged::check_folder(dir).map_err(|source| WriteError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    if same_file(output, model.path()) {
        return Err(WriteError::SameAsInput {
            output: output.to_path_buf(),
            input: model.path().to_path_buf(),
        });
    }
    Ok(())
}

/// `metadata_props` entries (ModelProto field 14) as bytes to append.
fn encode_metadata(entries: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in entries {
        let entry = StringStringEntryProto {
            key: key.clone(),
            value: value.clone(),
        }
        .encode_to_vec();
        wire::put_varint(&mut out, (14 << 3) | 2);
        wire::put_varint(&mut out, entry.len() as u64);
        out.extend_from_slice(&entry);
    }
    out
}

fn sanitize(location: &str) -> String {
    location
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn io(path: &Path, source: std::io::Error) -> WriteError {
    WriteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `src` into the (empty) `dst` with direct writes where it can
/// ([`copy_direct`]), else in the kernel, heeding `stop` between steps;
/// `done` counts the bytes copied.
///
/// Each `copy_file_range` call asks for everything that is left, as `cp`
/// does; the kernel takes up to ~2 GB per call. Smaller requests cost more
/// than their count suggests: measured on ext4 here, copying SD 1.x's 3.4 GB
/// of weights took 1.1 s in 2 GB calls and 1.7–3.2 s in 64 MB–1 GB calls.
/// Where the kernel or filesystem refuses the call, `io::copy` does it.
fn copy_into(
    src: &Path,
    dst: &File,
    dst_path: &Path,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> Result<(), WriteError> {
    use std::os::fd::AsRawFd;
    let input = File::open(src).map_err(|source| OnnxError::Io {
        path: src.to_path_buf(),
        source,
    })?;
    let started = std::time::Instant::now();
    if copy_direct(&input, dst, stop, done).map_err(|source| io(dst_path, source))? {
        tracing::debug!(
            "{}: {} bytes written directly in {:.2} s",
            dst_path.display(),
            done.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: two open file descriptors, null offsets (the files' own
        // positions are used and advanced), no flags.
        let n = unsafe {
            libc::copy_file_range(
                input.as_raw_fd(),
                std::ptr::null_mut(),
                dst.as_raw_fd(),
                std::ptr::null_mut(),
                1 << 62,
                0,
            )
        };
        match n {
            0 => return Ok(()),
            n if n > 0 => {
                done.fetch_add(n as u64, Ordering::Relaxed);
            }
            _ => {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        let n = std::io::copy(&mut &input, &mut &*dst)
                            .map_err(|source| io(dst_path, source))?;
                        done.fetch_add(n, Ordering::Relaxed);
                        return Ok(());
                    }
                    _ => return Err(io(dst_path, err)),
                }
            }
        }
    }
    Ok(())
}

/// Files smaller than this are copied through the page cache.
const DIRECT_MIN: u64 = 64 << 20;
/// The alignment of direct writes (offsets, lengths, buffers): the page,
/// which covers every logical block size of the disks we meet.
const PAGE: u64 = 4096;
/// Bytes per direct write.
const DIRECT_STEP: usize = 64 << 20;

/// Copies `input` into the empty `dst` with direct writes (`O_DIRECT`) from
/// its mapped pages, heeding `stop` between steps. Returns whether it did:
/// not for small files, nor where the filesystem refuses direct writes
/// (then nothing has been written).
///
/// A copy through the page cache costs the kernel a core-second per
/// gigabyte or more (two to three on this VM once its memory is full of
/// cache), time taken from the text encoders that run meanwhile; a direct
/// write hands the source's pages to the disk instead (`dd`, measured here:
/// SDXL's 4.8 GB in 4.2 s with 1.0 s of CPU, against 14.6 s of CPU through
/// the cache).
fn copy_direct(
    input: &File,
    dst: &File,
    stop: &AtomicBool,
    done: &AtomicU64,
) -> std::io::Result<bool> {
    let len = input.metadata()?.len();
    if len < DIRECT_MIN {
        return Ok(false);
    }
    let Some(direct) = reopen_direct(dst)? else {
        return Ok(false);
    };
    // SAFETY (both maps): the input is only read; a concurrent writer to it
    // would change what we copy, as it would for any copy.
    let window = |at: u64, n: u64| unsafe {
        memmap2::MmapOptions::new()
            .offset(at)
            .len(n as usize)
            .map(input)
    };
    // Page-aligned lengths from page-aligned maps, one step's at a time so
    // that the source's pages do not pile up in our resident set; the rest
    // goes through the page cache.
    let aligned = len & !(PAGE - 1);
    let mut at = 0u64;
    while at < aligned {
        if stop.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let map = window(at, (DIRECT_STEP as u64).min(aligned - at))?;
        let mut off = 0;
        while off < map.len() {
            match direct.write_at(&map[off..], at + off as u64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(w) => off += w,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if at + off as u64 == 0 && unsupported(&e) => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        at += off as u64;
        done.fetch_add(off as u64, Ordering::Relaxed);
    }
    if len > aligned {
        dst.write_all_at(&window(aligned, len - aligned)?, aligned)?;
        done.fetch_add(len - aligned, Ordering::Relaxed);
    }
    // Where the copy through the page cache would have left it.
    (&*dst).seek(SeekFrom::Start(len))?;
    Ok(true)
}

/// `file` opened again for direct writes, in a second open file
/// description so that the O_DIRECT flag does not reach the writes through
/// `file`; `None` where the filesystem (or a missing /proc) does not allow it.
fn reopen_direct(file: &File) -> std::io::Result<Option<File>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if unsupported(&e) || e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `data` at `offset` of `file`: its page-aligned middle through
/// `direct` (from an aligned bounce buffer, as O_DIRECT wants), the ends
/// through the page cache. After a direct copy the output's pages are not
/// cached, and writing 0.7 GB of SDXL's edited weights through the cache
/// would first have to find it that much memory (1.1 s on this VM against
/// 0.15 s into cached pages). Returns false, having written nothing, where
/// a direct write is refused.
fn write_direct_at(
    file: &File,
    direct: &File,
    data: &[u8],
    offset: u64,
    bounce: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let end = offset + data.len() as u64;
    let (first, last) = (offset.next_multiple_of(PAGE), end & !(PAGE - 1));
    if last <= first {
        file.write_all_at(data, offset)?;
        return Ok(true);
    }
    if bounce.is_empty() {
        bounce.resize(DIRECT_STEP + PAGE as usize, 0);
    }
    let pad = bounce.as_ptr().align_offset(PAGE as usize);
    let buf = &mut bounce[pad..pad + DIRECT_STEP];
    let mut at = first;
    while at < last {
        let n = (last - at).min(DIRECT_STEP as u64) as usize;
        let from = (at - offset) as usize;
        buf[..n].copy_from_slice(&data[from..from + n]);
        match direct.write_all_at(&buf[..n], at) {
            Ok(()) => at += n as u64,
            Err(e) if at == first && unsupported(&e) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    file.write_all_at(&data[..(first - offset) as usize], offset)?;
    file.write_all_at(&data[(last - offset) as usize..], last)?;
    Ok(true)
}

/// The errors of a filesystem that does not take direct writes.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct copy writes the bytes a plain copy would, tail included,
    /// into an unnamed temporary file as the writer makes them, and leaves
    /// the file position at the end for what follows.
    #[test]
    fn a_direct_copy_is_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("weights.pb");
        let len = DIRECT_MIN as usize + DIRECT_STEP / 2 + 12_345;
        // Bytes that never repeat with a page's or a window's period.
        let bytes: Vec<u8> = (0..len as u64)
            .map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        std::fs::write(&src, &bytes).unwrap();
        let mut staged = Staged::default();
        let tmp = staged.create(&dir.path().join("copy.pb")).unwrap();
        let (stop, done) = (AtomicBool::new(false), AtomicU64::new(0));
        let input = File::open(&src).unwrap();
        let took = copy_direct(&input, &tmp.file, &stop, &done).unwrap();
        if !took {
            eprintln!("this filesystem refuses direct writes: nothing to compare");
            return;
        }
        assert_eq!(done.load(Ordering::Relaxed), len as u64);
        assert_eq!((&tmp.file).stream_position().unwrap(), len as u64);
        let mut back = vec![0; len];
        tmp.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == bytes, "the copy differs");
        assert_eq!(tmp.file.metadata().unwrap().len(), len as u64);
    }

    /// A patch written directly (aligned middle) and through the cache (its
    /// ends) leaves the file as one plain write would, neighbours intact.
    #[test]
    fn a_direct_patch_is_a_plain_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut staged = Staged::default();
        let tmp = staged.create(&dir.path().join("data.bin")).unwrap();
        let len = 3 * DIRECT_STEP / 2;
        let old: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        tmp.file.write_all_at(&old, 0).unwrap();
        let Some(direct) = reopen_direct(&tmp.file).unwrap() else {
            eprintln!("this filesystem refuses direct writes: nothing to compare");
            return;
        };
        let mut expected = old.clone();
        let mut bounce = Vec::new();
        // Longer than one bounce buffer, both ends unaligned; then a short one
        // inside one page.
        for (offset, n) in [(1_234usize, DIRECT_STEP + 10_000), (len - 600, 500)] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 253) as u8 ^ 0x5a).collect();
            expected[offset..offset + n].copy_from_slice(&data);
            let wrote =
                write_direct_at(&tmp.file, &direct, &data, offset as u64, &mut bounce).unwrap();
            assert!(wrote);
        }
        let mut back = vec![0; len];
        tmp.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back == expected, "the patched file differs");
    }
}
