//! Hostile input and faults, through the binary as a user runs it: malformed
//! and malicious model files, odd prompts and numbers, failing disks, kills
//! and interrupts, concurrent writers. Each case must end in a one-line error
//! and exit 1 (never a panic), leave the input byte-identical, and leave no
//! file under the output name unless that file is whole. RELIABILITY.md lists
//! the cases and what was observed.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;

use prost::Message;
use sha2::{Digest, Sha256};
use time_onnx::onnx::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, tensor_shape_proto, type_proto,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/sd-tiny");

fn fixture(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

fn optimum_unet() -> PathBuf {
    fixture("optimum/unet/model.onnx")
}

fn time_onnx() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_time-onnx"));
    c.env_remove("RUST_BACKTRACE");
    c
}

/// `edit` of `unet` with the fixture's text side, writing `out`.
fn edit_cmd(unet: &Path, out: &Path, src: &str, dst: &str) -> Command {
    edit_cmd_with(
        unet,
        out,
        src,
        dst,
        &fixture("optimum/text_encoder/model.onnx"),
    )
}

fn edit_cmd_with(unet: &Path, out: &Path, src: &str, dst: &str, text_encoder: &Path) -> Command {
    let mut c = time_onnx();
    c.arg("edit")
        .arg(unet)
        .args(["--src", src, "--dst", dst, "-o"])
        .arg(out)
        .arg("--text-encoder")
        .arg(text_encoder)
        .arg("--tokenizer")
        .arg(fixture("tokenizer"));
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit 1 with exactly one line on stderr, `error: …`, and no panic.
fn assert_clean_error(o: &Output, case: &str) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{case}: {:?}\n{err}", o.status);
    assert_eq!(err.lines().count(), 1, "{case}: {err}");
    assert!(err.starts_with("error: "), "{case}: {err}");
    assert!(!err.contains("panicked"), "{case}: {err}");
    err
}

/// Exit 0, or a clean error: what a malformed file that may happen to be
/// valid (a truncation at a message boundary) must give.
fn assert_ok_or_clean_error(o: &Output, case: &str) {
    if o.status.code() != Some(0) {
        assert_clean_error(o, case);
    }
}

fn sha(path: &Path) -> String {
    let mut h = Sha256::new();
    h.update(std::fs::read(path).unwrap());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The hashes of every file in a folder, by name (hidden ones included).
fn tree(dir: &Path) -> Vec<(String, String)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                sha(&p),
            )
        })
        .collect();
    v.sort();
    v
}

fn hidden_temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect()
}

/// Deterministic noise for the random cases (xorshift64).
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A copy of the optimum fixture's UNet folder (model + external data) in a
/// fresh temp folder, with the model's protobuf changed by `change`.
fn unet_copy(change: impl FnOnce(&mut ModelProto)) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let unet = dir.path().join("unet");
    std::fs::create_dir(&unet).unwrap();
    let src = optimum_unet();
    std::fs::copy(
        src.with_file_name("model.onnx_data"),
        unet.join("model.onnx_data"),
    )
    .unwrap();
    let mut m = ModelProto::decode(std::fs::read(&src).unwrap().as_slice()).unwrap();
    change(&mut m);
    let path = unet.join("model.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    (dir, path)
}

fn graph(m: &mut ModelProto) -> &mut GraphProto {
    m.graph.as_mut().unwrap()
}

fn set_location(t: &mut TensorProto, location: &str) {
    for e in &mut t.external_data {
        if e.key == "location" {
            e.value = location.into();
        }
    }
}

fn is_external(t: &TensorProto) -> bool {
    t.external_data.iter().any(|e| e.key == "location")
}

/// The first K/V weight of the fixture UNet: external, `[16, c]` (16 = the
/// text embedding width, stored transposed).
fn kv_weight(m: &mut ModelProto) -> &mut TensorProto {
    graph(m)
        .initializer
        .iter_mut()
        .find(|t| is_external(t) && t.dims.len() == 2 && t.dims[0] == 16)
        .expect("a K/V weight [16, c]")
}

// ---------------------------------------------------------------------------
// Malformed ONNX
// ---------------------------------------------------------------------------

