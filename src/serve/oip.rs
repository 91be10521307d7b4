//! The Open Inference Protocol (v2, REST), as KServe and v2 clients such as
//! tritonclient's HTTP client speak it: server and model metadata, health,
//! and `infer` with the prompt and edit ids as BYTES, `seed`/`steps`/
//! `height`/`width` as INT64 and `guidance` as FP32; the image comes back
//! as `image` (UINT8, the PNG's values) or `image_fp32` (FP32), `[1, H, W, 3]`.
//! Tensors travel as JSON or, with Triton's binary tensor data extension
//! (what tritonclient sends by default), as raw bytes after the JSON header.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{Ask, draw, parse, warn};
use super::{ApiError, AppState, Body};
use crate::pipeline::png::to_bytes;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `GET /v2`.
pub(super) async fn server_metadata() -> Json<Value> {
    Json(json!({ "name": "time-onnx", "version": VERSION, "extensions": [] }))
}

/// `GET /v2/health/live`: the process answers.
pub(super) async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

/// `GET /v2/health/ready`: loaded and not draining.
pub(super) async fn ready(State(state): State<Arc<AppState>>) -> Response {
    readiness(&state)
}

fn readiness(state: &AppState) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        Json(json!({ "ready": true })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false })),
        )
            .into_response()
    }
}

fn known(state: &AppState, name: &str) -> Result<(), ApiError> {
    if name == state.model.name {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no model {name:?}; this server serves {:?}",
                state.model.name
            ),
        ))
    }
}

/// `GET /v2/models/{name}`.
pub(super) async fn model_metadata(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    known(&state, &name)?;
    let (h, w) = state.model.default_size;
    let scalar =
        |name: &str, datatype: &str| json!({ "name": name, "datatype": datatype, "shape": [1] });
    Ok(Json(json!({
        "name": name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            scalar("prompt", "BYTES"),
            scalar("negative_prompt", "BYTES"),
            { "name": "edits", "datatype": "BYTES", "shape": [-1] },
            scalar("seed", "INT64"),
            scalar("steps", "INT64"),
            scalar("guidance", "FP32"),
            scalar("height", "INT64"),
            scalar("width", "INT64"),
        ],
        "outputs": [
            { "name": "image", "datatype": "UINT8", "shape": [1, h, w, 3] },
            { "name": "image_fp32", "datatype": "FP32", "shape": [1, h, w, 3] },
        ],
    })))
}

/// `GET /v2/models/{name}/ready`.
pub(super) async fn model_ready(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    known(&state, &name)?;
    Ok(readiness(&state))
}

#[derive(Deserialize)]
struct InferRequest {
    id: Option<String>,
    inputs: Vec<Tensor>,
    #[serde(default)]
    outputs: Vec<Requested>,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize)]
struct Tensor {
    name: String,
    datatype: String,
    #[serde(default)]
    data: Value,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize)]
struct Requested {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

/// The parameters of the binary tensor data extension (others are ignored).
#[derive(Default, Deserialize)]
struct Parameters {
    /// An input's bytes after the JSON header.
    binary_data_size: Option<usize>,
    /// An output wanted as bytes.
    binary_data: Option<bool>,
    /// Every output wanted as bytes (request level).
    binary_data_output: Option<bool>,
}

/// The header that says how long the JSON part of a binary request or reply is.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// The JSON part of a request body and the binary part after it.
fn split_body<'a>(headers: &HeaderMap, body: &'a [u8]) -> Result<(&'a [u8], &'a [u8]), ApiError> {
    let Some(v) = headers.get(HEADER_LENGTH) else {
        return Ok((body, &[]));
    };
    let n: usize = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|n| *n <= body.len())
        .ok_or_else(|| {
            ApiError::bad(format!(
                "{HEADER_LENGTH} must be a length within the {}-byte body",
                body.len()
            ))
        })?;
    Ok(body.split_at(n))
}

