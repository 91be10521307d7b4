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

use std::ffi::CStr;
use std::path::{Path, PathBuf};

use ndarray::{Array4, ArrayD, ArrayView3, ArrayView4, Axis, IxDyn};
use ort::AsPointer;
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::onnx::Model;
use crate::onnx::split::split_text_projections;
use crate::runtime::tensors::{float_array, float_value, port};
use crate::runtime::{Runtime, SessionError, SessionOptions};

/// A loaded UNet and the shape of its interface.
pub struct Unet {
    path: PathBuf,
    session: Session,
    sample: TensorElementType,
    sample_dims: Vec<i64>,
    timestep: (TensorElementType, usize),
    hidden: (TensorElementType, Vec<i64>),
    output: String,
    /// The output's element type and declared dims, for the buffers of
    /// concurrent runs.
    output_port: (TensorElementType, Vec<i64>),
    /// Concurrent runs a batch is split into (see the module's doc).
    streams: usize,
    /// One binding per stream: inputs that stay the same across denoising
    /// steps (the text embeddings and their K/V projections) bound once per
    /// prompt, and where the output goes.
    bound: Vec<Bound>,
    /// The cross-attention K/V projections of the text embeddings, split off
    /// the UNet to run once per prompt ([`crate::onnx::split`]); `None` when
    /// the graph was not split and computes them at every step.
    projections: Option<TextProjections>,
}

/// A stream's binding and, when several streams run, the output buffer it
/// writes into (one stream lets ONNX Runtime allocate the output).
struct Bound {
    binding: IoBinding,
    output: Option<DynValue>,
}

/// The split-off projections model and the names of its products.
struct TextProjections {
    session: Session,
    products: Vec<String>,
}