#[test]
fn truncated_at_100_lengths_and_random_bytes_give_clean_errors() {
    let (dir, model) = unet_copy(|_| {});
    let full = std::fs::read(&model).unwrap();
    let cut = model.with_file_name("cut.onnx");
    let out = dir.path().join("out.onnx");
    let mut outcomes = [0usize; 2];
    for i in 0..100 {
        let len = full.len() * i / 100;
        std::fs::write(&cut, &full[..len]).unwrap();
        let o = time_onnx().arg("inspect").arg(&cut).output().unwrap();
        assert_ok_or_clean_error(&o, &format!("inspect, truncated to {len}"));
        let o = edit_cmd(&cut, &out, "a rose", "a blue rose")
            .output()
            .unwrap();
        assert_ok_or_clean_error(&o, &format!("edit, truncated to {len}"));
        outcomes[usize::from(o.status.success())] += 1;
        let _ = std::fs::remove_file(&out);
        let _ = std::fs::remove_file(out.with_file_name("out.onnx_data"));
    }
    // A protobuf cut at a message boundary parses, but no prefix of a graph
    // keeps all 14 K/V projections and the final node: every edit fails.
    assert_eq!(outcomes, [100, 0], "[errors, successes] of edit");

    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    for case in 0..20 {
        let len = (noise.next() % 4096) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| noise.next() as u8).collect();
        std::fs::write(&cut, &bytes).unwrap();
        let o = time_onnx().arg("inspect").arg(&cut).output().unwrap();
        assert_ok_or_clean_error(&o, &format!("random bytes #{case}"));
        let o = edit_cmd(&cut, &out, "a rose", "a blue rose")
            .output()
            .unwrap();
        assert_clean_error(&o, &format!("edit of random bytes #{case}"));
    }
    assert!(!out.exists());
}

#[test]
fn length_past_the_end_is_a_decode_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.onnx");
    // field 7 (graph), wire type 2, length 1000, then 10 bytes
    let mut bytes = vec![0x3a, 0xe8, 0x07];
    bytes.extend([0u8; 10]);
    std::fs::write(&path, bytes).unwrap();
    let o = time_onnx().arg("inspect").arg(&path).output().unwrap();
    let err = assert_clean_error(&o, "length past the end");
    assert!(err.contains("m.onnx"), "{err}");
}

/// Each malformed K weight: `edit` must refuse it with a message containing
/// the given words, without writing anything.
#[test]
fn malformed_weight_headers_are_refused_by_edit_and_inspect() {
    type Change = fn(&mut TensorProto);
    let cases: [(&str, Change, &str); 5] = [
        ("negative dimension", |t| t.dims[0] = -t.dims[0], "negative"),
        (
            "dimensions overflowing when multiplied",
            |t| t.dims = vec![i64::MAX / 2, 4],
            "overflow",
        ),
        (
            "data_type disagreeing with the byte length",
            |t| t.data_type = 11, // double: twice the bytes
            "length",
        ),
        (
            "external offset + length past the end",
            |t| {
                for e in &mut t.external_data {
                    if e.key == "offset" {
                        e.value = (4 << 20).to_string();
                    }
                }
            },
            "past the end",
        ),
        (
            "absolute location",
            |t| set_location(t, "/etc/passwd"),
            "location",
        ),
    ];
    for (case, change, words) in cases {
        let (dir, unet) = unet_copy(|m| change(kv_weight(m)));
        let out = dir.path().join("out.onnx");
        let before = tree(unet.parent().unwrap());
        let o = edit_cmd(&unet, &out, "a rose", "a blue rose")
            .output()
            .unwrap();
        let err = assert_clean_error(&o, case);
        assert!(err.to_lowercase().contains(words), "{case}: {err}");
        assert!(!out.exists(), "{case}");
        assert_eq!(
            tree(unet.parent().unwrap()),
            before,
            "{case}: input changed"
        );
        let o = time_onnx().arg("inspect").arg(&unet).output().unwrap();
        assert_ok_or_clean_error(&o, &format!("inspect: {case}"));
    }
}

/// The first child process of `pid`, from /proc.
fn child_of(pid: u32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Whether process `pid` has a file in `dir` open (an unnamed file shows as
/// `<dir>/#<inode> (deleted)`).
fn has_file_open_in(pid: i32, dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target.parent() == Some(dir.as_path()))
    })
}

/// Whether `dir`'s filesystem makes unnamed files (O_TMPFILE).
fn unnamed_files_work(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; the descriptor is closed right away.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600);
        fd >= 0 && libc::close(fd) == 0
    }
}

fn strace_available() -> bool {
    let ok = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("strace not available: skipping (scripts/setup.sh installs it)");
    }
    ok
}

/// Runs `cmd` under strace and returns its output and every path it tried to
/// open or stat.
fn traced(cmd: &Command, log: &Path) -> (Output, String) {
    let mut c = Command::new("strace");
    c.args(["-f", "-qq", "-e", "trace=%file", "-o"])
        .arg(log)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    let o = c.output().unwrap();
    (o, std::fs::read_to_string(log).unwrap())
}

