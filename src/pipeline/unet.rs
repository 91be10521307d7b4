//! The UNet session: one noise prediction per call, inputs fed in the types
//! and ranks the export declares.
//!
//! On the CPU, a guided batch (unconditional and text halves) runs as two
//! concurrent runs of one session, one per half, each with half the threads,
//! rather than one run whose every operator is split across all threads: no
//! barrier after each of the graph's thousands of operators, no small
//! operator leaving a core idle. Measured on SD 1.x at 256×256 on 2 cores:
//! 7 % less time per step, same numbers (each half is computed exactly as in
//! the batched run).
//!
//! The cross-attention K/V projections of the text embeddings are split off
//! the graph when it allows ([`crate::onnx::split`]) and run once per prompt
//! instead of at every step.

use std::path::Path;

use ndarray::{Array4, ArrayD, ArrayView4, Axis, IxDyn, Slice};

use super::conditioning::{TEXT_EMBEDS, TIME_IDS, TIMESTEP_COND, TextBatch};
use bytes::Bytes;

use crate::onnx::split::split_text_projections;
use crate::onnx::upcast::{Widened, to_float32_given};
use crate::onnx::{DataType, Model};
use crate::runtime::{
    Binding, ElementType, GraphOptimization, Runtime, Session, SessionError, SessionOptions,
};

/// The UNet's text input.
const TEXT: &str = "encoder_hidden_states";

/// A loaded UNet and the shape of its interface.
pub struct Unet {
    session: Session,
    /// The timestep's element type and rank (0: a scalar; 1: one per row).
    timestep: (ElementType, usize),
    output: String,
    /// Declared dims of the output, for the buffers of concurrent runs.
    output_dims: Vec<i64>,
    /// Concurrent runs a batch is split into (see the module's doc).
    streams: usize,
    /// One binding per stream: inputs that stay the same across denoising
    /// steps (the text embeddings and their K/V projections) bound once per
    /// prompt, and where the output goes.
    bound: Vec<Binding>,
    /// The cross-attention K/V projections of the text embeddings, split off
    /// the UNet to run once per prompt; `None` when the graph was not split
    /// and computes them at every step.
    projections: Option<TextProjections>,
}

/// The split-off projections model and the names of its products.
struct TextProjections {
    session: Session,
    products: Vec<String>,
}

impl Unet {
    /// How many concurrent runs a batch of `rows` is split into: two halves
    /// on the CPU when both the threads and the rows split evenly (each run
    /// gets half the threads), one run otherwise, and one for a UNet that
    /// stores float16 weights (`half`): SDXL's steps were slower in halves
    /// once widened to float32 (3.6 s against 3.2 s at 256×256 on 2 cores),
    /// and where ONNX Runtime folds its casts instead, it does so on the
    /// session's threads (one thread took 67 s where two took 44 s).
    pub fn streams_for(threads: Option<usize>, on_cpu: bool, rows: usize, half: bool) -> usize {
        let threads = threads.unwrap_or_else(available_threads);
        if on_cpu && !half && threads >= 2 && threads.is_multiple_of(2) && rows.is_multiple_of(2) {
            2
        } else {
            1
        }
    }

    /// Opens the UNet for batches run as `streams` concurrent runs
    /// ([`Self::streams_for`]) and checks its inputs are `sample`,
    /// `timestep`, `encoder_hidden_states`.
    pub fn open(
        rt: &Runtime,
        path: &Path,
        mut opts: SessionOptions,
        streams: usize,
    ) -> Result<Self, SessionError> {
        if streams > 1 {
            opts.threads = Some(opts.threads.unwrap_or_else(available_threads) / streams);
        }
        let (session, projections) = match Model::open(path) {
            Ok(model) if rt.on_cpu(opts) && stores_fp16(&model) => {
                open_fp16_on_cpu(rt, path, model, opts)?
            }
            model => open_split(rt, path, model, opts)?,
        };
        Self::from_sessions(session, projections, streams)
    }