impl Unet {
    /// How many concurrent runs a batch of `rows` is split into: two halves
    /// on the CPU when both the threads and the rows split evenly (each run
    /// gets half the threads), one run otherwise.
    pub fn streams_for(threads: Option<usize>, on_cpu: bool, rows: usize) -> usize {
        let threads = threads.unwrap_or_else(available_threads);
        if on_cpu && threads >= 2 && threads.is_multiple_of(2) && rows.is_multiple_of(2) {
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
        // Split when we can; anything unexpected on the way (a graph the
        // rewrite is not sure about, ONNX Runtime refusing a half) leaves the
        // UNet whole, as exported.
        let split = Model::open(path)
            .map_err(|e| e.to_string())
            .and_then(|m| split_text_projections(&m).map_err(|e| e.to_string()))
            .and_then(|split| {
                let open = |bytes: &[u8]| {
                    rt.session_from_bytes(path, bytes, opts)
                        .map_err(|e| e.to_string())
                };
                let projections = TextProjections {
                    session: open(&split.projections)?,
                    products: split.products,
                };
                Ok((open(&split.unet)?, projections))
            });
        let (session, projections) = match split {
            Ok((session, projections)) => {
                tracing::debug!(
                    "{}: {} cross-attention K/V projections of the text run once per prompt",
                    path.display(),
                    projections.products.len()
                );
                (session, Some(projections))
            }
            Err(why) => {
                tracing::debug!("{}: runs whole ({why})", path.display());
                let session = rt
                    .session_with(path, opts)
                    .map_err(|e| explain_contrib_ops(e, path))?;
                (session, None)
            }
        };
        let bad = |why: String| SessionError::Interface {
            path: path.to_path_buf(),
            why,
        };
        let need = |name: &str| {
            port(&session, name, true)
                .ok_or_else(|| bad(format!("the UNet has no tensor input {name:?}")))
        };
        let (sample, sample_dims) = need("sample")?;
        let (t_ty, t_shape) = need("timestep")?;
        let hidden = need("encoder_hidden_states")?;
        let output = session
            .outputs()
            .iter()
            .find(|o| o.name() == "out_sample")
            .or_else(|| session.outputs().first())
            .ok_or_else(|| bad("the UNet has no outputs".into()))?
            .name()
            .to_string();
        let output_port = port(&session, &output, false)
            .ok_or_else(|| bad(format!("the UNet's output {output:?} is not a tensor")))?;
        Ok(Self {
            path: path.to_path_buf(),
            session,
            sample,
            sample_dims,
            timestep: (t_ty, t_shape.len()),
            hidden,
            output,
            output_port,
            streams,
            bound: Vec::new(),
            projections,
        })
    }

    /// The latent height and width, when the export fixes them (dynamo exports do).
    pub fn latent_size(&self) -> Option<(usize, usize)> {
        match self.sample_dims[..] {
            [_, _, h, w] if h > 0 && w > 0 => Some((h as usize, w as usize)),
            _ => None,
        }
    }

    /// The text-embedding width the UNet expects, when the export fixes it.
    pub fn text_width(&self) -> Option<usize> {
        self.hidden.1.last().and_then(|&d| usize::try_from(d).ok())
    }

    /// Concurrent runs a batch is split into.
    pub fn streams(&self) -> usize {
        self.streams
    }

    /// Binds the text embeddings `hidden: [b, 77, d] f32` for the coming
    /// [`Self::predict_bound`] calls: they are converted and handed to ONNX
    /// Runtime once per prompt, not once per step, and the output buffer is
    /// reused across steps.
    pub fn bind_hidden(&mut self, hidden: ArrayView3<f32>) -> Result<(), SessionError> {
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let rows = hidden.shape()[0];
        if !rows.is_multiple_of(self.streams) {
            return Err(SessionError::Interface {
                path: path.clone(),
                why: format!(
                    "a batch of {rows} cannot be split into {} runs",
                    self.streams
                ),
            });
        }
        self.bound.clear();
        for part in hidden.axis_chunks_iter(Axis(0), rows / self.streams) {
            let mut binding = self.session.create_binding().map_err(err)?;
            let value = float_value(self.hidden.0, part.into_dyn()).map_err(err)?;
            binding
                .bind_input("encoder_hidden_states", &value)
                .map_err(err)?;
            if let Some(p) = &mut self.projections {
                let mut products = p
                    .session
                    .run(ort::inputs!["encoder_hidden_states" => &value])
                    .map_err(err)?;
                for name in &p.products {
                    let product =
                        products
                            .remove(name.as_str())
                            .ok_or_else(|| SessionError::Interface {
                                path: path.clone(),
                                why: format!("the split-off projections gave no {name:?}"),
                            })?;
                    binding.bind_input(name.as_str(), &product).map_err(err)?;
                }
            }
            if self.streams == 1 {
                let mem = self.session.allocator().memory_info();
                binding
                    .bind_output_to_device(self.output.as_str(), mem)
                    .map_err(err)?;
            }
            self.bound.push(Bound {
                binding,
                output: None,
            });
        }
        Ok(())
    }

    /// Predicts the noise for `sample: [b, c, h, w] f32` at timestep `t` with
    /// the embeddings of [`Self::bind_hidden`].
    pub fn predict_bound(
        &mut self,
        sample: ArrayView4<f32>,
        t: f64,
    ) -> Result<Array4<f32>, SessionError> {
        let path = self.path.clone();
        let err = |source: ort::Error| SessionError::Ort {
            path: path.clone(),
            source,
        };
        let interface = |why: String| SessionError::Interface {
            path: path.clone(),
            why,
        };
        if self.bound.is_empty() {
            return Err(interface("predict_bound before bind_hidden".into()));
        }
        let rows = sample.shape()[0] / self.bound.len();
        if rows * self.bound.len() != sample.shape()[0] {
            return Err(interface(format!(
                "a batch of {} does not split into {} runs",
                sample.shape()[0],
                self.bound.len()
            )));
        }
        let timestep = self.timestep_value(t, rows).map_err(err)?;
        for (b, part) in self
            .bound
            .iter_mut()
            .zip(sample.axis_chunks_iter(Axis(0), rows.max(1)))
        {
            let part_value = float_value(self.sample, part.into_dyn()).map_err(err)?;
            b.binding.bind_input("sample", &part_value).map_err(err)?;
            b.binding.bind_input("timestep", &timestep).map_err(err)?;
            // The output buffer, once per prompt: the part's rows, the
            // declared dims elsewhere, the sample's where those are dynamic.
            if self.streams > 1 && b.output.is_none() {
                let (ty, declared) = &self.output_port;
                let shape: Vec<usize> = part
                    .shape()
                    .iter()
                    .enumerate()
                    .map(|(k, &s)| match declared.get(k) {
                        Some(&d) if k > 0 && d > 0 => d as usize,
                        _ => s,
                    })
                    .collect();
                let mut out = ort::value::DynTensor::new(self.session.allocator(), *ty, shape)
                    .map_err(err)?
                    .into_dyn();
                b.binding
                    .bind_output(self.output.as_str(), &mut out)
                    .map_err(err)?;
                b.output = Some(out);
            }
        }
        let out = if self.streams == 1 {
            let outputs = self
                .session
                .run_binding(&self.bound[0].binding)
                .map_err(err)?;
            float_array(&outputs[self.output.as_str()]).map_err(err)?
        } else {
            run_concurrently(&self.session, &self.bound).map_err(err)?;
            let parts = self
                .bound
                .iter()
                .map(|b| b.output.as_ref().map(float_array))
                .collect::<Option<Result<Vec<_>, _>>>()
                .ok_or_else(|| interface("a stream has no output buffer".into()))?
                .map_err(err)?;
            let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
            ndarray::concatenate(Axis(0), &views).map_err(|e| interface(e.to_string()))?
        };
        out.into_dimensionality()
            .map_err(|e| interface(e.to_string()))
    }

    /// The timestep in the type and rank the export declares.
    fn timestep_value(&self, t: f64, batch: usize) -> Result<ort::value::DynValue, ort::Error> {
        let shape = if self.timestep.1 == 0 {
            IxDyn(&[])
        } else {
            IxDyn(&[batch])
        };
        Ok(match self.timestep.0 {
            TensorElementType::Int64 => {
                Tensor::from_array(ArrayD::from_elem(shape, t.round() as i64))?.into_dyn()
            }
            ty => float_value(ty, ArrayD::from_elem(shape, t as f32).view())?,
        })
    }
}

/// The threads ONNX Runtime would use by default: one per core.
fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Runs every binding of `session` at once, one thread each, and waits for all.
///
/// ONNX Runtime documents `Run` as safe to call from several threads on one
/// session (each call with its own binding); ort exposes runs only through
/// `&mut Session`, so these go through the C API.
fn run_concurrently(session: &Session, bound: &[Bound]) -> Result<(), ort::Error> {
    /// Pointers handed to the run threads; the session and bindings outlive
    /// the scope that joins them.
    #[derive(Clone, Copy)]
    struct Run(*mut ort::sys::OrtSession, *const ort::sys::OrtIoBinding);
    // SAFETY: see the function's doc; nothing else touches the bindings while
    // the scope runs.
    unsafe impl Send for Run {}
    fn run(r: Run) -> Result<(), ort::Error> {
        let api = ort::api();
        // SAFETY: both pointers are live (see `Run`); a non-null status is
        // ours to read and release.
        unsafe {
            let status = (api.RunWithBinding)(r.0, std::ptr::null(), r.1);
            if status.0.is_null() {
                return Ok(());
            }
            let message = CStr::from_ptr((api.GetErrorMessage)(status.0))
                .to_string_lossy()
                .into_owned();
            (api.ReleaseStatus)(status.0);
            Err(ort::Error::new(message))
        }
    }
    let runs: Vec<Run> = bound
        .iter()
        .map(|b| Run(session.ptr().cast_mut(), b.binding.ptr()))
        .collect();
    std::thread::scope(|scope| {
        let others: Vec<_> = runs[1..]
            .iter()
            .map(|&r| scope.spawn(move || run(r)))
            .collect();
        let first = run(runs[0]);
        others
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(ort::Error::new("a UNet run thread panicked")))
            })
            .fold(first, Result::and)
    })
}