#[test]
fn locations_leaving_the_folder_are_refused_without_opening_anything_outside() {
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.bin");
    std::fs::write(&secret, vec![0u8; 1 << 20]).unwrap();
    let escape = format!(
        "../../{}/secret.bin",
        outside.path().file_name().unwrap().to_string_lossy()
    );
    let cases: [(&str, String); 4] = [
        ("absolute", secret.display().to_string()),
        ("escaping with ..", escape),
        ("/etc/passwd", "/etc/passwd".into()),
        ("symlink out of the folder", "link.bin".into()),
    ];
    let strace = strace_available();
    for (case, location) in cases {
        let (dir, unet) = unet_copy(|m| set_location(kv_weight(m), &location));
        std::os::unix::fs::symlink(&secret, unet.with_file_name("link.bin")).unwrap();
        let out = dir.path().join("out.onnx");
        let cmd = edit_cmd(&unet, &out, "a rose", "a blue rose");
        let (o, opened) = if strace {
            traced(&cmd, &dir.path().join("strace.log"))
        } else {
            let mut cmd = cmd;
            (cmd.output().unwrap(), String::new())
        };
        let err = assert_clean_error(&o, case);
        assert!(err.contains("location"), "{case}: {err}");
        assert!(!out.exists());
        for line in opened.lines() {
            let opens = line.contains("open");
            assert!(
                !(opens && (line.contains("secret.bin") || line.contains("/etc/passwd"))),
                "{case}: opened outside the model folder: {line}"
            );
        }
    }
}

#[test]
fn encoder_hidden_states_missing_or_unused_is_a_clear_error() {
    type Change = fn(&mut ModelProto);
    let cases: [(&str, Change); 2] = [
        ("input missing", |m| {
            graph(m).input.retain(|i| i.name != "encoder_hidden_states");
        }),
        ("input feeding nothing", |m| {
            for n in &mut graph(m).node {
                for i in &mut n.input {
                    if i == "encoder_hidden_states" {
                        *i = "something_else".into();
                    }
                }
            }
        }),
    ];
    for (case, change) in cases {
        let (dir, unet) = unet_copy(change);
        let out = dir.path().join("out.onnx");
        let o = edit_cmd(&unet, &out, "a rose", "a blue rose")
            .output()
            .unwrap();
        let err = assert_clean_error(&o, case);
        assert!(err.contains("encoder_hidden_states"), "{case}: {err}");
        assert!(!out.exists());
    }
}

// ---------------------------------------------------------------------------
// Prompts and numbers
// ---------------------------------------------------------------------------

fn edit_in_temp(src: &str, dst: &str, extra: &[&str]) -> (tempfile::TempDir, Output) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let o = edit_cmd(&optimum_unet(), &out, src, dst)
        .args(extra)
        .output()
        .unwrap();
    (dir, o)
}

#[test]
fn empty_and_whitespace_prompts_are_refused() {
    for (src, dst, which) in [
        ("", "a blue rose", "source"),
        ("   \t\n ", "blue", "source"),
        ("a rose", "", "destination"),
        ("", "", "source"),
    ] {
        let (dir, o) = edit_in_temp(src, dst, &[]);
        let err = assert_clean_error(&o, &format!("{src:?} -> {dst:?}"));
        assert!(
            err.contains(&format!("the {which} prompt is empty")),
            "{err}"
        );
        assert!(!dir.path().join("out.onnx").exists());
    }
}

