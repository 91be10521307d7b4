//! The JSON API: `/v1/edits` (compute, upload, look up) and `/v1/images`,
//! and [`draw`], the checks and queueing every image request passes, which
//! the Open Inference Protocol's `infer` shares.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::engine::{Drawn, ImageJob, Refused};
use super::store::EditParams;
use super::{ApiError, AppState, Body};
use crate::edit::Operator;
use crate::edit::solve::compose;
use crate::pipeline::png::{encode_npy, encode_png};
use crate::pipeline::schedulers::SchedulerKind;
use crate::workflow::edit::{self as edit_flow, EditRequest};
use crate::workflow::generate::Params;

/// `generate`'s defaults, so that a request and a command line that leave
/// the same things out draw the same image.
const DEFAULT_STEPS: usize = 50;

/// A body as `T`, or a 400 naming what is wrong (unknown fields included).
pub(super) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EditBody {
    src: String,
    dst: String,
    #[serde(default = "default_lambda")]
    lambda: f64,
    augmentations: Option<Vec<String>>,
    #[serde(default)]
    values_only: bool,
}

fn default_lambda() -> f64 {
    crate::edit::DEFAULT_LAMBDA
}

/// `POST /v1/edits`: computes the edit's operator unless stored already;
/// its id and record.
pub(super) async fn create_edit(
    State(state): State<Arc<AppState>>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let b: EditBody = parse(&body)?;
    if b.values_only {
        return Err(ApiError::bad(
            "values_only edits cannot be served: an operator on the embeddings changes keys and \
             values alike; make an edited UNet file instead",
        ));
    }
    if !(b.lambda.is_finite() && b.lambda > 0.0) {
        return Err(ApiError::bad(format!(
            "lambda must be a positive number, not {}",
            b.lambda
        )));
    }
    let max = state.config.limits.max_prompt_chars;
    for (what, text) in [("src", &b.src), ("dst", &b.dst)] {
        check_text(what, text, max)?;
        if text.trim().is_empty() {
            return Err(ApiError::bad(format!("{what} is empty")));
        }
    }
    let params = EditParams {
        src: b.src,
        dst: b.dst,
        lambda: b.lambda,
        augmentations: b.augmentations.unwrap_or_else(|| {
            crate::edit::DEFAULT_AUGMENTATIONS
                .iter()
                .map(|s| s.to_string())
                .collect()
        }),
    };
    let id = state.store.id(&params);
    if !state.store.has(&id) {
        let _permit = state
            .editing
            .acquire()
            .await
            .map_err(|_| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting down"))?;
        let (st, id2) = (state.clone(), id.clone());
        tokio::task::spawn_blocking(move || compute(&st, &params, &id2))
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error computing the edit",
                )
            })??;
    }
    let (_, meta) = state.store.load(&id)?;
    Ok(Json(json!({ "id": id, "record": meta })))
}

/// Solves the edit and writes its operator file (whole or not at all).
fn compute(state: &AppState, p: &EditParams, id: &str) -> Result<(), ApiError> {
    if state.store.has(id) {
        return Ok(());
    }
    let req = EditRequest {
        lambda: p.lambda,
        augmentations: p.augmentations.clone(),
        save_operator: Some(state.store.path(id)?),
        ..EditRequest::new(state.model.text.clone(), p.src.clone(), p.dst.clone())
    };
    edit_flow::run(&req)
        .map(|_| ())
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, chain(&e)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadBody {
    /// The operator file, base64 (standard alphabet, padded).
    operator: String,
}

/// `POST /v1/edits/upload`: an operator file made by `edit --save-operator`,
/// as the body itself or, with `Content-Type: application/json`, as
/// `{"operator": "<base64>"}`.
pub(super) async fn upload_edit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let file = if json {
        let b: UploadBody = parse(&body)?;
        base64_decode(&b.operator).ok_or_else(|| {
            ApiError::bad("operator is not valid base64 (standard alphabet, padded)")
        })?
    } else {
        body.to_vec()
    };
    let st = state.clone();
    let (id, meta) = tokio::task::spawn_blocking(move || st.store.upload(&file))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))??;
    Ok(Json(json!({ "id": id, "record": meta })))
}

