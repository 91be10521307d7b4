//! The server's counters, rendered in Prometheus' text format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Counts kept while serving.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    /// (route, status) → responses.
    requests: BTreeMap<(String, u16), u64>,
    /// Batch size → batches drawn.
    batches: BTreeMap<usize, u64>,
    /// UNet calls and their summed seconds.
    step_count: u64,
    step_seconds: f64,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Counts)) {
        // A poisoned lock only means a panic elsewhere mid-update: counts stay usable.
        let mut c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut c);
    }

    /// One response on `route` with `status`.
    pub fn request(&self, route: &str, status: u16) {
        self.with(|c| *c.requests.entry((route.to_string(), status)).or_default() += 1);
    }

    /// One UNet batch of `size` images.
    pub fn batch(&self, size: usize) {
        self.with(|c| *c.batches.entry(size).or_default() += 1);
    }

    /// `calls` UNet calls of `seconds` each on average.
    pub fn steps(&self, calls: usize, seconds: f64) {
        self.with(|c| {
            c.step_count += calls as u64;
            c.step_seconds += seconds * calls as f64;
        });
    }

    /// The text `/metrics` returns, with the queue's current depth.
    pub fn render(&self, queue_depth: usize) -> String {
        let c = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP time_onnx_queue_depth Image requests waiting for a batch.\n\
             # TYPE time_onnx_queue_depth gauge\ntime_onnx_queue_depth {queue_depth}"
        );
        let _ = writeln!(
            out,
            "# HELP time_onnx_batches_total UNet batches drawn, by images per batch.\n\
             # TYPE time_onnx_batches_total counter"
        );
        for (size, n) in &c.batches {
            let _ = writeln!(out, "time_onnx_batches_total{{size=\"{size}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP time_onnx_unet_step_seconds Time per denoising step of a batch.\n\
             # TYPE time_onnx_unet_step_seconds summary\n\
             time_onnx_unet_step_seconds_sum {}\ntime_onnx_unet_step_seconds_count {}",
            c.step_seconds, c.step_count
        );
        let _ = writeln!(
            out,
            "# HELP time_onnx_requests_total Responses, by route and status.\n\
             # TYPE time_onnx_requests_total counter"
        );
        for ((route, status), n) in &c.requests {
            let _ = writeln!(
                out,
                "time_onnx_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out
    }
}
