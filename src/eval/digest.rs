//! Content hashes of an evaluation's inputs and outputs.
//!
//! Shards of one evaluation run on different machines, where the same model
//! and dataset sit at different paths; what makes two shards mergeable is
//! that they read the same bytes, so reports name their inputs by SHA-256.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

/// SHA-256 of a file's bytes, as hex.
pub fn file(path: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    hash_file(&mut h, path)?;
    Ok(hex(&h.finalize()))
}

/// SHA-256 over the named files and folders of `root` (each folder's
/// regular files, recursively, hidden ones left out: they are our own
/// temporaries), as hex. Each file contributes its path relative to `root`,
/// its length and its bytes, in sorted path order, so that a renamed, added
/// or changed file changes the digest and nothing else does. Names that do
/// not exist are skipped.
///
/// (SD 1.4's ONNX folder is about 4 GB: a few seconds at SHA-256's speed
/// with the CPU's SHA instructions.)
pub fn tree(root: &Path, names: &[&str]) -> std::io::Result<String> {
    let mut files = Vec::new();
    for name in names {
        collect(root, Path::new(name), &mut files)?;
    }
    files.sort();
    let mut h = Sha256::new();
    for rel in &files {
        let path = root.join(rel);
        let bytes = rel.to_string_lossy();
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes.as_bytes());
        h.update(std::fs::metadata(&path)?.len().to_le_bytes());
        hash_file(&mut h, &path)?;
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of some bytes, as hex.
pub fn bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn collect(root: &Path, rel: &Path, files: &mut Vec<std::path::PathBuf>) -> std::io::Result<()> {
    let path = root.join(rel);
    let Ok(meta) = std::fs::metadata(&path) else {
        return Ok(());
    };
    if meta.is_file() {
        files.push(rel.to_path_buf());
    } else if meta.is_dir() {
        for entry in std::fs::read_dir(&path)? {
            let name = entry?.file_name();
            if !name.to_string_lossy().starts_with('.') {
                collect(root, &rel.join(name), files)?;
            }
        }
    }
    Ok(())
}

fn hash_file(h: &mut Sha256, path: &Path) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        h.update(&buf[..n]);
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_abc_is_the_fips_vector() {
        // FIPS 180-2, appendix B.1.
        assert_eq!(
            bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_tree_digest_sees_contents_and_names_but_not_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("unet")).unwrap();
        std::fs::write(root.join("unet/model.onnx"), b"weights").unwrap();
        std::fs::write(root.join("world.json"), b"{}").unwrap();
        let names = ["unet", "world.json", "absent"];
        let first = tree(root, &names).unwrap();
        std::fs::write(root.join("unet/.model.onnx.tmp.1"), b"junk").unwrap();
        std::fs::write(root.join("README.md"), b"not read").unwrap();
        assert_eq!(tree(root, &names).unwrap(), first);
        std::fs::write(root.join("unet/model.onnx"), b"weightz").unwrap();
        let changed = tree(root, &names).unwrap();
        assert_ne!(changed, first);
        std::fs::rename(root.join("unet/model.onnx"), root.join("unet/other.onnx")).unwrap();
        assert_ne!(tree(root, &names).unwrap(), changed);
    }
}