/// ORT-optimized UNets use contrib ops (packed K/V attention, NhwcConv,
/// GroupNorm) that only the CUDA provider implements: say so instead of
/// passing on "kernel not found".
fn explain_contrib_ops(e: SessionError, path: &Path) -> SessionError {
    match e {
        SessionError::Ort { source, .. } if source.to_string().contains("com.microsoft") => {
            SessionError::Interface {
                path: path.to_path_buf(),
                why: format!(
                    "this UNet was optimized by ONNX Runtime's transformer optimizer for GPUs and uses operators the CPU \
                 provider lacks ({source}); run it with --device cuda, or use the unoptimized export"
                ),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::Unet;

    #[test]
    fn batches_split_in_two_only_on_the_cpu_with_even_threads_and_rows() {
        assert_eq!(Unet::streams_for(Some(2), true, 2), 2);
        assert_eq!(Unet::streams_for(Some(4), true, 6), 2);
        assert_eq!(Unet::streams_for(Some(2), true, 1), 1, "one unguided image");
        assert_eq!(Unet::streams_for(Some(2), true, 3), 1, "odd rows");
        assert_eq!(Unet::streams_for(Some(3), true, 2), 1, "odd threads");
        assert_eq!(Unet::streams_for(Some(1), true, 2), 1, "one thread");
        assert_eq!(Unet::streams_for(Some(2), false, 2), 1, "CUDA");
    }
}
