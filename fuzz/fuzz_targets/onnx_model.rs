//! Arbitrary bytes as an ONNX model file: decoding, the tensor table, tensor
//! bytes, the cross-attention locator and `inspect`'s summary must return
//! errors, never panic, and never read a file outside the model's folder.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use time_onnx::onnx::{Model, Storage, Summary, cross_attention};

/// An empty folder: the only external data a fuzzed model may find is none,
/// so any external tensor that reads successfully came from outside it.
static DIR: LazyLock<PathBuf> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("time-onnx-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp folder");
    dir
});

fuzz_target!(|data: &[u8]| {
    let path = DIR.join("model.onnx");
    let Ok(model) = Model::from_bytes(&path, bytes::Bytes::copy_from_slice(data)) else {
        return;
    };
    if let Ok(graph) = model.graph() {
        for t in &graph.initializer {
            let Ok(info) = model.tensor_info(t) else {
                continue;
            };
            let bytes = model.tensor_bytes(&info);
            if let (Ok(_), Storage::External { location, .. }) = (&bytes, &info.storage) {
                panic!(
                    "external data {location:?} was read from outside {}",
                    dir().display()
                );
            }
            if let Ok(b) = bytes {
                assert_eq!(b.len() as u64, info.nbytes, "tensor {:?}", info.name);
            }
        }
    }
    let _ = cross_attention::locate(&model);
    let _ = Summary::of(&model);
});

fn dir() -> &'static Path {
    &DIR
}
