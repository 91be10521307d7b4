//! `time-onnx serve` on the toy model, over loopback: served images equal
//! `generate`'s, alone or batched with requests carrying other edits; the
//! Open Inference Protocol gives the same values; bad requests get the
//! right 4xx; a full queue answers 503 with Retry-After; SIGTERM drains.
//! Every server here is started on port 0 and stopped by the test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_time-onnx");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const STEPS: usize = 6;

fn toy() -> PathBuf {
    Path::new(ROOT).join("models/toy")
}

/// A running server, killed when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(operators: &Path, extra: &[&str]) -> Server {
        Self::start_on(&toy(), operators, extra)
    }

    fn start_on(model: &Path, operators: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--device",
                "cpu",
                "--threads",
                "2",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--model")
            .arg(model)
            .arg("--operators")
            .arg(operators)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, addr }
    }

    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        http(&self.addr, method, path, headers, body)
    }

    fn json(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, &[], body.to_string().as_bytes())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection, read to its end.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    let typed = headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    if !body.is_empty() && !typed {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body, and close.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut body = raw[split..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 4 + size..];
    }
}

/// `generate`'s output for one image, as a file of `kind` (png or npy).
fn generate(dir: &Path, prompt: &str, seed: u64, edit: Option<&Path>, kind: &str) -> Vec<u8> {
    generate_on(&toy(), dir, prompt, seed, edit, kind)
}

/// [`generate`] on the model folder `model`.
fn generate_on(
    model: &Path,
    dir: &Path,
    prompt: &str,
    seed: u64,
    edit: Option<&Path>,
    kind: &str,
) -> Vec<u8> {
    let out = dir.join(format!("gen-{seed}-{}.{kind}", edit.is_some()));
    let mut cmd = Command::new(BIN);
    cmd.args([
        "generate",
        "--device",
        "cpu",
        "--threads",
        "2",
        "--output-type",
        kind,
    ])
    .arg("--model")
    .arg(model)
    .args(["--prompt", prompt, "--seed", &seed.to_string()])
    .args(["--steps", &STEPS.to_string()])
    .arg("-o")
    .arg(&out);
    if let Some(e) = edit {
        cmd.arg("--edit").arg(e);
    }
    let done = cmd.output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    std::fs::read(out).unwrap()
}

