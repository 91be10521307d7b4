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

const UNET: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/sd-tiny/optimum/unet/model.onnx"
);

fn edit_error(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = time_onnx()
        .args(["edit", UNET, "-o"])
        .arg(&out)
        .args(extra)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{extra:?} should fail");
    assert!(!out.exists(), "{extra:?} left an output");
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn destination_missing_a_source_word_names_the_word() {
    let err = edit_error(&["--src", "A pack of roses", "--dst", "A bunch of blue roses"]);
    assert!(err.contains("\"pack\""), "{err}");
}

#[test]
fn lambda_must_be_positive_and_finite() {
    for l in ["0", "-1", "NaN", "inf"] {
        let err = edit_error(&[
            "--src",
            "a rose",
            "--dst",
            "a blue rose",
            &format!("--lambda={l}"),
        ]);
        assert!(
            err.to_lowercase().contains("lambda") || err.contains('λ'),
            "{l}: {err}"
        );
    }
}

#[test]
fn missing_text_encoder_is_named() {
    let err = edit_error(&[
        "--src",
        "a rose",
        "--dst",
        "a blue rose",
        "--text-encoder",
        "/nonexistent/te.onnx",
    ]);
    assert!(err.contains("/nonexistent/te.onnx"), "{err}");
}

#[test]
fn edit_prints_a_one_line_summary_and_records_the_edit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = time_onnx()
        .args([
            "edit",
            UNET,
            "--src",
            "A pack of roses",
            "--dst",
            "A pack of blue roses",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.starts_with("edited 14 of 14 K/V weights") && text.lines().count() == 1,
        "{text}"
    );
    let inspect = time_onnx()
        .arg("inspect")
        .arg(&out)
        .arg("--json")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let meta = v["metadata"].as_array().unwrap();
    let record = meta
        .iter()
        .find(|e| e[0] == "time_onnx.edit.1")
        .expect("edit record");
    assert!(record[1].as_str().unwrap().contains("A pack of blue roses"));
}

#[test]
fn operator_files_are_written_without_a_unet_and_inspected() {
    let dir = tempfile::tempdir().unwrap();
    let op = dir.path().join("roses.safetensors");
    let model = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/sd-tiny/optimum"
    );
    let o = time_onnx()
        .args([
            "edit",
            "--model",
            model,
            "--src",
            "A pack of roses",
            "--dst",
            "A pack of blue roses",
            "--save-operator",
        ])
        .arg(&op)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let i = time_onnx().arg("inspect").arg(&op).output().unwrap();
    let text = String::from_utf8(i.stdout).unwrap();
    assert!(
        text.contains("16×16") && text.contains("\"A pack of blue roses\""),
        "{text}"
    );
}

/// The library's errors name no flags; the CLI adds the flag that fixes
/// them (here `--force` and `--resume`).
#[test]
fn errors_name_the_flag_that_fixes_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let op = dir.path().join("toy.safetensors");
    let o = time_onnx()
        .args(["edit", "--model", &format!("{root}/models/toy")])
        .args([
            "--src",
            "a circle",
            "--dst",
            "a blue circle",
            "--save-operator",
        ])
        .arg(&op)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = time_onnx()
        .args(["generate", "--device", "cpu", "--prompt", "a tree"])
        .args(["--model", &format!("{root}/tests/fixtures/sd-tiny/optimum")])
        .arg("--edit")
        .arg(&op)
        .output()
        .unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another text encoder")
            && err.trim_end().ends_with("use --force to apply it anyway"),
        "{err}"
    );

    let report = dir.path().join("report");
    std::fs::create_dir(&report).unwrap();
    std::fs::write(report.join("results.json"), "{}").unwrap();
    let o = time_onnx()
        .args([
            "eval",
            "--device",
            "cpu",
            "--model",
            &format!("{root}/models/toy"),
        ])
        .args([
            "--dataset",
            &format!("{root}/models/toy/toy_timed.csv"),
            "-o",
        ])
        .arg(&report)
        .output()
        .unwrap();
    let err = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("pass --resume to continue it"), "{err}");
}

const TOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/toy");

/// A toy generation with `extra` arguments, writing into a fresh folder.
fn toy_generate(extra: &[&str]) -> (std::process::Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let o = time_onnx()
        .args([
            "generate", "--model", TOY, "--device", "cpu", "--steps", "2",
        ])
        .arg("-o")
        .arg(dir.path().join("x.png"))
        .args(extra)
        .output()
        .unwrap();
    (o, dir)
}