/// Replaces every input's binary part by the JSON values it holds, in input order.
fn read_binary(inputs: &mut [Tensor], mut rest: &[u8]) -> Result<(), ApiError> {
    for t in inputs.iter_mut() {
        let Some(n) = t.parameters.binary_data_size else {
            continue;
        };
        if n > rest.len() {
            return Err(ApiError::bad(format!(
                "input {:?} claims {n} bytes of binary data; {} are left",
                t.name,
                rest.len()
            )));
        }
        let (mine, after) = rest.split_at(n);
        rest = after;
        t.data = decode(&t.name, &t.datatype, mine)?;
    }
    if !rest.is_empty() {
        return Err(ApiError::bad(format!(
            "{} bytes of binary data belong to no input",
            rest.len()
        )));
    }
    Ok(())
}

/// A binary tensor's elements as JSON values.
fn decode(name: &str, datatype: &str, bytes: &[u8]) -> Result<Value, ApiError> {
    let bad = |why: &str| ApiError::bad(format!("input {name:?}: {why}"));
    let fixed = |size: usize| {
        if bytes.len().is_multiple_of(size) {
            Ok(bytes.chunks_exact(size))
        } else {
            Err(bad(&format!(
                "{} bytes is not a whole number of {datatype} values",
                bytes.len()
            )))
        }
    };
    let values: Vec<Value> = match datatype {
        "BYTES" => {
            // Each element: a 4-byte little-endian length, then that many bytes.
            let (mut out, mut at) = (Vec::new(), bytes);
            while !at.is_empty() {
                let (len, tail) = at
                    .split_first_chunk::<4>()
                    .ok_or_else(|| bad("a BYTES element is cut short"))?;
                let len = u32::from_le_bytes(*len) as usize;
                if len > tail.len() {
                    return Err(bad("a BYTES element is cut short"));
                }
                let text = std::str::from_utf8(&tail[..len]).map_err(|_| bad("not UTF-8"))?;
                out.push(json!(text));
                at = &tail[len..];
            }
            out
        }
        "INT64" => fixed(8)?
            .map(|c| json!(i64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        "UINT64" => fixed(8)?
            .map(|c| json!(u64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        "INT32" => fixed(4)?
            .map(|c| json!(i32::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        "FP32" => fixed(4)?
            .map(|c| json!(f32::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        "FP64" => fixed(8)?
            .map(|c| json!(f64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        other => return Err(bad(&format!("binary {other} data is not read here"))),
    };
    Ok(Value::Array(values))
}

/// `POST /v2/models/{name}/infer`.
pub(super) async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Response, ApiError> {
    known(&state, &name)?;
    let (json_part, binary) = split_body(&headers, &body)?;
    let mut req: InferRequest = parse(json_part)?;
    read_binary(&mut req.inputs, binary)?;
    let mut ask = Ask {
        prompt: String::new(),
        negative_prompt: String::new(),
        seed: 0,
        steps: None,
        guidance: None,
        height: None,
        width: None,
        scheduler: None,
        edits: Vec::new(),
    };
    let mut has_prompt = false;
    for t in &req.inputs {
        let values = flatten(&t.data);
        match (t.name.as_str(), t.datatype.as_str()) {
            ("prompt", "BYTES") => {
                ask.prompt = one_string(t, &values)?;
                has_prompt = true;
            }
            ("negative_prompt", "BYTES") => ask.negative_prompt = one_string(t, &values)?,
            ("edits", "BYTES") => {
                ask.edits = values
                    .iter()
                    .map(|v| string(t, v))
                    .collect::<Result<_, _>>()?
            }
            ("seed", "INT64" | "UINT64") => ask.seed = one_int(t, &values)?,
            ("steps", "INT64" | "INT32") => ask.steps = Some(one_int(t, &values)? as usize),
            ("height", "INT64" | "INT32") => ask.height = Some(one_int(t, &values)? as usize),
            ("width", "INT64" | "INT32") => ask.width = Some(one_int(t, &values)? as usize),
            ("guidance", "FP32" | "FP64") => ask.guidance = Some(one_float(t, &values)?),
            (
                "prompt" | "negative_prompt" | "edits" | "seed" | "steps" | "height" | "width"
                | "guidance",
                other,
            ) => {
                return Err(ApiError::bad(format!(
                    "input {:?} has datatype {other}; see GET /v2/models/{name} for the types",
                    t.name
                )));
            }
            (other, _) => return Err(ApiError::bad(format!("unknown input {other:?}"))),
        }
    }
    if !has_prompt {
        return Err(ApiError::bad("the input \"prompt\" is required"));
    }
    let all_binary = req.parameters.binary_data_output.unwrap_or(false);
    let wanted: Vec<(&str, bool)> = if req.outputs.is_empty() {
        vec![("image", all_binary)]
    } else {
        req.outputs
            .iter()
            .map(|o| {
                (
                    o.name.as_str(),
                    o.parameters.binary_data.unwrap_or(all_binary),
                )
            })
            .collect()
    };
    if let Some((bad, _)) = wanted
        .iter()
        .find(|(n, _)| !["image", "image_fp32"].contains(n))
    {
        return Err(ApiError::bad(format!(
            "unknown output {bad:?}: image (UINT8) or image_fp32 (FP32)"
        )));
    }
    let (drawn, warnings) = draw(&state, ask).await?;
    let (h, w, c) = drawn.pixels.dim();
    let mut tail: Vec<u8> = Vec::new();
    let mut outputs = Vec::new();
    for (n, binary) in wanted {
        let (datatype, data): (&str, Value) = match n {
            "image_fp32" if binary => {
                let start = tail.len();
                tail.extend(drawn.pixels.iter().flat_map(|v| v.to_le_bytes()));
                ("FP32", json!({ "binary_data_size": tail.len() - start }))
            }
            "image_fp32" => (
                "FP32",
                json!(drawn.pixels.iter().copied().collect::<Vec<f32>>()),
            ),
            _ if binary => {
                let start = tail.len();
                tail.extend(to_bytes(drawn.pixels.view()));
                ("UINT8", json!({ "binary_data_size": tail.len() - start }))
            }
            _ => ("UINT8", json!(to_bytes(drawn.pixels.view()))),
        };
        let mut out = json!({ "name": n, "datatype": datatype, "shape": [1, h, w, c] });
        if binary {
            out["parameters"] = data;
        } else {
            out["data"] = data;
        }
        outputs.push(out);
    }
    let mut response = json!({ "model_name": name, "model_version": "1", "outputs": outputs });
    if let Some(id) = req.id {
        response["id"] = json!(id);
    }
    if !warnings.is_empty() {
        response["parameters"] = json!({ "warnings": warnings });
    }
    if tail.is_empty() {
        let mut r = Json(response).into_response();
        warn(&mut r, &warnings);
        return Ok(r);
    }
    // The binary extension's reply: the JSON header, then the outputs' bytes.
    let mut bytes = response.to_string().into_bytes();
    let json_len = bytes.len();
    bytes.extend(tail);
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::from(json_len),
            ),
        ],
        bytes,
    )
        .into_response())
    .map(|mut r| {
        warn(&mut r, &warnings);
        r
    })
}

/// A tensor's data in row-major order, nested arrays or flat.
fn flatten(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        other => vec![other],
    }
}

fn string(t: &Tensor, v: &Value) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| ApiError::bad(format!("input {:?} must hold strings", t.name)))
}

fn one<'a>(t: &Tensor, values: &[&'a Value]) -> Result<&'a Value, ApiError> {
    match values {
        [v] => Ok(v),
        _ => Err(ApiError::bad(format!(
            "input {:?} must hold one value, not {}",
            t.name,
            values.len()
        ))),
    }
}

fn one_string(t: &Tensor, values: &[&Value]) -> Result<String, ApiError> {
    string(t, one(t, values)?)
}

fn one_int(t: &Tensor, values: &[&Value]) -> Result<u64, ApiError> {
    one(t, values)?
        .as_u64()
        .ok_or_else(|| ApiError::bad(format!("input {:?} must be a non-negative integer", t.name)))
}

fn one_float(t: &Tensor, values: &[&Value]) -> Result<f64, ApiError> {
    one(t, values)?
        .as_f64()
        .ok_or_else(|| ApiError::bad(format!("input {:?} must be a number", t.name)))
}
