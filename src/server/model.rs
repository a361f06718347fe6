//! The model thread: the one owner of the engine. HTTP handlers send it commands; it admits
//! them between ticks, runs one batched step per tick, and answers every job over the job's own
//! channel. A job whose channel is closed (its client went away) is cancelled by the engine at
//! its next step boundary; its rows leave the batch and the others go on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{Array1, Array2};
use tokio::sync::{mpsc, oneshot};

use super::{ServerConfig, ServerError};
use crate::attention_maps::AttentionMaps;
use crate::concept::{Concept, ConceptSource};
use crate::engine::{Engine, EngineStats, Work};
use crate::error::Error;
use crate::job::{
    CancelToken, FinishedJob, JobEvent, JobEvents, JobId, JobTimings, Outcome, Stage,
};
use crate::request::{ValidRequest, Validator};
use crate::sessions::{MemoryPolicy, Phase};

/// What a job's requester hears, in order: its place in the queue, the start, each step, then
/// exactly one of done / failed / cancelled.
#[derive(Debug)]
pub enum Update {
    Queued {
        position: usize,
    },
    Started {
        steps: usize,
    },
    Step {
        step: usize,
        steps: usize,
    },
    Done {
        images: Vec<RgbImage>,
        /// When the request asked for them.
        attention_maps: Option<AttentionMaps>,
        timings: JobTimings,
    },
    Failed(Error),
    Cancelled,
}

/// A validated generation for the model thread.
pub struct GenerateJob {
    pub request: ValidRequest,
    pub concept: Arc<Concept>,
    pub updates: mpsc::UnboundedSender<Update>,
    pub cancel: CancelToken,
}

/// An image (and mask) to encode into a concept.
pub struct EncodeJob {
    pub image: Vec<u8>,
    pub image_name: String,
    pub mask: Option<Vec<u8>>,
    pub mask_name: String,
    pub reply: oneshot::Sender<Result<Concept, Error>>,
}

enum Command {
    Generate(Box<GenerateJob>),
    Encode(EncodeJob),
    Shutdown,
}

/// How handlers reach the model thread.
#[derive(Clone)]
pub struct ModelHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl ModelHandle {
    /// Queues a job; false when the model thread is gone.
    pub fn generate(&self, job: GenerateJob) -> bool {
        self.tx.send(Command::Generate(Box::new(job))).is_ok()
    }

    /// Encodes a concept on the model thread (between two ticks).
    pub async fn encode(
        &self,
        image: Vec<u8>,
        image_name: String,
        mask: Option<Vec<u8>>,
        mask_name: String,
    ) -> Result<Concept, Error> {
        let (reply, answer) = oneshot::channel();
        let job = EncodeJob {
            image,
            image_name,
            mask,
            mask_name,
            reply,
        };
        if self.tx.send(Command::Encode(job)).is_err() {
            return Err(Error::Cancelled);
        }
        answer.await.unwrap_or(Err(Error::Cancelled))
    }

    /// Stops the model thread after its current tick (jobs left are cancelled).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// What the HTTP side learns of the model once it is loaded.
pub struct ModelInfo {
    pub validator: Validator,
    /// Whether the bundle's UNet can give attention maps (bundles exported before them cannot).
    pub attention_maps: bool,
}

/// Opens the engine on a thread of its own, loads and warms up every session, and returns once
/// it is ready (with a validator for the HTTP side).
pub async fn spawn(config: &ServerConfig) -> Result<(ModelHandle, ModelInfo), ServerError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let bundle = config.bundle.clone();
    let engine_config = crate::engine::EngineConfig {
        memory: MemoryPolicy::Resident,
        ..config.engine.clone()
    };
    std::thread::Builder::new()
        .name("elite-model".into())
        .spawn(move || {
            let mut engine = match open_and_warm_up(&bundle, &engine_config) {
                Ok(engine) => engine,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let info = engine
                .supports_attention_maps()
                .map(|attention_maps| ModelInfo {
                    validator: engine.validator(),
                    attention_maps,
                });
            let failed = info.is_err();
            let _ = ready_tx.send(info);
            if failed {
                return;
            }
            ModelLoop::new(engine, rx).run();
        })
        .map_err(ServerError::Io)?;
    let info = ready_rx
        .await
        .map_err(|_| ServerError::Startup("the model thread stopped while loading".into()))??;
    Ok((ModelHandle { tx }, info))
}

/// Every session created, then one tiny generation (64², one step) so that the first request
/// does not pay for ONNX Runtime's first-run allocations.
fn open_and_warm_up(
    bundle: &std::path::Path,
    config: &crate::engine::EngineConfig,
) -> Result<Engine, Error> {
    let start = Instant::now();
    let mut engine = Engine::open(bundle, config)?;
    engine.preload(&[Phase::Concept, Phase::Text, Phase::Denoise, Phase::Decode])?;
    let loaded = start.elapsed();
    let dims = *engine.bundle().dims();
    let concept = Concept {
        word_embeddings: Array2::zeros((5, dims.text_hidden)),
        local_embeddings: Array2::zeros((dims.patch_grid * dims.patch_grid, dims.text_hidden)),
        mask_grid: Array1::zeros(dims.patch_grid * dims.patch_grid),
        source: ConceptSource::default(),
    };
    let placeholder = engine.bundle().defaults().placeholder.clone();
    let mut request = engine
        .validator()
        .request(format!("a photo of {placeholder}"));
    request.steps = 1;
    request.height = dims.size_multiple;
    request.width = dims.size_multiple;
    let request = engine.validate(request)?;
    let job = engine.new_job(request, Arc::new(concept))?;
    engine.submit(job);
    engine.run_until_idle(&|| false);
    for finished in engine.take_finished() {
        if let Outcome::Failed(e) = finished.outcome {
            return Err(e);
        }
    }
    tracing::info!(
        load_seconds = loaded.as_secs_f64(),
        warm_up_seconds = (start.elapsed() - loaded).as_secs_f64(),
        "sessions loaded and warmed up"
    );
    Ok(engine)
}

/// Progress of one job, forwarded to its requester; a closed channel cancels the job.
struct Forward(mpsc::UnboundedSender<Update>);

impl JobEvents for Forward {
    fn send(&mut self, event: JobEvent) -> bool {
        let update = match event {
            JobEvent::Started { steps } => Update::Started { steps },
            JobEvent::Step { step, steps } => Update::Step { step, steps },
            JobEvent::Decoding => return !self.0.is_closed(),
        };
        self.0.send(update).is_ok()
    }

    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

struct Listener {
    updates: mpsc::UnboundedSender<Update>,
    submitted: Instant,
}

struct ModelLoop {
    engine: Engine,
    rx: mpsc::UnboundedReceiver<Command>,
    listeners: HashMap<JobId, Listener>,
    last: EngineStats,
}

impl ModelLoop {
    fn new(engine: Engine, rx: mpsc::UnboundedReceiver<Command>) -> ModelLoop {
        let last = engine.stats().clone();
        ModelLoop {
            engine,
            rx,
            listeners: HashMap::new(),
            last,
        }
    }