/// Standard base64 (RFC 4648, padded, whitespace allowed between groups);
/// `None` when it is not.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(4) {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(digits.len() / 4 * 3);
    let groups = digits.len() / 4;
    for (g, quad) in digits.chunks_exact(4).enumerate() {
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) || quad[..4 - pad].contains(&b'=') {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

/// `GET /v1/edits/{id}`: the edit's record.
pub(super) async fn get_edit(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (_, meta) = state.store.load(&id)?;
    Ok(Json(json!({ "id": id, "record": meta })))
}

#[derive(Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Output {
    #[default]
    Png,
    Npy,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ImageBody {
    prompt: String,
    #[serde(default)]
    negative_prompt: String,
    #[serde(default)]
    seed: u64,
    steps: Option<usize>,
    guidance: Option<f64>,
    height: Option<usize>,
    width: Option<usize>,
    scheduler: Option<String>,
    #[serde(default)]
    edits: Vec<String>,
    #[serde(default)]
    output: Output,
}

/// One image asked for, by either API.
pub(super) struct Ask {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub scheduler: Option<String>,
    pub edits: Vec<String>,
}

/// `POST /v1/images`: a PNG with `generate`'s text chunks, or the float
/// image `[1, h, w, 3]` as .npy.
pub(super) async fn images(
    State(state): State<Arc<AppState>>,
    Body(body): Body,
) -> Result<Response, ApiError> {
    let b: ImageBody = parse(&body)?;
    let output = b.output;
    let (drawn, warnings) = draw(
        &state,
        Ask {
            prompt: b.prompt,
            negative_prompt: b.negative_prompt,
            seed: b.seed,
            steps: b.steps,
            guidance: b.guidance,
            height: b.height,
            width: b.width,
            scheduler: b.scheduler,
            edits: b.edits,
        },
    )
    .await?;
    let mut bytes = Vec::new();
    let encoded = match output {
        Output::Png => encode_png(&mut bytes, drawn.pixels.view(), &drawn.text),
        Output::Npy => {
            let (h, w, c) = drawn.pixels.dim();
            let pixels = drawn.pixels.as_standard_layout();
            encode_npy(
                &mut bytes,
                &[1, h, w, c],
                pixels.as_slice().unwrap_or_default(),
            )
        }
    };
    encoded.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the image: {e}"),
        )
    })?;
    let kind = match output {
        Output::Png => "image/png",
        Output::Npy => "application/octet-stream",
    };
    let mut response = ([(header::CONTENT_TYPE, kind)], bytes).into_response();
    warn(&mut response, &warnings);
    Ok(response)
}

/// Adds one `Warning: 299` header per warning (non-ASCII escaped).
pub(super) fn warn(response: &mut Response, warnings: &[String]) {
    for w in warnings {
        let quoted: String = w
            .chars()
            .map(|c| match c {
                ' ' => " ".to_string(),
                '"' | '\\' => format!("\\{c}"),
                c if c.is_ascii_graphic() => c.to_string(),
                c => c.escape_default().to_string(),
            })
            .collect();
        let text = format!("299 time-onnx \"{quoted}\"");
        if let Ok(v) = HeaderValue::from_str(&text) {
            response.headers_mut().append(header::WARNING, v);
        }
    }
}

fn check_text(what: &str, text: &str, max: usize) -> Result<(), ApiError> {
    let n = text.chars().count();
    if n > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{what} has {n} characters; this server takes at most {max}"),
        ));
    }
    Ok(())
}