    /// The UNet of `session` (and its split-off `projections`), its
    /// interface checked.
    fn from_sessions(
        session: Session,
        projections: Option<TextProjections>,
        streams: usize,
    ) -> Result<Self, SessionError> {
        let role = "the UNet";
        session.tensor_input("sample", role)?;
        let timestep = session.tensor_input("timestep", role)?;
        let timestep = (
            timestep.ty.unwrap_or(ElementType::Other),
            timestep.dims.len(),
        );
        session.tensor_input(TEXT, role)?;
        let output = session.output_or_first("out_sample", role)?.clone();
        if output.ty.is_none() {
            return Err(session.interface(format!(
                "the UNet's output {:?} is not a tensor",
                output.name
            )));
        }
        Ok(Self {
            session,
            timestep,
            output: output.name,
            output_dims: output.dims,
            streams,
            bound: Vec::new(),
            projections,
        })
    }

    /// Concurrent runs a batch is split into.
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Binds the rows that stay the same across denoising steps for the
    /// coming [`Self::predict`] calls: the text embeddings (`[b, 77, d] f32`)
    /// and whatever else the UNet reads (SDXL's pooled embedding and size
    /// conditioning, LCM's guidance embedding). They are converted and handed
    /// to ONNX Runtime once per prompt, not once per step, and the text's
    /// K/V projections computed once.
    pub fn bind(&mut self, batch: &TextBatch) -> Result<(), SessionError> {
        let rows = batch.hidden.shape()[0];
        if !rows.is_multiple_of(self.streams) {
            return Err(self.session.interface(format!(
                "a batch of {rows} cannot be split into {} runs",
                self.streams
            )));
        }
        for name in [TEXT_EMBEDS, TIME_IDS, TIMESTEP_COND] {
            let given = batch.extras().any(|(n, _)| n == name);
            if self.session.input(name).is_some() != given {
                return Err(self.session.interface(format!(
                    "the UNet {} an input {name:?} and the batch {}",
                    if given { "has no" } else { "has" },
                    if given { "sets it" } else { "does not set it" }
                )));
            }
        }
        let per_stream = rows / self.streams;
        self.bound.clear();
        for k in 0..self.streams {
            let part = Slice::from(k * per_stream..(k + 1) * per_stream);
            let mut binding = self.session.binding()?;
            let text = batch.hidden.slice_axis(Axis(0), part);
            let value = self.session.float_value(TEXT, text.into_dyn())?;
            self.session.bind_input(&mut binding, TEXT, &value)?;
            for (name, rows) in batch.extras() {
                let extra = rows.slice_axis(Axis(0), part);
                let v = self.session.float_value(name, extra.into_dyn())?;
                self.session.bind_input(&mut binding, name, &v)?;
            }
            if let Some(p) = &mut self.projections {
                let mut out = p.session.run(&[(TEXT, &value)])?;
                for name in &p.products {
                    let product = out.take(name)?;
                    self.session.bind_input(&mut binding, name, &product)?;
                }
            }
            if self.streams == 1 {
                self.session
                    .bind_output_to_session(&mut binding, &self.output)?;
            }
            self.bound.push(binding);
        }
        Ok(())
    }

