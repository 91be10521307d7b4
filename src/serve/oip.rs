//! The Open Inference Protocol (v2, REST), as KServe and v2 clients such as
//! tritonclient's HTTP client speak it: server and model metadata, health,
//! and `infer` with the prompt and edit ids as BYTES, `seed`/`steps`/
//! `height`/`width` as INT64 and `guidance` as FP32; the image comes back
//! as `image` (UINT8, the PNG's values) or `image_fp32` (FP32), `[1, H, W, 3]`.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::api::{Ask, draw, parse};
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
}

#[derive(Deserialize)]
struct Tensor {
    name: String,
    datatype: String,
    data: Value,
}

#[derive(Deserialize)]
struct Requested {
    name: String,
}

/// `POST /v2/models/{name}/infer`.
pub(super) async fn infer(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    known(&state, &name)?;
    let req: InferRequest = parse(&body)?;
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
    let wanted: Vec<&str> = if req.outputs.is_empty() {
        vec!["image"]
    } else {
        req.outputs.iter().map(|o| o.name.as_str()).collect()
    };
    if let Some(bad) = wanted.iter().find(|n| !["image", "image_fp32"].contains(n)) {
        return Err(ApiError::bad(format!(
            "unknown output {bad:?}: image (UINT8) or image_fp32 (FP32)"
        )));
    }
    let drawn = draw(&state, ask).await?;
    let (h, w, c) = drawn.pixels.dim();
    let outputs: Vec<Value> = wanted
        .iter()
        .map(|n| match *n {
            "image_fp32" => json!({
                "name": n, "datatype": "FP32", "shape": [1, h, w, c],
                "data": drawn.pixels.iter().copied().collect::<Vec<f32>>(),
            }),
            _ => json!({
                "name": n, "datatype": "UINT8", "shape": [1, h, w, c],
                "data": to_bytes(drawn.pixels.view()),
            }),
        })
        .collect();
    let mut response = json!({ "model_name": name, "model_version": "1", "outputs": outputs });
    if let Some(id) = req.id {
        response["id"] = json!(id);
    }
    Ok(Json(response))
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
