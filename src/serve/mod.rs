//! `time-onnx serve`: one unedited UNet, every request its own edits.
//!
//! An edit as an operator acts on the text embeddings, so the server loads
//! the model once and applies each request's operators to that request's
//! embeddings; requests with different edits share one UNet batch
//! ([`engine`]). Edits are computed or uploaded into a content-addressed
//! operator folder ([`store`]). The JSON API (`/v1`), the Open Inference
//! Protocol v2 (`/v2`, for KServe and v2 clients), Prometheus metrics and a
//! page at `/` share one axum router.
//!
//! Reading order: [`run`] (start, serve, drain), then `api` (the `/v1`
//! handlers and the checks every image request passes), then `oip`.

mod api;
pub mod engine;
mod metrics;
mod oip;
mod page;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::onnx::OnnxError;
use crate::runtime::{Runtime, SessionOptions};
use crate::text::TextSide;
use crate::workflow::generate::{GenerateError, Generator};
use engine::{Batching, Engine};
use metrics::Metrics;
use store::{Store, StoreError};

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The model folder.
    pub model: PathBuf,
    /// A UNet replacing the folder's.
    pub unet: Option<PathBuf>,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The bearer token every endpoint but the health checks requires.
    pub token: Option<String>,
    /// The operator folder.
    pub operators: PathBuf,
    /// Batching.
    pub batching: Batching,
    /// Limits on each request.
    pub limits: Limits,
    /// Session settings.
    pub session: SessionOptions,
    /// Bytes a batch may need (the memory available when `None`).
    pub max_memory: Option<u64>,
}

/// What one request may ask for.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Pixels per image (height × width).
    pub max_pixels: usize,
    /// Denoising steps.
    pub max_steps: usize,
    /// Bytes of a request body.
    pub max_body: usize,
    /// Characters of a prompt (the tokenizer's work is bounded before it starts).
    pub max_prompt_chars: usize,
    /// Edits applied to one image.
    pub max_edits: usize,
    /// How long a request may wait for its image.
    pub timeout: Duration,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// ONNX Runtime could not be loaded.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::LoadError),
    /// The model could not be opened.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The text encoder could not be fingerprinted.
    #[error(transparent)]
    Onnx(#[from] OnnxError),
    /// The operator folder.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The async runtime or the engine thread could not start, or serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// What every handler shares.
struct AppState {
    config: ServeConfig,
    engine: Engine,
    store: Store,
    metrics: Arc<Metrics>,
    model: ModelInfo,
    /// One edit is computed at a time (each loads the text encoder).
    editing: tokio::sync::Semaphore,
    ready: AtomicBool,
}

/// Facts about the loaded model the handlers need.
struct ModelInfo {
    /// The name `/v2/models/{name}` answers to: the folder's name.
    name: String,
    /// The text encoders and tokenizers edits are computed with.
    text: TextSide,
    /// For the requests' prompt-length warnings.
    tokenizer: crate::text::ClipTokenizer,
    /// The guidance scale of requests that give none (diffusers' default
    /// for the folder's pipeline).
    default_guidance: f64,
    default_size: (usize, usize),
    vae_factor: usize,
}

/// Loads the model, listens, tells `ready` the bound address, and serves
/// until SIGTERM or Ctrl-C; then stops accepting, lets the requests in
/// flight finish, and returns.
pub fn run(config: ServeConfig, ready: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let rt = Runtime::load()?;
    let mut generator =
        Generator::open(&rt, &config.model, config.unet.as_deref(), config.session)?;
    if let Some(bytes) = config.max_memory {
        generator = generator.with_memory_limit(bytes);
    }
    let text = generator.model.text.clone();
    let fingerprint = text.fingerprint()?;
    // The width from one embedding: what the operators must match.
    let width = generator.embed("", "")?.context.shape()[2];
    let store = Store::open(&config.operators, fingerprint, width)?;
    let model = ModelInfo {
        name: config
            .model
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned()),
        tokenizer: crate::text::ClipTokenizer::from_dir(&text.encoders[0].tokenizer)
            .map_err(GenerateError::from)?,
        text,
        default_guidance: generator.default_guidance(),
        default_size: generator.default_size(),
        vae_factor: generator.model.vae_factor,
    };
    let metrics = Arc::new(Metrics::default());
    let (engine, engine_thread) = Engine::start(generator, config.batching, metrics.clone())?;
    let state = Arc::new(AppState {
        engine,
        store,
        metrics,
        model,
        editing: tokio::sync::Semaphore::new(1),
        ready: AtomicBool::new(true),
        config,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let served = runtime.block_on(async {
        let addr = state.config.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        ready(listener.local_addr()?);
        let app = router(state.clone());
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown(state.clone()))
            .await?;
        Ok::<_, ServeError>(())
    });
    // Dropping the last engine handle lets its thread finish the queue and stop.
    drop(state);
    runtime.shutdown_timeout(Duration::from_secs(5));
    let _ = engine_thread.join();
    served
}

/// Resolves on SIGTERM or Ctrl-C, marking the server not ready first.
async fn shutdown(state: Arc<AppState>) {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    state.ready.store(false, Ordering::SeqCst);
    tracing::info!("draining: no new connections; finishing the requests in flight");
}

fn router(state: Arc<AppState>) -> Router {
    let max_body = state.config.limits.max_body;
    Router::new()
        .route("/", get(page::page))
        .route("/v1/edits", post(api::create_edit))
        .route("/v1/edits/upload", post(api::upload_edit))
        .route("/v1/edits/{id}", get(api::get_edit))
        .route("/v1/images", post(api::images))
        .route("/v2", get(oip::server_metadata))
        .route("/v2/health/live", get(oip::live))
        .route("/v2/health/ready", get(oip::ready))
        .route("/v2/models/{name}", get(oip::model_metadata))
        .route("/v2/models/{name}/ready", get(oip::model_ready))
        .route("/v2/models/{name}/infer", post(oip::infer))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorise,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(state.engine.depth()),
    )
        .into_response()
}

/// Every endpoint but the health checks needs the bearer token, when one
/// is set (compared in constant time).
async fn authorise(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(token) = &state.config.token else {
        return next.run(req).await;
    };
    if req.uri().path().starts_with("/v2/health/") {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(StatusCode::UNAUTHORIZED, "wrong bearer token").into_response(),
        None => {
            let mut r = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this server needs an Authorization: Bearer token",
            )
            .into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            r
        }
    }
}

/// Equality whose time depends on the lengths only, not on where the bytes differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Counts every response by route and status.
async fn count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    state.metrics.request(&route, response.status().as_u16());
    response
}

/// A request's body, or a JSON error like every other (a body over the
/// limit is a 413).
pub(crate) struct Body(pub axum::body::Bytes);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|r| {
                let message = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    "the request body is larger than this server accepts".to_string()
                } else {
                    r.body_text()
                };
                ApiError::new(r.status(), message)
            })
    }
}

/// A refused or failed request: its status and a one-line reason, as
/// `{"error": "..."}` (the form the Open Inference Protocol uses too).
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::BadId(_) | StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::OtherEncoder { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}