#[test]
fn unusual_but_valid_prompts_edit() {
    let tail = " and so on".repeat(20); // 60 tokens
    let cases = [
        (
            "emoji and non-ASCII",
            "a 🌹 rose in Zürich, 東京".to_string(),
            "a blue 🌹 rose in Zürich, 東京".to_string(),
        ),
        (
            "control characters",
            "a\u{1}rose\u{7}".into(),
            "a blue\u{1}rose\u{7}".into(),
        ),
        (
            "a destination over 77 tokens (cut: the source still fits)",
            format!("a rose{tail}"),
            format!("a blue rose{tail}{tail}"),
        ),
    ];
    for (case, src, dst) in cases {
        let (dir, o) = edit_in_temp(&src, &dst, &[]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert!(dir.path().join("out.onnx").exists(), "{case}");
    }
}

#[test]
fn a_source_word_pushed_past_77_tokens_is_named() {
    let tail = " and so on".repeat(30); // 90 tokens: both prompts are cut
    let (dir, o) = edit_in_temp(
        &format!("a rose{tail} end"),
        &format!("a blue rose{tail} end"),
        &[],
    );
    let err = assert_clean_error(&o, "over 77 tokens");
    assert!(err.contains("only after its first 77 tokens"), "{err}");
    assert!(!dir.path().join("out.onnx").exists());
}

#[test]
fn long_prompts_in_errors_stay_readable() {
    let long: String = (0..100).map(|i| format!("word{i} ")).collect();
    let (_dir, o) = edit_in_temp(&format!("a rose {long}"), &format!("a bunch {long}"), &[]);
    let err = assert_clean_error(&o, "missing word in a long prompt");
    assert!(err.contains("\"rose\""), "{err}");
    assert!(err.len() < 400, "{} characters: {err}", err.len());
}

#[test]
fn source_equal_to_destination_is_a_no_op_that_says_so() {
    let (dir, o) = edit_in_temp("a rose", "a rose", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("nothing to edit"), "{text}");
    // the weights (the external data) are the input's, byte for byte
    assert_eq!(
        sha(&dir.path().join("out.onnx_data")),
        sha(&optimum_unet().with_file_name("model.onnx_data"))
    );
}

#[test]
fn lambda_out_of_range_is_refused() {
    for l in ["0", "-0.5", "NaN", "inf", "-inf", "1e400"] {
        let (dir, o) = edit_in_temp("a rose", "a blue rose", &[&format!("--lambda={l}")]);
        let err = assert_clean_error(&o, l);
        assert!(err.contains("lambda"), "{l}: {err}");
        assert!(!dir.path().join("out.onnx").exists());
    }
}

/// A text encoder that returns NaN: Cast(ids) → Unsqueeze → × NaN.
fn nan_text_encoder(path: &Path, width: i64) {
    let dim = |v: Option<i64>, p: &str| tensor_shape_proto::Dimension {
        value: Some(match v {
            Some(v) => tensor_shape_proto::dimension::Value::DimValue(v),
            None => tensor_shape_proto::dimension::Value::DimParam(p.into()),
        }),
        ..Default::default()
    };
    let info = |name: &str, elem: i32, dims: Vec<tensor_shape_proto::Dimension>| ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(TensorShapeProto { dim: dims }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let node =
        |op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>| NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        };
    let to_float = AttributeProto {
        name: "to".into(),
        r#type: 2, // INT
        i: 1,      // FLOAT
        ..Default::default()
    };
    let nan = TensorProto {
        name: "nan".into(),
        dims: vec![1, 1, width],
        data_type: 1,
        raw_data: f32::NAN.to_le_bytes().repeat(width as usize).into(),
        ..Default::default()
    };
    let axes = TensorProto {
        name: "axes".into(),
        dims: vec![1],
        data_type: 7,
        raw_data: 2i64.to_le_bytes().to_vec().into(),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 14,
        }],
        graph: Some(GraphProto {
            name: "nan_text_encoder".into(),
            node: vec![
                node("Cast", &["input_ids"], "f", vec![to_float]),
                node("Unsqueeze", &["f", "axes"], "u", vec![]),
                node("Mul", &["u", "nan"], "last_hidden_state", vec![]),
            ],
            initializer: vec![nan, axes],
            input: vec![info(
                "input_ids",
                7,
                vec![dim(None, "batch"), dim(Some(77), "")],
            )],
            output: vec![info(
                "last_hidden_state",
                1,
                vec![dim(None, "batch"), dim(Some(77), ""), dim(Some(width), "")],
            )],
            ..Default::default()
        }),
        metadata_props: vec![StringStringEntryProto {
            key: "purpose".into(),
            value: "time-onnx test: returns NaN".into(),
        }],
        ..Default::default()
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
}

#[test]
fn a_text_encoder_returning_nan_stops_the_edit() {
    let dir = tempfile::tempdir().unwrap();
    let te = dir.path().join("nan.onnx");
    nan_text_encoder(&te, 16);
    let out = dir.path().join("out.onnx");
    let o = edit_cmd_with(&optimum_unet(), &out, "a rose", "a blue rose", &te)
        .output()
        .unwrap();
    let err = assert_clean_error(&o, "NaN text encoder");
    assert!(err.contains("non-finite"), "{err}");
    // The UNet's copy starts before the text encoder runs: stopping the edit
    // after it must remove the copy too.
    assert!(!out.exists());
    assert_eq!(hidden_temp_files(dir.path()), Vec::<String>::new());
}