    /// Predicts the noise for `sample: [b, c, h, w] f32` at timestep `t` with
    /// the rows of [`Self::bind`].
    pub fn predict(
        &mut self,
        sample: ArrayView4<f32>,
        t: f64,
    ) -> Result<Array4<f32>, SessionError> {
        let streams = self.bound.len();
        if streams == 0 {
            return Err(self.session.interface("predict before bind"));
        }
        let rows = sample.shape()[0] / streams;
        if rows * streams != sample.shape()[0] {
            return Err(self.session.interface(format!(
                "a batch of {} does not split into {streams} runs",
                sample.shape()[0]
            )));
        }
        let timestep = self.timestep_value(t, rows)?;
        for (k, part) in sample.axis_chunks_iter(Axis(0), rows.max(1)).enumerate() {
            let value = self.session.float_value("sample", part.into_dyn())?;
            let binding = &mut self.bound[k];
            self.session.bind_input(binding, "sample", &value)?;
            self.session.bind_input(binding, "timestep", &timestep)?;
            // The output buffer, once per prompt: the part's rows, the
            // declared dims elsewhere, the sample's where those are dynamic.
            if self.streams > 1 && binding.output().is_none() {
                let shape: Vec<usize> = part
                    .shape()
                    .iter()
                    .enumerate()
                    .map(|(k, &s)| match self.output_dims.get(k) {
                        Some(&d) if k > 0 && d > 0 => d as usize,
                        _ => s,
                    })
                    .collect();
                let buffer = self.session.output_buffer(&self.output, shape)?;
                self.session.bind_output(binding, &self.output, buffer)?;
            }
        }
        let out = if self.streams == 1 {
            self.session
                .run_binding(&self.bound[0])?
                .float(&self.output)?
        } else {
            self.session.run_concurrently(&self.bound)?;
            let parts = self
                .bound
                .iter()
                .map(|b| match b.output() {
                    Some(v) => v.to_f32(&self.session),
                    None => Err(self.session.interface("a stream has no output buffer")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            ndarray::concatenate(Axis(0), &views)
                .map_err(|e| self.session.interface(e.to_string()))?
        };
        out.into_dimensionality()
            .map_err(|e| self.session.interface(e.to_string()))
    }

    /// The timestep in the type and rank the export declares.
    fn timestep_value(&self, t: f64, batch: usize) -> Result<crate::runtime::Value, SessionError> {
        let shape: Vec<usize> = if self.timestep.1 == 0 {
            Vec::new()
        } else {
            vec![batch]
        };
        match self.timestep.0 {
            ElementType::I32 | ElementType::I64 => {
                let n = shape.iter().product();
                self.session
                    .int_value("timestep", &shape, vec![t.round() as i64; n])
            }
            _ => self.session.float_value(
                "timestep",
                ArrayD::from_elem(IxDyn(&shape), t as f32).view(),
            ),
        }
    }
}

/// Memory a widened float16 UNet needs free, per byte of its float32
/// weights: ours, ONNX Runtime's pre-packed copies of the matrix-product
/// ones, and room for the rest. Measured on SDXL's (9.6 GiB of float32
/// weights): peak RSS 18.6 GiB, 1.95 times.
const WIDENED_MEMORY_PER_BYTE: f64 = 2.1;

/// A float16 UNet on the CPU, where ONNX Runtime computes it through casts
/// to float32. Below its "all" level the casts of the weights are not
/// folded: every call casts every weight again (SDXL's at 256×256: 17 s a
/// call, memory past 17 GB and growing); at "all" they are cast once at load
/// (44 s for SDXL's, 12.7 GiB peak) and a call takes 3.2–3.6 s. Widening the
/// weights ourselves, on the session's threads, and handing them over from
/// memory is faster still, when the memory is there ([`open_widened`]);
/// otherwise, or if ONNX Runtime refuses, the "all" level it is.
fn open_fp16_on_cpu(
    rt: &Runtime,
    path: &Path,
    model: Model,
    mut opts: SessionOptions,
) -> Result<(Session, Option<TextProjections>), SessionError> {
    match open_widened(rt, path, model, opts) {
        Ok(opened) => return Ok(opened),
        Err(why) => tracing::info!(
            "{}: float16 weights widened by ONNX Runtime at load, the slower way: {why}",
            path.display()
        ),
    }
    opts.optimization = GraphOptimization::All;
    open_split(rt, path, Model::open(path), opts)
}

/// The float16 UNet `model` computed in float32 from weights we widened
/// ([`to_float32_given`]), split at its text projections when it can be.
fn open_widened(
    rt: &Runtime,
    path: &Path,
    model: Model,
    opts: SessionOptions,
) -> Result<(Session, Option<TextProjections>), String> {
    let narrow = fp16_bytes(&model).map_err(|e| e.to_string())?;
    if let Some(why) = widening_refused(narrow, super::memory::available()) {
        return Err(why);
    }
    let threads = opts.threads.unwrap_or_else(available_threads);
    let widen = |m: &Model| to_float32_given(m, threads).map_err(|e| e.to_string());
    let (halves, products) = match split_text_projections(&model) {
        Ok(split) => {
            let half = |bytes: Vec<u8>| {
                Model::from_bytes(path, Bytes::from(bytes))
                    .map_err(|e| e.to_string())
                    .and_then(|m| widen(&m))
            };
            let unet = half(split.unet)?;
            (vec![unet, half(split.projections)?], Some(split.products))
        }
        Err(why) => {
            tracing::debug!("{}: runs whole ({why})", path.display());
            (vec![widen(&model)?], None)
        }
    };
    // The float16 file's pages go before ONNX Runtime allocates its own.
    drop(model);
    let open = |w: Widened| {
        rt.open_bytes(path, &w.bytes, opts, w.given)
            .map_err(|e| e.to_string())
    };
    // ONNX Runtime builds a session on one thread: the projections' is built
    // beside the UNet's.
    let mut halves = halves.into_iter();
    let (unet, projections) = (halves.next(), halves.next());
    let (unet, projections) = std::thread::scope(|s| {
        let projections = projections.map(|w| s.spawn(|| open(w)));
        let unet = unet.map(open);
        let projections =
            projections.map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        (unet, projections)
    });
    let unet = unet.ok_or("no model")??;
    let projections = match (projections, products) {
        (Some(session), Some(products)) => Some(TextProjections {
            session: session?,
            products,
        }),
        _ => None,
    };
    Ok((unet, projections))
}

/// Why a UNet with `narrow` bytes of float16 weights is not widened when
/// `free` bytes of memory are available (`None`: unknown).
fn widening_refused(narrow: u64, free: Option<u64>) -> Option<String> {
    let wide = 2 * narrow;
    let need = (wide as f64 * WIDENED_MEMORY_PER_BYTE) as u64;
    let free = free.filter(|&free| free < need)?;
    Some(format!(
        "{:.1} GiB of float32 weights need {:.1} GiB free, {:.1} GiB is",
        gib(wide),
        gib(need),
        gib(free)
    ))
}

/// Bytes of the model's float16 initializers.
fn fp16_bytes(model: &Model) -> Result<u64, crate::onnx::OnnxError> {
    let mut narrow = 0;
    for t in &model.graph()?.initializer {
        if DataType::from_i32(t.data_type) == DataType::Float16 {
            narrow += model.tensor_info(t)?.nbytes;
        }
    }
    Ok(narrow)
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 30)
}

/// The UNet split at its text K/V projections when we can; anything
/// unexpected on the way (a graph the rewrite is not sure about, ONNX Runtime
/// refusing a half) leaves it whole, as exported.
fn open_split(
    rt: &Runtime,
    path: &Path,
    model: Result<Model, crate::onnx::OnnxError>,
    opts: SessionOptions,
) -> Result<(Session, Option<TextProjections>), SessionError> {
    let split = model
        .map_err(|e| e.to_string())
        .and_then(|m| split_text_projections(&m).map_err(|e| e.to_string()))
        .and_then(|split| {
            let open = |bytes: &[u8]| {
                rt.open_bytes(path, bytes, opts, Vec::new())
                    .map_err(|e| e.to_string())
            };
            let projections = TextProjections {
                session: open(&split.projections)?,
                products: split.products,
            };
            Ok((open(&split.unet)?, projections))
        });
    match split {
        Ok((session, projections)) => {
            tracing::debug!(
                "{}: {} cross-attention K/V projections of the text run once per prompt",
                path.display(),
                projections.products.len()
            );
            Ok((session, Some(projections)))
        }
        Err(why) => {
            tracing::debug!("{}: runs whole ({why})", path.display());
            let session = rt.open(path, opts).map_err(gpu_only)?;
            Ok((session, None))
        }
    }
}

/// Whether the model keeps float16 weights (any float16 initializer).
pub fn stores_fp16(model: &Model) -> bool {
    model.graph().is_ok_and(|g| {
        g.initializer
            .iter()
            .any(|t| DataType::from_i32(t.data_type) == DataType::Float16)
    })
}

/// ORT-optimized UNets use contrib ops (packed K/V attention, NhwcConv,
/// GroupNorm) that only the CUDA provider implements: say so instead of
/// passing on "kernel not found".
fn gpu_only(e: SessionError) -> SessionError {
    match e {
        SessionError::Ort { path, source } if source.to_string().contains("com.microsoft") => {
            SessionError::GpuOnlyOperators {
                path,
                refusal: source,
            }
        }
        other => other,
    }
}

/// The threads ONNX Runtime would use by default: one per core.
fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::conditioning::TextBatch;
    use crate::runtime::Device;
    use ndarray::{Array2, Array3};

    const GIB: u64 = 1 << 30;

    #[test]
    fn widening_needs_the_memory() {
        // SDXL's float16 UNet: 4.78 GiB of weights.
        let sdxl = (4.78 * GIB as f64) as u64;
        assert_eq!(widening_refused(sdxl, Some(22 * GIB)), None);
        assert_eq!(widening_refused(sdxl, None), None, "unknown: try");
        let short = widening_refused(sdxl, Some(16 * GIB)).unwrap();
        assert!(short.contains("need 20.1 GiB free, 16.0 GiB is"), "{short}");
    }

    /// The two routes for a float16 UNet on the CPU (ours widens the weights,
    /// the fallback lets ONNX Runtime fold its casts) compute the same
    /// prediction but for ONNX Runtime's float16 rounding between operators;
    /// the widened one at the "all" level (weights given as external data)
    /// the same as at "extended" but for the order of float32 sums.
    #[test]
    fn the_fallback_for_float16_predicts_what_the_widened_unet_does() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/sdxl-tiny/fp16/unet/model.onnx"
        ));
        let rt = Runtime::load().unwrap();
        let opts = SessionOptions {
            device: Device::Cpu,
            threads: Some(2),
            ..SessionOptions::default()
        };
        let (s, p) = open_widened(&rt, path, Model::open(path).unwrap(), opts).unwrap();
        let mut widened = Unet::from_sessions(s, p, 1).unwrap();
        let all = SessionOptions {
            optimization: GraphOptimization::All,
            ..opts
        };
        let (s, p) = open_widened(&rt, path, Model::open(path).unwrap(), all).unwrap();
        let mut widened_all = Unet::from_sessions(s, p, 1).unwrap();
        let (s, p) = open_split(&rt, path, Model::open(path), all).unwrap();
        let mut folded = Unet::from_sessions(s, p, 1).unwrap();
        let dims = |name: &str| Model::open(path).unwrap().input_dims(name).unwrap();
        let (d, pooled) = (dims(TEXT)[2].unwrap(), dims(TEXT_EMBEDS)[1].unwrap());
        let wave = |i: usize| ((i as f32) * 0.37).sin();
        let batch = TextBatch {
            hidden: Array3::from_shape_fn((2, 77, d), |(b, t, k)| wave(b * 9_000 + t * 97 + k)),
            text_embeds: Some(Array2::from_shape_fn((2, pooled), |(b, k)| {
                wave(b * 500 + k + 7)
            })),
            time_ids: Some(Array2::from_shape_fn((2, 6), |(_, k)| {
                [128., 128., 0., 0., 128., 128.][k]
            })),
            timestep_cond: None,
        };
        let sample = Array4::from_shape_fn((2, 4, 16, 16), |(b, c, y, x)| {
            wave(b * 4_000 + c * 300 + y * 17 + x)
        });
        let predict = |u: &mut Unet| {
            u.bind(&batch).unwrap();
            u.predict(sample.view(), 999.0).unwrap()
        };
        let (a, b) = (predict(&mut widened), predict(&mut folded));
        let c = predict(&mut widened_all);
        let max_diff = |x: &Array4<f32>, y: &Array4<f32>| {
            x.iter().zip(y).fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        };
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let (off, levels) = (max_diff(&a, &b), max_diff(&a, &c));
        assert!(
            scale > 0.1 && a.iter().all(|v| v.is_finite()),
            "scale {scale}"
        );
        eprintln!("widened vs folded: {off:.2e}, extended vs all: {levels:.2e}, of {scale:.2e}");
        assert!(off <= 1e-2 * scale, "{off} against {scale}");
        assert!(levels <= 1e-5 * scale, "{levels} against {scale}");
    }

    #[test]
    fn batches_split_in_two_only_on_the_cpu_with_even_threads_and_rows() {
        assert_eq!(Unet::streams_for(Some(2), true, 2, false), 2);
        assert_eq!(Unet::streams_for(Some(4), true, 6, false), 2);
        assert_eq!(
            Unet::streams_for(Some(2), true, 1, false),
            1,
            "one unguided image"
        );
        assert_eq!(Unet::streams_for(Some(2), true, 3, false), 1, "odd rows");
        assert_eq!(Unet::streams_for(Some(3), true, 2, false), 1, "odd threads");
        assert_eq!(Unet::streams_for(Some(1), true, 2, false), 1, "one thread");
        assert_eq!(Unet::streams_for(Some(2), false, 2, false), 1, "CUDA");
        assert_eq!(
            Unet::streams_for(Some(2), true, 2, true),
            1,
            "float16 weights"
        );
    }
}