    fn run(mut self) {
        loop {
            // Idle: sleep until a command comes.
            if self.engine.active() == 0 {
                match self.rx.blocking_recv() {
                    Some(command) => {
                        if !self.handle(command) {
                            return;
                        }
                    }
                    None => return,
                }
            }
            // Admit everything that arrived during the last tick: jobs join at a step boundary.
            while let Ok(command) = self.rx.try_recv() {
                if !self.handle(command) {
                    self.engine.cancel_all();
                    self.engine.run_until_idle(&|| false);
                    self.answer_finished();
                    return;
                }
            }
            let work = self.engine.tick();
            self.record(&work);
            self.answer_finished();
        }
    }

    /// Handles one command; false for shutdown.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::Generate(job) => self.admit(*job),
            Command::Encode(job) => {
                let mask = job.mask.as_deref().map(|m| (m, job.mask_name.as_str()));
                let result = self
                    .engine
                    .encode_concept_bytes(&job.image, &job.image_name, mask);
                let _ = job.reply.send(result);
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn admit(&mut self, job: GenerateJob) {
        let position = self.engine.active();
        let updates = job.updates.clone();
        let created = self.engine.new_job(job.request, job.concept).map(|j| {
            j.with_events(Box::new(Forward(job.updates.clone())))
                .with_cancel(job.cancel)
        });
        match created {
            Ok(j) => {
                let id = self.engine.submit(j);
                let _ = updates.send(Update::Queued { position });
                self.listeners.insert(
                    id,
                    Listener {
                        updates,
                        submitted: Instant::now(),
                    },
                );
            }
            Err(e) => {
                let _ = updates.send(Update::Failed(e));
            }
        }
        metrics::gauge!("elite_active_jobs").set(self.engine.active() as f64);
    }

    fn record(&mut self, work: &Work) {
        let stats = self.engine.stats();
        if let Work::Unet { rows, .. } = work {
            metrics::histogram!("elite_unet_batch_rows").record(*rows as f64);
            let took = stats.unet_time.saturating_sub(self.last.unet_time);
            if took > Duration::ZERO {
                metrics::histogram!("elite_unet_call_seconds").record(took.as_secs_f64());
            }
        }
        self.last = stats.clone();
        metrics::gauge!("elite_active_jobs").set(self.engine.active() as f64);
        metrics::gauge!("elite_active_rows").set(self.engine.active_rows() as f64);
    }

    fn answer_finished(&mut self) {
        for finished in self.engine.take_finished() {
            self.answer(finished);
        }
    }

    fn answer(&mut self, finished: FinishedJob) {
        let Some(listener) = self.listeners.remove(&finished.id) else {
            return;
        };
        for stage in Stage::ALL {
            metrics::histogram!("elite_job_stage_seconds", "stage" => stage.name())
                .record(finished.timings.get(stage).as_secs_f64());
        }
        metrics::histogram!("elite_job_seconds").record(listener.submitted.elapsed().as_secs_f64());
        let (outcome, update) = match finished.outcome {
            Outcome::Done(generation) => (
                "done",
                Update::Done {
                    images: generation.images,
                    attention_maps: generation.attention_maps,
                    timings: finished.timings,
                },
            ),
            Outcome::Failed(e) => {
                tracing::warn!(job = finished.id.0, error = %e, "job failed");
                ("failed", Update::Failed(e))
            }
            Outcome::Cancelled => ("cancelled", Update::Cancelled),
        };
        metrics::counter!("elite_jobs_total", "outcome" => outcome).increment(1);
        let _ = listener.updates.send(update);
    }
}