#[test]
fn an_edit_overflowing_fp16_is_refused() {
    // The fp16 fixture with every K/V weight at fp16's largest magnitude,
    // 65504, the sign alternating along the text-embedding axis: an entry of
    // the edited Aᵀ·Wᵀ is then 65504·Σₖ ±Aₖᵢ, past fp16's range as soon as
    // one such alternating column sum of A exceeds 1.0003 (this edit moves
    // the weights by ~90%).
    let src = fixture("fp16/unet/model.onnx");
    let m = time_onnx::onnx::Model::open(&src).unwrap();
    let kv = time_onnx::onnx::cross_attention::locate(&m).unwrap();
    let patches: Vec<_> = kv
        .iter()
        .map(|p| {
            assert_eq!(
                p.layout,
                time_onnx::onnx::cross_attention::Layout::Transposed
            );
            let n = p.tensor.nbytes as usize / 2;
            let cols = n / 16; // [16, out]: 16 = the text embedding width
            let data = (0..n)
                .flat_map(|e| {
                    let v = if (e / cols).is_multiple_of(2) {
                        half::f16::MAX
                    } else {
                        half::f16::MIN
                    };
                    v.to_le_bytes()
                })
                .collect();
            time_onnx::onnx::patch::TensorPatch {
                tensor: p.tensor.clone(),
                data,
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let unet = dir.path().join("big.onnx");
    common::write_patched(&m, &patches, &[], &unet).unwrap();
    let out = dir.path().join("out.onnx");
    let o = edit_cmd(&unet, &out, "A pack of roses", "A pack of blue roses")
        .output()
        .unwrap();
    let err = assert_clean_error(&o, "fp16 overflow");
    assert!(err.contains("fp16") || err.contains("float16"), "{err}");
    assert!(!out.exists());
    assert_eq!(hidden_temp_files(dir.path()), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// Files and processes
// ---------------------------------------------------------------------------

#[test]
fn output_equal_to_the_input_is_refused_even_through_a_link() {
    let (dir, unet) = unet_copy(|_| {});
    let before = tree(unet.parent().unwrap());
    let hard = dir.path().join("hard.onnx");
    std::fs::hard_link(&unet, &hard).unwrap();
    let soft = dir.path().join("soft.onnx");
    std::os::unix::fs::symlink(&unet, &soft).unwrap();
    for out in [unet.clone(), hard, soft] {
        let o = edit_cmd(&unet, &out, "a rose", "a blue rose")
            .output()
            .unwrap();
        let err = assert_clean_error(&o, &format!("output {}", out.display()));
        assert!(err.contains("input"), "{err}");
    }
    assert_eq!(tree(unet.parent().unwrap()), before, "the input changed");
}

#[test]
fn an_output_whose_data_file_is_the_inputs_is_refused() {
    // The input's weights live in `out.onnx_data`: writing `out.onnx` beside
    // it would put the output's data file over them.
    let (dir, unet) = unet_copy(|m| {
        for t in &mut graph(m).initializer {
            if is_external(t) {
                set_location(t, "out.onnx_data");
            }
        }
    });
    std::fs::rename(
        unet.with_file_name("model.onnx_data"),
        unet.with_file_name("out.onnx_data"),
    )
    .unwrap();
    let before = tree(unet.parent().unwrap());
    let o = edit_cmd(
        &unet,
        &unet.with_file_name("out.onnx"),
        "a rose",
        "a blue rose",
    )
    .output()
    .unwrap();
    let err = assert_clean_error(&o, "data file over the input's");
    assert!(err.contains("input"), "{err}");
    assert_eq!(tree(unet.parent().unwrap()), before, "the input changed");
    drop(dir);
}

#[test]
fn missing_output_folders_are_created_read_only_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Missing folders are created, as a user of `-o edited/unet/model.onnx` expects (#19).
    let out = dir.path().join("no/such/folder/out.onnx");
    let o = edit_cmd(&optimum_unet(), &out, "a rose", "a blue rose")
        .output()
        .unwrap();
    assert!(o.status.success(), "missing folder: {}", stderr(&o));
    assert!(out.exists() && out.with_file_name("out.onnx_data").exists());

    // Root ignores permissions: drop the two capabilities that let it
    // (setpriv, util-linux) and stay root, so that the fixtures stay readable
    // wherever the checkout lives (/root is 0700 on a fresh machine).
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let cmd = edit_cmd(
        &optimum_unet(),
        &ro.join("out.onnx"),
        "a rose",
        "a blue rose",
    );
    // SAFETY: geteuid has no preconditions.
    let o = if unsafe { libc::geteuid() } == 0 {
        let caps = "-dac_override,-dac_read_search";
        let mut c = Command::new("setpriv");
        c.args([
            format!("--bounding-set={caps}"),
            format!("--inh-caps={caps}"),
        ])
        .arg(cmd.get_program())
        .args(cmd.get_args());
        match c.output() {
            Ok(o) => o,
            Err(e) => {
                eprintln!("setpriv unavailable ({e}): skipping the read-only case as root");
                return;
            }
        }
    } else {
        let mut cmd = cmd;
        cmd.output().unwrap()
    };
    let err = assert_clean_error(&o, "read-only folder");
    assert!(err.contains("ermission denied"), "{err}");
    assert!(
        std::fs::read_dir(&ro).unwrap().next().is_none(),
        "files left in the read-only folder"
    );
}

#[test]
fn a_file_size_limit_mid_write_leaves_nothing() {
    // The optimum edit writes ~4.6 MB; `ulimit -f 1024` stops it at 1 MiB.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let cmd = edit_cmd(&optimum_unet(), &out, "a rose", "a blue rose");
    let mut script = String::from("ulimit -f 1024; exec");
    for a in std::iter::once(cmd.get_program()).chain(cmd.get_args()) {
        script.push_str(&format!(" '{}'", a.to_string_lossy()));
    }
    let o = Command::new("bash").args(["-c", &script]).output().unwrap();
    let err = assert_clean_error(&o, "ulimit -f");
    assert!(err.contains("File too large"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "files left behind"
    );
}

#[test]
fn a_full_disk_during_the_copy_leaves_nothing() {
    if !strace_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let cmd = edit_cmd(&optimum_unet(), &out, "a rose", "a blue rose");
    for (case, inject) in [
        ("copy", "inject=copy_file_range:error=ENOSPC"),
        ("patch", "inject=pwrite64:error=ENOSPC"),
    ] {
        let o = Command::new("strace")
            .args(["-f", "-qq", "-o", "/dev/null", "-e", inject])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .output()
            .unwrap();
        let err = assert_clean_error(&o, case);
        assert!(err.contains("No space left on device"), "{case}: {err}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{case}: files left"
        );
    }
}

/// The reference output of the optimum edit (model + data), for comparisons;
/// written as `out.onnx` (the name is recorded in the model's `location`
/// fields), in a folder of its own under `dir`.
fn reference_edit(dir: &Path, dst: &str) -> [String; 2] {
    let sub = tempfile::tempdir_in(dir).unwrap().keep();
    let out = sub.join("out.onnx");
    let o = edit_cmd(&optimum_unet(), &out, "a rose", dst)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    [sha(&out), sha(&out.with_file_name("out.onnx_data"))]
}

fn output_state(out: &Path) -> Option<[String; 2]> {
    let data = out.with_file_name("out.onnx_data");
    match (out.exists(), data.exists()) {
        (false, _) => None,
        (true, true) => Some([sha(out), sha(&data)]),
        (true, false) => panic!("a model without its data file"),
    }
}

#[test]
fn sigkill_at_random_points_never_leaves_a_partial_output() {
    let refs = tempfile::tempdir().unwrap();
    let whole = reference_edit(refs.path(), "a blue rose");
    let input_before = tree(optimum_unet().parent().unwrap());
    // How long one edit takes here, to spread the kills over it.
    let t0 = Instant::now();
    reference_edit(refs.path(), "a blue rose");
    let span = t0.elapsed().as_micros() as u64;
    let mut noise = Noise(42);
    let (mut absent, mut complete) = (0, 0);
    for _ in 0..30 {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.onnx");
        let mut child = edit_cmd(&optimum_unet(), &out, "a rose", "a blue rose")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(noise.next() % (span + 1)));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        match output_state(&out) {
            None => absent += 1,
            Some(state) => {
                assert_eq!(state, whole, "a partial or different output");
                complete += 1;
            }
        }
    }
    eprintln!("SIGKILL at random points: {absent} runs left no output, {complete} a whole one");
    assert_eq!(tree(optimum_unet().parent().unwrap()), input_before);
}

#[test]
fn sigkill_and_sigint_during_the_write() {
    if !strace_available() {
        return;
    }
    let refs = tempfile::tempdir().unwrap();
    let whole = reference_edit(refs.path(), "a blue rose");
    // Pause the process for 3 s inside the write (mid copy, then just before
    // the renames), signal it there, and look at what is left.
    for (at, syscall) in [
        ("mid copy", "copy_file_range"),
        ("before the renames", "rename"),
    ] {
        for sig in ["KILL", "INT", "TERM"] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("out.onnx");
            let cmd = edit_cmd(&optimum_unet(), &out, "a rose", "a blue rose");
            let inject = format!("inject={syscall}:delay_enter=3000000:when=1");
            let mut strace = Command::new("strace");
            // A harness that runs us in the background (a non-interactive
            // shell's `&`) hands down SIGINT ignored, and time-onnx keeps
            // signals that were ignored at start ignored: give the child the
            // default dispositions, as a terminal would.
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                strace.pre_exec(|| {
                    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                        libc::signal(sig, libc::SIG_DFL);
                    }
                    Ok(())
                });
            }
            let mut child = strace
                .args([
                    "-f",
                    "-qq",
                    "-o",
                    "/dev/null",
                    "-e",
                    &format!("trace={syscall}"),
                    "-e",
                    &inject,
                ])
                .arg(cmd.get_program())
                .args(cmd.get_args())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // the edit is strace's child; wait until it has a file open in
            // the output folder (unnamed or hidden), i.e. it is writing
            let deadline = Instant::now() + Duration::from_secs(20);
            let pid = loop {
                if let Some(pid) = child_of(child.id())
                    && has_file_open_in(pid, dir.path())
                {
                    break pid;
                }
                assert!(Instant::now() < deadline, "{at}: the edit never wrote");
                std::thread::sleep(Duration::from_millis(10));
            };
            std::thread::sleep(Duration::from_millis(300));
            Command::new("kill")
                .args([&format!("-{sig}"), &pid.to_string()])
                .status()
                .unwrap();
            let status = child.wait().unwrap();
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            if let Some(state) = output_state(&out) {
                assert_eq!(state, whole, "{at}, SIG{sig}: a partial output");
            }
            let left = hidden_temp_files(dir.path());
            if sig == "KILL" {
                assert!(
                    !out.exists(),
                    "{at}: SIGKILL before the renames left an output"
                );
                // Mid copy the files have no name yet where the filesystem
                // makes unnamed files; just before the renames they are
                // named. The next edit into the folder removes what is left.
                if at == "mid copy" && unnamed_files_work(dir.path()) {
                    assert!(left.is_empty(), "{at}: SIGKILL left {left:?}");
                }
                let again = edit_cmd(&optimum_unet(), &out, "a rose", "a blue rose")
                    .output()
                    .unwrap();
                assert!(
                    again.status.success(),
                    "{}",
                    String::from_utf8_lossy(&again.stderr)
                );
                assert_eq!(output_state(&out), Some(whole.clone()));
                let still = hidden_temp_files(dir.path());
                assert!(
                    still.is_empty(),
                    "{at}: left after the next edit: {still:?}"
                );
            } else {
                assert!(left.is_empty(), "{at}, SIG{sig}: temp files left: {left:?}");
                assert!(err.contains(&format!("interrupted by SIG{sig}")), "{err}");
                let code = if sig == "INT" { 130 } else { 143 };
                assert!(
                    status.code() == Some(code) || status.signal().is_some(),
                    "{at}, SIG{sig}: {status:?}"
                );
            }
        }
    }
}

#[test]
fn two_writers_of_one_output_leave_one_whole_result() {
    let refs = tempfile::tempdir().unwrap();
    let a = reference_edit(refs.path(), "a blue rose");
    let b = reference_edit(refs.path(), "a red rose");
    assert_ne!(a, b);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.onnx");
    let mut seen = [0, 0];
    for _ in 0..8 {
        let children: Vec<_> = ["a blue rose", "a red rose"]
            .iter()
            .map(|dst| {
                edit_cmd(&optimum_unet(), &out, "a rose", dst)
                    .stdout(Stdio::null())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let state = output_state(&out).expect("an output");
        assert!(state == a || state == b, "a mix of two writers");
        seen[usize::from(state == b)] += 1;
        assert!(hidden_temp_files(dir.path()).is_empty());
    }
    eprintln!(
        "two writers, 8 rounds: first's result {}, second's {}",
        seen[0], seen[1]
    );
}

#[test]
fn piping_into_a_closed_reader_does_not_panic() {
    let mut child = time_onnx()
        .arg("inspect")
        .arg(optimum_unet())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success() || o.status.signal() == Some(13),
        "{:?}: {}",
        o.status,
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"));
}

// ---------------------------------------------------------------------------
// Determinism
// ---------------------------------------------------------------------------

#[test]
fn the_same_edit_twice_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let a = reference_edit(dir.path(), "a blue rose");
    let b = reference_edit(dir.path(), "a blue rose");
    assert_eq!(a, b);
}

#[test]
fn generation_with_the_same_seed_gives_identical_images() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, threads: &str| {
        let out = dir.path().join(name);
        let o = time_onnx()
            .args(["generate", "--model"])
            .arg(fixture("optimum"))
            .args([
                "--prompt", "a rose", "--steps", "3", "--seed", "7", "--device", "cpu",
            ])
            .args(["--threads", threads, "--output-type", "npy", "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        sha(&out)
    };
    let first = run("a.npy", "1");
    assert_eq!(first, run("b.npy", "1"));
    assert_eq!(first, run("c.npy", "2"), "thread count changed the image");
}

/// Bad edit lists, prompt lists and priors: one line naming the problem, no output.
#[test]
fn bad_edit_lists_and_priors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let out = dir.path().join("out.onnx");
    let with = |extra: &[&std::ffi::OsStr]| {
        let mut c = time_onnx();
        c.arg("edit")
            .arg(optimum_unet())
            .arg("-o")
            .arg(&out)
            .arg("--text-encoder")
            .arg(fixture("optimum/text_encoder/model.onnx"))
            .arg("--tokenizer")
            .arg(fixture("tokenizer"))
            .args(extra);
        c.output().unwrap()
    };
    let good = write("edits.csv", b"src,dst\na rose,a blue rose\n");
    let cases: Vec<(&str, Vec<std::ffi::OsString>, &str)> = vec![
        (
            "edits without columns",
            vec!["--edits".into(), write("a.csv", b"from,to\na,b\n").into()],
            "no src,dst columns",
        ),
        (
            "edits with an empty cell",
            vec![
                "--edits".into(),
                write("b.csv", b"src,dst\na rose,\n").into(),
            ],
            "line 2",
        ),
        (
            "one source, two destinations",
            vec![
                "--edits".into(),
                write(
                    "d.csv",
                    b"src,dst\na rose,a blue rose\na cup,a red cup\nA rose,a white rose\n",
                )
                .into(),
            ],
            "\"A rose\" is edited both to \"a blue rose\" and to \"a white rose\"",
        ),
        (
            "endless edit list",
            vec!["--edits".into(), "/dev/zero".into()],
            "more than 64 MiB",
        ),
        (
            "missing edits file",
            vec!["--edits".into(), dir.path().join("none.csv").into()],
            "none.csv",
        ),
        (
            "edit list not text",
            vec!["--edits".into(), write("c.csv", &[0xff, 0xfe, 0, 1]).into()],
            "c.csv",
        ),
        (
            "empty preserve list",
            vec![
                "--edits".into(),
                good.clone().into(),
                "--preserve".into(),
                write("p.txt", b"# only a comment\n").into(),
            ],
            "no prompts",
        ),
        (
            "negative preserve scale",
            vec![
                "--edits".into(),
                good.clone().into(),
                "--preserve".into(),
                write("q.txt", b"a cup\n").into(),
                "--preserve-scale=-1".into(),
            ],
            "preservation scale",
        ),
        (
            "not a prior",
            vec![
                "--edits".into(),
                good.clone().into(),
                "--prior".into(),
                write("prior.safetensors", b"garbage").into(),
            ],
            "is not a time-onnx preservation prior",
        ),
    ];
    for (case, args, want) in cases {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let o = with(&args);
        let err = assert_clean_error(&o, case);
        assert!(err.contains(want), "{case}: {err}");
        assert!(!out.exists(), "{case}: output written");
    }

    // A prior from another text encoder is refused by name.
    let mut prior = time_onnx::edit::prior::Prior::empty(16);
    prior.add(ndarray::Array3::<f32>::ones((1, 77, 16)).view());
    let foreign = dir.path().join("foreign.safetensors");
    let meta = time_onnx::edit::prior::PriorMeta {
        prompts: 1,
        width: 16,
        text_encoder: "0".repeat(64),
        tool: "test".into(),
    };
    time_onnx::edit::prior::save(&foreign, &prior, &meta).unwrap();
    let o = with(&[
        "--edits".as_ref(),
        good.as_os_str(),
        "--prior".as_ref(),
        foreign.as_os_str(),
    ]);
    let err = assert_clean_error(&o, "foreign prior");
    assert!(err.contains("another text encoder"), "{err}");
    assert!(!out.exists(), "foreign prior: output written");
}

/// A guide concept without the source's words is UCE's erase: the error
/// says which flag does that.
#[test]
fn a_replacement_without_the_source_words_points_to_erase() {
    let (dir, o) = edit_in_temp("Van Gogh", "art", &[]);
    let err = assert_clean_error(&o, "replacement without --erase");
    assert!(err.contains("lacks the word \"van\""), "{err}");
    assert!(err.contains("--erase"), "{err}");
    assert!(!dir.path().join("out.onnx").exists());
}

/// SDXL folders whose parts do not fit: `edit` and `generate` each exit 1
/// with one line naming what is wrong, and write nothing.
#[test]
fn inconsistent_sdxl_folders_get_one_line_naming_the_part() {
    // The tiny SDXL folder with `part` replaced by `with` (or left out).
    let folder = |part: &str, with: Option<PathBuf>| {
        let mut parts = common::sdxl_parts(&[part]);
        parts.extend(with.map(|w| (part, w)));
        common::folder_of(&parts)
    };
    let cases: Vec<(&str, tempfile::TempDir, &str)> = vec![
        (
            "no tokenizer_2",
            folder("tokenizer_2", None),
            "but not tokenizer_2/",
        ),
        (
            "widths that do not add up",
            folder(
                "text_encoder",
                Some(common::fixture("sdxl-tiny/optimum/text_encoder_2")),
            ),
            "64 (32 + 32)",
        ),
        (
            "an SD UNet in an SDXL folder",
            folder("unet", Some(fixture("optimum/unet"))),
            "text_embeds",
        ),
    ];
    for (case, dir, says) in &cases {
        let out = tempfile::tempdir().unwrap();
        let unet = dir.path().join("unet/model.onnx");
        let mut edit = time_onnx();
        edit.arg("edit")
            .arg(&unet)
            .args(["--src", "a car", "--dst", "a red car", "-o"])
            .arg(out.path().join("e/model.onnx"));
        let mut generate = time_onnx();
        generate
            .args(["generate", "--steps", "1", "--device", "cpu", "--model"])
            .arg(dir.path())
            .args(["--prompt", "a car", "-o"])
            .arg(out.path().join("g.png"));
        for (what, mut cmd) in [("edit", edit), ("generate", generate)] {
            let err = assert_clean_error(&cmd.output().unwrap(), &format!("{case}, {what}"));
            // edit refuses an SD UNet (16 wide) by width, generate by its missing input
            let names = err.contains(says) || (*says == "text_embeds" && err.contains("16-wide"));
            assert!(names, "{case}, {what}: {err}");
        }
        assert_eq!(
            std::fs::read_dir(out.path()).unwrap().count(),
            0,
            "{case}: wrote something"
        );
    }
}
