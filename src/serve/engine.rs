//! The engine: one thread owns the model's sessions and turns queued image
//! requests into UNet batches.
//!
//! An edit reaches the UNet only through the text embeddings (c → A·c), so
//! requests with different edits, prompts and seeds share one batch: each
//! request's operator acts on its own rows of the embedding batch. Requests
//! join a batch when the batch's shape and schedule fit theirs (size,
//! steps, scheduler, guidance), up to `max_batch`, waiting at most
//! `wait` for company. Schedulers that draw noise run one request per batch,
//! so that every image is the one `generate` draws.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ndarray::{Array3, ArrayD, Axis};

use super::metrics::Metrics;
use crate::edit::Operator;
use crate::edit::operator_file::OperatorMeta;
use crate::pipeline::rng::Rng;
use crate::workflow::generate::{GenerateError, Generator, ImageText, Images, Params};

/// One image to draw.
pub struct ImageJob {
    /// The prompt.
    pub prompt: String,
    /// Its settings (`num_images` 1, `seed` the request's).
    pub params: Params,
    /// The request's edits, composed.
    pub operator: Option<Operator>,
    /// Their records, for the PNG's text.
    pub metas: Vec<OperatorMeta>,
    /// Where the image, or why there is none, goes.
    pub reply: tokio::sync::oneshot::Sender<Result<Drawn, Failure>>,
}

/// One drawn image.
pub struct Drawn {
    /// `[h, w, 3] f32` in [0, 1].
    pub pixels: Array3<f32>,
    /// The text chunks `generate` would write into its PNG.
    pub text: Vec<(String, String)>,
}

/// Why an image was not drawn: an HTTP status and a one-line reason.
#[derive(Clone, Debug)]
pub struct Failure {
    /// 4xx when the request asked for something impossible, else 500.
    pub status: u16,
    /// What went wrong.
    pub message: String,
}

impl From<GenerateError> for Failure {
    fn from(e: GenerateError) -> Self {
        let status = match e {
            GenerateError::TooLarge { .. } => 413,
            GenerateError::Size { .. }
            | GenerateError::Guidance(_)
            | GenerateError::NothingToDo
            | GenerateError::NonFiniteEmbedding(_)
            | GenerateError::Text(_)
            // Steps or a scheduler the model's schedule cannot take.
            | GenerateError::Scheduler(_) => 400,
            _ => 500,
        };
        Failure {
            status,
            message: super::api::chain(&e),
        }
    }
}

/// How requests are grouped.
#[derive(Clone, Copy, Debug)]
pub struct Batching {
    /// Images per UNet batch at most.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others.
    pub wait: Duration,
    /// Requests waiting at most; more are refused.
    pub max_queue: usize,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full.
    Full,
    /// The engine has stopped.
    Stopped,
}

/// The handle requests are queued through.
#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<ImageJob>,
    depth: Arc<AtomicUsize>,
}

impl Engine {
    /// Starts the engine's thread on `generator`. It stops when every
    /// [`Engine`] handle is dropped and the queue is empty.
    pub fn start(
        generator: Generator,
        batching: Batching,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Engine, JoinHandle<()>)> {
        let (tx, rx) = sync_channel(batching.max_queue);
        let depth = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            generator,
            batching,
            metrics,
            rx,
            depth: depth.clone(),
            held: VecDeque::new(),
        };
        let thread = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || worker.run())?;
        Ok((Engine { tx, depth }, thread))
    }

    /// Queues `job`, or refuses it at once when the queue is full.
    pub fn submit(&self, job: ImageJob) -> Result<(), Refused> {
        self.depth.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                Err(match e {
                    TrySendError::Full(_) => Refused::Full,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }

    /// Requests queued and not yet taken into a batch.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::SeqCst)
    }
}

/// What makes two requests fit one batch.
#[derive(Clone, Copy, PartialEq)]
struct Key {
    height: usize,
    width: usize,
    steps: usize,
    scheduler: Option<crate::pipeline::schedulers::SchedulerKind>,
    guidance: u64,
    alone: bool,
}

struct Worker {
    generator: Generator,
    batching: Batching,
    metrics: Arc<Metrics>,
    rx: Receiver<ImageJob>,
    depth: Arc<AtomicUsize>,
    /// Requests taken from the queue that did not fit the batch being made.
    held: VecDeque<ImageJob>,
}

