//! `time-onnx serve`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use time_onnx::runtime::Runtime;
use time_onnx::serve::engine::Batching;
use time_onnx::serve::{self, Limits, ServeConfig};

use super::{DeviceArg, parse_size, pipeline_session};

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model folder (diffusers/optimum ONNX layout).
    #[arg(long)]
    model: PathBuf,
    /// A UNet file replacing the folder's.
    #[arg(long)]
    unet: Option<PathBuf>,
    /// Address to listen on (loopback unless told otherwise; port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// A file holding the bearer token every endpoint but the health checks requires.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The operator folder (computed and uploaded edits), shared by replicas.
    #[arg(long, default_value = "operators")]
    operators: PathBuf,
    /// Images per UNet batch at most, whatever their edits.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// How long a request waits for others to share its batch.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    batch_wait_ms: u64,
    /// Image requests waiting at most; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Pixels per image at most (height × width).
    #[arg(long, default_value_t = 1024 * 1024)]
    max_pixels: usize,
    /// Denoising steps at most.
    #[arg(long, default_value_t = 150)]
    max_steps: usize,
    /// Seconds a request may wait for its image (then 504).
    #[arg(long, value_name = "S", default_value_t = 600)]
    timeout_s: u64,
    /// Bytes of a request body at most (an uploaded operator is ~2.4 MB for SD 1.x).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "64M")]
    max_body: u64,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Refuse batches whose generation needs more memory than this (default: the memory available).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Intra-op threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let ServeArgs {
        model,
        unet,
        listen,
        token_file,
        operators,
        max_batch,
        batch_wait_ms,
        max_queue,
        max_pixels,
        max_steps,
        timeout_s,
        max_body,
        device,
        max_memory,
        threads,
    } = args;
    if max_batch == 0 || max_queue == 0 {
        bail!("--max-batch and --max-queue must be at least 1");
    }
    let token = match &token_file {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?;
            let token = text.trim().to_string();
            if token.is_empty() {
                bail!("--token-file {} is empty", path.display());
            }
            Some(token)
        }
    };
    let rt = Runtime::load()?;
    let session = pipeline_session(&rt, device, threads);
    let config = ServeConfig {
        model,
        unet,
        listen,
        token,
        operators,
        batching: Batching {
            max_batch,
            wait: Duration::from_millis(batch_wait_ms),
            max_queue,
        },
        limits: Limits {
            max_pixels,
            max_steps,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
            max_prompt_chars: 4096,
            max_edits: 16,
            timeout: Duration::from_secs(timeout_s),
        },
        session,
        max_memory,
    };
    super::signals::leave_interrupts_to_command();
    serve::run(config, |addr| {
        // Scripts and tests read the address from this line.
        println!("listening on http://{addr}");
    })
    .context("serving")?;
    eprintln!("stopped");
    Ok(())
}