/// Checks `ask` against the limits, loads and composes its edits, queues it
/// and waits (at most the timeout) for its image.
///
/// Alongside the image: warnings for the client (a prompt longer than the
/// text encoder's window, with the words it drops, as `generate` warns).
pub(super) async fn draw(
    state: &Arc<AppState>,
    ask: Ask,
) -> Result<(Drawn, Vec<String>), ApiError> {
    let limits = state.config.limits;
    check_text("prompt", &ask.prompt, limits.max_prompt_chars)?;
    check_text(
        "negative_prompt",
        &ask.negative_prompt,
        limits.max_prompt_chars,
    )?;
    let mut warnings = Vec::new();
    for (what, text) in [
        ("prompt", &ask.prompt),
        ("negative_prompt", &ask.negative_prompt),
    ] {
        let dropped = state
            .model
            .tokenizer
            .dropped_text(text)
            .map_err(|e| ApiError::bad(format!("{what}: {e}")))?;
        if let Some(words) = dropped {
            warnings.push(format!(
                "the {what} is longer than the text encoder's {} tokens; dropped: {words:?}",
                state.model.tokenizer.max_len()
            ));
        }
    }
    let steps = ask.steps.unwrap_or(DEFAULT_STEPS);
    if steps == 0 || steps > limits.max_steps {
        return Err(ApiError::bad(format!(
            "steps must be in 1..={}, not {steps}",
            limits.max_steps
        )));
    }
    let guidance = ask.guidance.unwrap_or(state.model.default_guidance);
    if !guidance.is_finite() {
        return Err(ApiError::bad(format!(
            "guidance must be a finite number, not {guidance}"
        )));
    }
    let (dh, dw) = state.model.default_size;
    let (height, width) = (ask.height.unwrap_or(dh), ask.width.unwrap_or(dw));
    let f = state.model.vae_factor;
    let pixels = height.saturating_mul(width);
    if pixels > limits.max_pixels {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{height}×{width} is {pixels} pixels; this server draws at most {}",
                limits.max_pixels
            ),
        ));
    }
    if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
        return Err(ApiError::bad(format!(
            "height and width must be positive multiples of {f}, not {height}×{width}"
        )));
    }
    let scheduler = match &ask.scheduler {
        None => None,
        Some(name) => Some(
            name.parse::<SchedulerKind>()
                .map_err(|e| ApiError::bad(e.to_string()))?,
        ),
    };
    if ask.edits.len() > limits.max_edits {
        return Err(ApiError::bad(format!(
            "{} edits; this server applies at most {} to one image",
            ask.edits.len(),
            limits.max_edits
        )));
    }
    let (operator, metas) = {
        let st = state.clone();
        let ids = ask.edits.clone();
        tokio::task::spawn_blocking(move || operators(&st, &ids))
            .await
            .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error"))??
    };
    let params = Params {
        steps,
        guidance,
        negative_prompt: ask.negative_prompt,
        num_images: 1,
        height,
        width,
        seed: ask.seed,
        latents: None,
        scheduler,
        eta: 0.0,
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = ImageJob {
        prompt: ask.prompt,
        params,
        operator,
        metas,
        reply: tx,
    };
    match state.engine.submit(job) {
        Ok(()) => {}
        Err(Refused::Full) => {
            let mut e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the queue is full; try again shortly",
            );
            e.retry_after = Some(1);
            return Err(e);
        }
        Err(Refused::Stopped) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is stopping",
            ));
        }
    }
    match tokio::time::timeout(limits.timeout, rx).await {
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no image within {} s", limits.timeout.as_secs_f64()),
        )),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the engine stopped before drawing the image",
        )),
        Ok(Ok(Err(failure))) => Err(ApiError::new(
            StatusCode::from_u16(failure.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            failure.message,
        )),
        Ok(Ok(Ok(drawn))) => Ok((drawn, warnings)),
    }
}

/// The stored operators `ids` name, composed in order ([A₁, A₂] acts as the
/// UNet edited by A₁ then A₂, as `generate --edit` composes them), and their records.
fn operators(
    state: &AppState,
    ids: &[String],
) -> Result<
    (
        Option<Operator>,
        Vec<crate::edit::operator_file::OperatorMeta>,
    ),
    ApiError,
> {
    let mut ops = Vec::new();
    let mut metas = Vec::new();
    for id in ids {
        let (op, meta) = state.store.load(id)?;
        ops.push(op);
        metas.push(meta);
    }
    let composed = compose(&ops)
        .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    Ok((composed, metas))
}

/// An error and its sources on one line.
pub(super) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}