impl Worker {
    fn run(mut self) {
        while let Some(first) = self.next(None) {
            let key = self.key(&first);
            let mut batch = vec![first];
            if !key.alone {
                self.gather(key, &mut batch);
            }
            // Requests whose client is gone (timed out) are not drawn.
            batch.retain(|j| !j.reply.is_closed());
            if batch.is_empty() {
                continue;
            }
            self.metrics.batch(batch.len());
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| self.draw(&batch)))
                .unwrap_or_else(|_| {
                    tracing::error!("the engine panicked drawing a batch");
                    (0..batch.len())
                        .map(|_| {
                            Err(Failure {
                                status: 500,
                                message: "internal error while drawing the image".into(),
                            })
                        })
                        .collect()
                });
            for (job, result) in batch.into_iter().zip(outcome) {
                let _ = job.reply.send(result);
            }
        }
    }

    /// The next request: a held one first, then the queue's, waiting until
    /// `deadline` (for ever when `None`); `None` when none came.
    fn next(&mut self, deadline: Option<Instant>) -> Option<ImageJob> {
        if deadline.is_none()
            && let Some(job) = self.held.pop_front()
        {
            return Some(job);
        }
        let job = match deadline {
            None => self.rx.recv().ok()?,
            Some(d) => match self
                .rx
                .recv_timeout(d.saturating_duration_since(Instant::now()))
            {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            },
        };
        self.depth.fetch_sub(1, Ordering::SeqCst);
        Some(job)
    }

    /// Fills `batch` with held and newly queued requests of the same key,
    /// until it is full or the wait is over.
    fn gather(&mut self, key: Key, batch: &mut Vec<ImageJob>) {
        let max = self.batching.max_batch;
        let mut kept = VecDeque::new();
        while let Some(job) = self.held.pop_front() {
            if batch.len() < max && self.key(&job) == key {
                batch.push(job);
            } else {
                kept.push_back(job);
            }
        }
        self.held = kept;
        let deadline = Instant::now() + self.batching.wait;
        while batch.len() < max {
            let Some(job) = self.next(Some(deadline)) else {
                break;
            };
            if self.key(&job) == key {
                batch.push(job);
            } else {
                self.held.push_back(job);
            }
        }
    }

    fn key(&self, job: &ImageJob) -> Key {
        let p = &job.params;
        let scheduler = self.generator.scheduler_kind(p).ok();
        Key {
            height: p.height,
            width: p.width,
            steps: p.steps,
            scheduler,
            guidance: p.guidance.to_bits(),
            alone: scheduler.is_none_or(|k| k.draws_noise()),
        }
    }

    /// Every request's image, in order.
    fn draw(&mut self, batch: &[ImageJob]) -> Vec<Result<Drawn, Failure>> {
        let mut embedded = Vec::new();
        let mut results: Vec<Option<Result<Drawn, Failure>>> = Vec::new();
        for job in batch {
            self.generator.set_operator(job.operator.as_ref());
            let emb = self
                .generator
                .embed(&job.prompt, &job.params.negative_prompt);
            self.generator.set_operator(None);
            match emb {
                Ok(e) => {
                    embedded.push((results.len(), e));
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e.into()))),
            }
        }
        let params = match embedded.first() {
            Some((i, _)) => batch[*i].params.clone(),
            None => return results.into_iter().flatten().collect(),
        };
        let started = Instant::now();
        let mut calls = 0;
        let mut progress = |done: usize, _: usize| calls = done;
        let drawn = if embedded.len() == 1 {
            // Alone: exactly `generate`'s path, latents and noise from the seed.
            self.generator
                .generate(&embedded[0].1, &params, &mut progress)
        } else {
            let f = self.generator.model.vae_factor;
            let shape = [1, 4, params.height / f, params.width / f];
            let latents: Vec<ArrayD<f32>> = embedded
                .iter()
                .map(|(i, _)| Rng::new(batch[*i].params.seed).randn(&shape))
                .collect();
            let items: Vec<_> = embedded
                .iter()
                .zip(&latents)
                .filter_map(|((_, e), l)| Some((e, l.view().into_dimensionality().ok()?)))
                .collect();
            self.generator.generate_each(&items, &params, &mut progress)
        };
        if calls > 0 {
            self.metrics
                .steps(calls, started.elapsed().as_secs_f64() / calls as f64);
        }
        match drawn {
            Ok(images) => {
                for (k, (i, _)) in embedded.iter().enumerate() {
                    results[*i] = Some(self.drawn(&batch[*i], &images, k));
                }
            }
            Err(e) => {
                let failure = Failure::from(e);
                for (i, _) in &embedded {
                    results[*i] = Some(Err(failure.clone()));
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Failure {
                        status: 500,
                        message: "not drawn".into(),
                    })
                })
            })
            .collect()
    }

    /// Image `k` of `images`, for `job`, with its PNG text.
    fn drawn(&self, job: &ImageJob, images: &Images, k: usize) -> Result<Drawn, Failure> {
        let flagged = images.flagged.get(k).copied().unwrap_or(false);
        let metas: Vec<&OperatorMeta> = job.metas.iter().collect();
        let text = ImageText::of(
            &self.generator,
            &self.generator.model.root,
            &job.params,
            &metas,
        )?
        .chunks(&job.prompt, &job.params, 0, flagged);
        Ok(Drawn {
            pixels: images.pixels.index_axis(Axis(0), k).to_owned(),
            text,
        })
    }
}