/// The f32 values of a .npy (the little-endian header `encode_npy` writes, 64-byte aligned).
fn npy_values(bytes: &[u8]) -> Vec<f32> {
    let header = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    bytes[10 + header..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn edit(server: &Server, src: &str, dst: &str) -> String {
    let r = server.json("/v1/edits", &json!({ "src": src, "dst": dst }));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["id"].as_str().unwrap().to_string()
}

fn image(prompt: &str, seed: u64, edits: &[&str], output: &str) -> Value {
    json!({ "prompt": prompt, "seed": seed, "steps": STEPS, "edits": edits, "output": output })
}

#[test]
fn served_images_equal_generated_ones_alone_and_batched_across_edits() {
    let tmp = tempfile::tempdir().unwrap();
    let ops = tmp.path().join("ops");
    let server = Server::start(&ops, &["--max-batch", "4", "--batch-wait-ms", "300"]);
    let blue = edit(&server, "a circle", "a blue circle");
    let red = edit(&server, "a square", "a red square");
    // The same edit again: the same id, no new file.
    assert_eq!(edit(&server, "a circle", "a blue circle"), blue);
    assert_eq!(std::fs::read_dir(&ops).unwrap().count(), 2);
    let op = |id: &str| ops.join(format!("{id}.safetensors"));

    // Alone: the PNG byte for byte, text chunks included.
    let alone = server.json("/v1/images", &image("a circle", 3, &[&blue], "png"));
    assert_eq!(alone.status, 200);
    assert_eq!(alone.header("content-type"), Some("image/png"));
    let want = generate(tmp.path(), "a circle", 3, Some(&op(&blue)), "png");
    assert!(alone.body == want, "the served PNG differs from generate's");

    // Four at once, each its own edit (or none): one batch, each row its own.
    let cases: Vec<(u64, Option<String>)> = vec![
        (0, Some(blue.clone())),
        (1, None),
        (2, Some(red.clone())),
        (3, Some(blue.clone())),
    ];
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(seed, id)| {
                let edits: Vec<&str> = id.iter().map(String::as_str).collect();
                let body = image("a circle", *seed, &edits, "npy");
                let server = &server;
                s.spawn(move || server.json("/v1/images", &body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((seed, id), reply) in cases.iter().zip(&replies) {
        assert_eq!(reply.status, 200);
        let want = generate(
            tmp.path(),
            "a circle",
            *seed,
            id.as_deref().map(op).as_deref(),
            "npy",
        );
        let d = max_diff(&npy_values(&reply.body), &npy_values(&want));
        assert!(d <= 1e-5, "seed {seed}: {d}");
    }
    let metrics = String::from_utf8(server.request("GET", "/metrics", &[], b"").body).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("time_onnx_batches_total{size=\"") && !l.contains("\"1\"")),
        "no batch of several requests:\n{metrics}"
    );

    // The Open Inference Protocol: the same image as FP32 and as the PNG's UINT8 values.
    let infer = json!({
        "id": "r1",
        "inputs": [
            { "name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a circle"] },
            { "name": "edits", "datatype": "BYTES", "shape": [1], "data": [blue] },
            { "name": "seed", "datatype": "INT64", "shape": [1], "data": [0] },
            { "name": "steps", "datatype": "INT64", "shape": [1], "data": [STEPS] },
            { "name": "guidance", "datatype": "FP32", "shape": [1], "data": [7.5] },
        ],
        "outputs": [{ "name": "image_fp32" }, { "name": "image" }],
    });
    let r = server.json("/v2/models/toy/infer", &infer);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["id"], "r1");
    let values = |k: usize| -> Vec<f32> {
        v["outputs"][k]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    let served = npy_values(&replies[0].body);
    assert_eq!(v["outputs"][0]["shape"], json!([1, 32, 32, 3]));
    assert!(max_diff(&values(0), &served) <= 1e-5);
    let bytes: Vec<f32> = served
        .iter()
        .map(|x| (x.clamp(0.0, 1.0) * 255.0).round())
        .collect();
    assert_eq!(v["outputs"][1]["datatype"], "UINT8");
    assert_eq!(values(1), bytes);
    for path in [
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/toy",
        "/v2/models/toy/ready",
    ] {
        assert_eq!(server.request("GET", path, &[], b"").status, 200, "{path}");
    }
    assert_eq!(
        server.request("GET", "/v2/models/other", &[], b"").status,
        404
    );
}

/// An SDXL folder served: its edits are 48-wide operators over both text
/// encoders, and requests with and without them share one batch (pooled
/// embeddings and time ids batched beside the text), each drawing what
/// `generate` draws.
#[test]
fn sdxl_requests_with_different_edits_share_a_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let ops = tmp.path().join("ops");
    let model = Path::new(ROOT).join("tests/fixtures/sdxl-tiny/optimum");
    let server = Server::start_on(
        &model,
        &ops,
        &["--max-batch", "3", "--batch-wait-ms", "300"],
    );
    let blue = edit(&server, "A pack of roses", "A pack of blue roses");
    let cases: Vec<(u64, Option<&str>)> = vec![(0, Some(&blue)), (1, None), (2, Some(&blue))];
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(seed, id)| {
                let edits: Vec<&str> = id.iter().copied().collect();
                let body = image("A pack of roses", *seed, &edits, "npy");
                let server = &server;
                s.spawn(move || server.json("/v1/images", &body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for ((seed, id), reply) in cases.iter().zip(&replies) {
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        let op = id.map(|id| ops.join(format!("{id}.safetensors")));
        let want = generate_on(
            &model,
            tmp.path(),
            "A pack of roses",
            *seed,
            op.as_deref(),
            "npy",
        );
        let d = max_diff(&npy_values(&reply.body), &npy_values(&want));
        assert!(d <= 1e-5, "seed {seed}: {d}");
    }
    let metrics = String::from_utf8(server.request("GET", "/metrics", &[], b"").body).unwrap();
    assert!(
        metrics.contains("time_onnx_batches_total{size=\"3\"}"),
        "the three requests were not one batch:\n{metrics}"
    );
}

/// What is wrong, the path, the body, the headers, the status wanted.
type Case<'a> = (&'a str, &'a str, Vec<u8>, &'a [(&'a str, &'a str)], u16);

#[test]
fn bad_requests_get_a_4xx_with_a_reason_and_write_nothing_outside_the_operator_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let ops = tmp.path().join("ops");
    std::fs::write(tmp.path().join("token"), "s3cret\n").unwrap();
    let token_file = tmp.path().join("token");
    let server = Server::start(
        &ops,
        &[
            "--token-file",
            token_file.to_str().unwrap(),
            "--max-body",
            "1M",
        ],
    );
    let auth = [("Authorization", "Bearer s3cret")];
    let raw = [
        ("Authorization", "Bearer s3cret"),
        ("Content-Type", "application/octet-stream"),
    ];
    let post = |path: &str, body: &[u8]| server.request("POST", path, &auth, body);
    let good = post("/v1/edits", br#"{"src":"a circle","dst":"a blue circle"}"#);
    assert_eq!(good.status, 200);
    let id = good.json()["id"].as_str().unwrap().to_string();
    let file = std::fs::read(ops.join(format!("{id}.safetensors"))).unwrap();
    // The same file claiming another text encoder's fingerprint.
    let ours = good.json()["record"]["text_encoder"]
        .as_str()
        .unwrap()
        .to_string();
    let at = file
        .windows(ours.len())
        .position(|w| w == ours.as_bytes())
        .unwrap();
    let mut foreign = file.clone();
    foreign[at..at + ours.len()].fill(b'0');

    let long_prompt = format!(r#"{{"prompt":"{}"}}"#, "a ".repeat(500_000));
    let big = vec![b' '; 2 << 20];
    let cases: Vec<Case> = vec![
        (
            "no token",
            "/v1/images",
            br#"{"prompt":"a circle"}"#.to_vec(),
            &[],
            401,
        ),
        (
            "wrong token",
            "/v1/images",
            br#"{"prompt":"a circle"}"#.to_vec(),
            &[("Authorization", "Bearer s3creT")],
            401,
        ),
        ("body over --max-body", "/v1/images", big, &auth, 413),
        (
            "10^6-character prompt",
            "/v1/images",
            long_prompt.into_bytes(),
            &auth,
            413,
        ),
        (
            "10^5 × 10^5 pixels",
            "/v1/images",
            br#"{"prompt":"a","height":100000,"width":100000}"#.to_vec(),
            &auth,
            413,
        ),
        (
            "NaN guidance",
            "/v1/images",
            br#"{"prompt":"a","guidance":NaN}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "infinite guidance",
            "/v1/images",
            br#"{"prompt":"a","guidance":1e999}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "malformed JSON",
            "/v1/images",
            br#"{"prompt":"#.to_vec(),
            &auth,
            400,
        ),
        (
            "unknown field",
            "/v1/images",
            br#"{"prompt":"a","sed":1}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "too many steps",
            "/v1/images",
            br#"{"prompt":"a","steps":100000}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "size not a multiple of 8",
            "/v1/images",
            br#"{"prompt":"a","height":33}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "path-like edit id",
            "/v1/images",
            br#"{"prompt":"a","edits":["../../etc/passwd"]}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "unknown edit id",
            "/v1/images",
            format!(r#"{{"prompt":"a","edits":["{}"]}}"#, "ab".repeat(32)).into_bytes(),
            &auth,
            404,
        ),
        (
            "values_only edit",
            "/v1/edits",
            br#"{"src":"a circle","dst":"a blue circle","values_only":true}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "edit whose words do not align",
            "/v1/edits",
            br#"{"src":"a circle","dst":"a square"}"#.to_vec(),
            &auth,
            422,
        ),
        (
            "not an operator file",
            "/v1/edits/upload",
            b"not safetensors".to_vec(),
            &raw,
            400,
        ),
        (
            "another text encoder's operator",
            "/v1/edits/upload",
            foreign.clone(),
            &raw,
            422,
        ),
        (
            "bad base64",
            "/v1/edits/upload",
            br#"{"operator":"@@@="}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "another text encoder's operator, as base64",
            "/v1/edits/upload",
            format!(r#"{{"operator":"{}"}}"#, base64(&foreign)).into_bytes(),
            &auth,
            422,
        ),
        (
            "OIP: wrong datatype",
            "/v2/models/toy/infer",
            br#"{"inputs":[{"name":"prompt","datatype":"INT64","shape":[1],"data":[1]}]}"#.to_vec(),
            &auth,
            400,
        ),
        (
            "OIP: unknown model",
            "/v2/models/etc/infer",
            br#"{"inputs":[]}"#.to_vec(),
            &auth,
            404,
        ),
    ];
    for (what, path, body, headers, want) in cases {
        let r = server.request("POST", path, headers, &body);
        assert_eq!(
            r.status,
            want,
            "{what}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if r.status != 413 || !r.body.is_empty() {
            let v: Value = serde_json::from_slice(&r.body)
                .unwrap_or_else(|_| panic!("{what}: {}", String::from_utf8_lossy(&r.body)));
            let msg = v["error"].as_str().unwrap();
            assert!(!msg.is_empty() && !msg.contains('\n'), "{what}: {msg:?}");
        }
    }
    for path in [
        "/v1/edits/..%2F..%2Fetc%2Fpasswd",
        "/v1/edits/../../etc/passwd",
    ] {
        let r = server.request("GET", path, &auth, b"");
        assert!((400..500).contains(&r.status), "{path}: {}", r.status);
    }
    // Health checks need no token; everything else does.
    assert_eq!(
        server.request("GET", "/v2/health/ready", &[], b"").status,
        200
    );
    assert_eq!(server.request("GET", "/metrics", &[], b"").status, 401);
    // Only the one operator file, in the operator folder; nothing beside it.
    let names: Vec<String> = std::fs::read_dir(&ops)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![format!("{id}.safetensors")]);
    let mut top: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, ["ops", "token"]);
    // The good file as base64: accepted, its id the SHA-256 of its bytes, no second copy.
    let r = post(
        "/v1/edits/upload",
        format!(r#"{{"operator":"{}"}}"#, base64(&file)).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let uploaded = r.json()["id"].as_str().unwrap().to_string();
    assert_eq!(uploaded, time_onnx::eval::digest::bytes(&file));
    std::fs::remove_file(ops.join(format!("{uploaded}.safetensors"))).unwrap();
    // Still serving.
    let r = post(
        "/v1/images",
        &image("a circle", 0, &[], "npy").to_string().into_bytes(),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn a_full_queue_answers_503_and_sigterm_drains_what_is_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let mut server = Server::start(
        &tmp.path().join("ops"),
        &[
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--batch-wait-ms",
            "0",
        ],
    );
    let slow = json!({ "prompt": "a circle", "steps": 40, "output": "npy" });
    let replies: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| server.json("/v1/images", &slow)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status == 503).collect();
    assert_eq!(
        ok + busy.len(),
        6,
        "every request answered with an image or 503"
    );
    assert!(
        ok >= 1 && !busy.is_empty(),
        "{ok} images, {} refused",
        busy.len()
    );
    for r in &busy {
        assert_eq!(r.header("retry-after"), Some("1"));
    }

    // SIGTERM while a request is drawing: it still gets its image, then the server exits 0.
    // (The toy model at 64 times its pixels: seconds, so it is surely still drawing.)
    let addr = server.addr.clone();
    let body =
        json!({ "prompt": "a circle", "steps": 4, "height": 256, "width": 256, "output": "npy" })
            .to_string();
    let in_flight =
        std::thread::spawn(move || http(&addr, "POST", "/v1/images", &[], body.as_bytes()));
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let r = in_flight.join().unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// kB of a process's memory, from /proc (`VmRSS` now, `VmHWM` its peak).
fn vm_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn two_hundred_requests_from_sixteen_clients_are_all_answered_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(
        &tmp.path().join("ops"),
        &["--max-queue", "8", "--max-batch", "4", "--timeout-s", "60"],
    );
    let ids: Vec<String> = ["a circle", "a square", "a triangle", "a diamond"]
        .iter()
        .map(|s| edit(&server, s, &s.replace("a ", "a red ")))
        .collect();
    let first = server.json("/v1/images", &image("a circle", 0, &[], "png"));
    assert_eq!(first.status, 200);
    let pid = server.child.id();
    let after_first = vm_kb(pid, "VmRSS:");

    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|client| {
                let (server, ids) = (&server, &ids);
                s.spawn(move || {
                    // 200 requests in all: 12 or 13 each, mixed edits, some bad.
                    let n = if client < 8 { 13 } else { 12 };
                    (0..n)
                        .map(|k| {
                            let seed = (client * 13 + k) as u64;
                            let body = match k % 5 {
                                4 => json!({ "prompt": "a circle", "steps": 0 }),
                                j => image("a circle", seed, &[&ids[j]], "png"),
                            };
                            server.json("/v1/images", &body).status
                        })
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(statuses.len(), 200);
    let count = |c: u16| statuses.iter().filter(|s| **s == c).count();
    let (ok, busy, bad) = (count(200), count(503), count(400));
    assert_eq!(ok + busy + bad, 200, "statuses: {statuses:?}");
    assert_eq!(
        bad,
        16 * 2,
        "the bad requests (k = 4, 9 of each client) are refused as such"
    );
    assert!(ok >= 16, "{ok} images");
    let peak = vm_kb(pid, "VmHWM:");
    assert!(
        peak as f64 <= 1.5 * after_first as f64,
        "peak RSS {peak} kB vs {after_first} kB after the first image"
    );
    assert_eq!(
        server.request("GET", "/v2/health/ready", &[], b"").status,
        200
    );
    let again = server.json("/v1/images", &image("a circle", 0, &[], "png"));
    assert!(
        again.body == first.body,
        "the same request draws the same PNG afterwards"
    );
    eprintln!(
        "{ok} images, {busy} × 503, {bad} × 400; peak RSS {peak} kB, {after_first} kB after the first image"
    );
}

/// `kill -9` at several moments of `POST /v1/edits`: the operator folder holds
/// whole operator files or nothing, never a part of one or a temporary.
#[test]
fn a_kill_during_an_edit_leaves_no_partial_operator() {
    let tmp = tempfile::tempdir().unwrap();
    let ops = tmp.path().join("ops");
    for (k, delay_ms) in [0u64, 30, 60, 90, 150, 300, 600].into_iter().enumerate() {
        let mut server = Server::start(&ops, &[]);
        let addr = server.addr.clone();
        let body = json!({ "src": "a circle", "dst": format!("a blue circle {k}") }).to_string();
        let client = std::thread::spawn(move || {
            // The connection may be cut: any outcome but a hang is fine here.
            let Ok(mut s) = TcpStream::connect(&addr) else {
                return; // killed before it connected
            };
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let head = format!(
                "POST /v1/edits HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        client.join().unwrap();
        for entry in std::fs::read_dir(&ops).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "a temporary was left: {name}");
            time_onnx::edit::operator_file::load(&path)
                .unwrap_or_else(|e| panic!("kill after {delay_ms} ms left a broken {name}: {e}"));
        }
    }
    let whole = std::fs::read_dir(&ops).unwrap().count();
    eprintln!("7 kills: {whole} edits had completed, the others left nothing");
}

/// Standard padded base64, written here so that the server's decoder is checked against another.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn a_slow_request_times_out_and_a_long_prompt_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    // 5 s: the toy requests below take well under a second alone, but this test shares two
    // cores with the other servers of this file, and a 1 s limit once timed out the first one.
    let server = Server::start(&tmp.path().join("ops"), &["--timeout-s", "5"]);
    let long = format!("a circle {}", "on a white background ".repeat(20));
    let r = server.json("/v1/images", &image(&long, 0, &[], "npy"));
    assert_eq!(r.status, 200);
    let warning = r.header("warning").unwrap_or_default();
    assert!(
        warning.contains("longer than the text encoder's 77 tokens") && warning.contains("dropped"),
        "{warning:?}"
    );
    let short = server.json("/v1/images", &image("a circle", 0, &[], "npy"));
    assert_eq!(short.header("warning"), None);
    // The engine finishes a request whose client has gone; nothing waits behind this one.
    // ~16 s on 2 AVX-512 cores alone (the toy model at 64 times its pixels), over three times
    // the limit.
    let r = server.json(
        "/v1/images",
        &json!({ "prompt": "a circle", "steps": 16, "height": 256, "width": 256, "output": "npy" }),
    );
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("no image within 5 s")
    );
}
