//! Reading the small files a user names (edit and prompt lists, datasets,
//! priors, operators) with a ceiling on their size, checked before the
//! bytes are held: a UNet's 10 GB passed by mistake, or `/dev/zero`, is
//! refused at once instead of being read into memory first.

use std::io::Read;
use std::path::Path;

/// The most a prompt list, edit list or dataset may hold: TIMED's CSV is
/// ~100 KB, a list of 1,000 prompts ~50 KB.
pub const TEXT_LIMIT: u64 = 64 << 20;

/// The most an operator or prior file may hold: one d × d matrix, 32 MiB in
/// f64 for SDXL's d = 2048, and its metadata.
pub const MATRIX_LIMIT: u64 = 256 << 20;

/// The bytes of `path`, or an error of kind `FileTooLarge` when it holds
/// more than `limit` bytes. A regular file's size is checked before
/// reading; anything else (a pipe, a device) is read up to the limit.
pub fn read(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let too_large = || {
        std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!(
                "more than {} MiB, too large for this kind of file",
                limit >> 20
            ),
        )
    };
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path, limit: u64) -> std::io::Result<String> {
    String::from_utf8(read(path, limit)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "stream did not contain valid UTF-8",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_over_the_limit_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.txt");
        std::fs::write(&path, "a cup\na dog\n").unwrap();
        assert_eq!(read_to_string(&path, 12).unwrap(), "a cup\na dog\n");
        let err = read(&path, 11).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge);
        // A sparse file says its size without being written.
        let big = dir.path().join("big.bin");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(TEXT_LIMIT + 1)
            .unwrap();
        assert_eq!(
            read(&big, TEXT_LIMIT).unwrap_err().kind(),
            std::io::ErrorKind::FileTooLarge
        );
    }

    #[test]
    fn endless_streams_stop_at_the_limit() {
        let err = read(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge);
    }

    #[test]
    fn text_must_be_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.csv");
        std::fs::write(&path, [0xff, 0xfe, 0, 1]).unwrap();
        let err = read_to_string(&path, TEXT_LIMIT).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    }
}