fn one_error_line(o: &std::process::Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(code), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn sizes_beyond_memory_are_refused_before_allocating() {
    // 100000² pixels would need terabytes: refused against the memory available.
    let huge = [
        "--prompt", "a circle", "--height", "100000", "--width", "100000",
    ];
    let (o, dir) = toy_generate(&huge);
    let err = one_error_line(&o, 1);
    assert!(
        err.contains("100000x100000") && err.contains("available") && err.contains("--max-memory"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // So is an image count, and a limit that was set is named as such.
    let (o, _) = toy_generate(&["--prompt", "a circle", "--num-images", "1000000000000"]);
    assert!(one_error_line(&o, 1).contains("more than the"));
    // (32×32: its decoder's 32-channel layers alone take 393 kB.)
    let (o, _) = toy_generate(&["--prompt", "a circle", "--max-memory", "100K"]);
    let err = one_error_line(&o, 1);
    assert!(err.contains("more than the 100.0 kB allowed"), "{err}");
    // The default size fits in the default limit.
    let (o, dir) = toy_generate(&["--prompt", "a circle"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(dir.path().join("x.png").exists());
}

#[test]
fn float_flags_refuse_nan_and_infinity_by_name() {
    for (flag, value) in [
        ("--guidance", "nan"),
        ("--guidance", "inf"),
        ("--eta", "NaN"),
    ] {
        let (o, dir) = toy_generate(&["--prompt", "a circle", flag, value]);
        let err = one_error_line(&o, 1);
        assert!(
            err.contains(flag) && err.contains("not a finite number"),
            "{err}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

#[test]
fn a_prompt_past_the_token_limit_warns_naming_the_dropped_words() {
    // The toy tokenizer is CLIP's: 75 one-token words fill its 77 ids.
    let long = format!("{} a red square", ["circle"; 75].join(" "));
    let (o, _) = toy_generate(&["--prompt", &long]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("longer than the text encoder's 77 tokens")
            && err.contains("dropped: \"a red square\""),
        "{err}"
    );
    let (o, _) = toy_generate(&["--prompt", "a circle"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("dropped"));
}

#[test]
fn edit_creates_missing_output_folders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("edited/unet/model.onnx");
    let o = time_onnx()
        .args(["edit", &format!("{TOY}/unet/model.onnx")])
        .args(["--src", "a circle", "--dst", "a blue circle", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.exists() && out.with_file_name("model.onnx_data").exists());
    // A file where a folder should be is refused before any work.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, b"x").unwrap();
    let o = time_onnx()
        .args(["edit", &format!("{TOY}/unet/model.onnx")])
        .args(["--src", "a circle", "--dst", "a blue circle", "-o"])
        .arg(blocker.join("unet/model.onnx"))
        .output()
        .unwrap();
    let err = one_error_line(&o, 1);
    assert!(err.contains("is not a folder"), "{err}");
}

#[test]
fn global_flags_come_last_in_each_commands_help() {
    let o = time_onnx().args(["edit", "--help"]).output().unwrap();
    let help = String::from_utf8(o.stdout).unwrap();
    let (src, dst, verbose) = (
        help.find("--src").unwrap(),
        help.find("--dst").unwrap(),
        help.find("--verbose").unwrap(),
    );
    assert!(src < dst && dst < verbose, "{help}");
    assert!(help.contains("Global options:"), "{help}");
}

#[test]
fn grid_captions_each_row_and_refuses_a_wrong_count() {
    use time_onnx::pipeline::png::{read_png, write_png};
    let dir = tempfile::tempdir().unwrap();
    let tiles: Vec<_> = (0..4)
        .map(|k| {
            let p = dir.path().join(format!("t{k}.png"));
            let img = ndarray::Array3::from_elem((32, 32, 3), 0.5f32);
            write_png(&p, img.view(), &[]).unwrap();
            p
        })
        .collect();
    let grid = |extra: &[&str], out: &str| {
        time_onnx()
            .arg("grid")
            .args(&tiles)
            .args(["--cols", "2", "-o"])
            .arg(dir.path().join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    let plain = grid(&[], "plain.png");
    assert!(plain.status.success());
    let captioned = grid(
        &[
            "--row-label",
            "a circle",
            "--row-label",
            "a square",
            "--heading",
            "before",
        ],
        "captioned.png",
    );
    assert!(captioned.status.success(), "{captioned:?}");
    let (p, c) = (
        read_png(&dir.path().join("plain.png")).unwrap(),
        read_png(&dir.path().join("captioned.png")).unwrap(),
    );
    assert!(
        c.dim().0 > p.dim().0 && c.dim().1 > p.dim().1,
        "{:?} {:?}",
        c.dim(),
        p.dim()
    );
    // The caption margins hold black ink; the tiles are mid grey.
    assert!(c.iter().any(|&v| v == 0.0));

    let wrong = grid(&["--row-label", "only one"], "wrong.png");
    assert_eq!(wrong.status.code(), Some(1));
    let err = String::from_utf8(wrong.stderr).unwrap();
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--row-label: 1 given for 2 rows"), "{err}");
    assert!(!dir.path().join("wrong.png").exists());
}

/// The "linear algebra:" line of `doctor`, run with `env`.
fn blas_line(env: &[(&str, &str)]) -> String {
    let out = time_onnx()
        .arg("doctor")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("linear algebra: "))
        .unwrap_or_else(|| panic!("no linear algebra line in:\n{text}"))
        .to_owned()
}

#[test]
fn the_edits_linear_algebra_runs_on_the_cpus_vector_units() {
    // Debian 12's OpenBLAS falls back to its SSE3 "Prescott" kernels on CPUs
    // newer than it (Emerald Rapids: 4 × slower edits) unless told otherwise.
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = flags
        .lines()
        .find_map(|l| l.strip_prefix("flags"))
        .map(|l| l.split_whitespace().collect())
        .unwrap_or_default();
    let line = blas_line(&[]);
    if flags.contains(&"avx2") && flags.contains(&"fma") {
        assert!(!line.contains("Prescott"), "{line}");
    } else {
        eprintln!("skipped: no AVX2 on this CPU ({line})");
    }
    // A kernel choice of the user's is left as it is.
    #[cfg(target_arch = "x86_64")]
    assert_eq!(
        blas_line(&[("OPENBLAS_CORETYPE", "Prescott")]),
        "OpenBLAS, Prescott kernels (OPENBLAS_CORETYPE=Prescott)"
    );
}
