//! The binary as a user runs it: help, version, and what a missing ONNX
//! Runtime library looks like.

use std::process::Command;

fn time_onnx() -> Command {
    Command::new(env!("CARGO_BIN_EXE_time-onnx"))
}

#[test]
fn help_lists_the_commands() {
    let out = time_onnx().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in ["edit", "generate", "inspect", "doctor"] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
}

#[test]
fn version_is_the_crate_version() {
    let out = time_onnx().arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        concat!("time-onnx ", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn missing_onnx_runtime_is_a_one_line_error_naming_the_fix() {
    let out = time_onnx()
        .arg("doctor")
        .env("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so.1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("/nonexistent/libonnxruntime.so.1") && err.contains("setup.sh"),
        "{err}"
    );
}

#[test]
fn too_old_or_broken_library_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("libonnxruntime.so.1");
    std::fs::write(&fake, b"not a shared object").unwrap();
    let out = time_onnx()
        .arg("doctor")
        .env("ORT_DYLIB_PATH", &fake)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("error: cannot use ONNX Runtime library") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn doctor_finds_the_setup_library() {
    let out = time_onnx().arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ORT Build Info"), "{text}");
}

#[test]
fn inspect_of_a_missing_file_names_it() {
    let out = time_onnx()
        .args(["inspect", "/nonexistent/model.onnx"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("/nonexistent/model.onnx") && err.lines().count() == 1,
        "{err}"
    );
}
