//! One generation's state, as a small state machine: text → denoising → decode → done, failed
//! or cancelled.
//!
//! A [`Job`] owns everything that belongs to one generation — its validated request (token ids,
//! placeholder index), concept, text embeddings, its own scheduler, latents, step counter, trace,
//! timings and progress channel — and nothing that belongs to the model. The engine
//! ([`crate::engine`]) moves jobs through their states; the batcher ([`crate::batch`]) lets the
//! rows of many jobs share one UNet call. A job only ever sees its own rows of a call, so its
//! result does not depend on which other jobs it was batched with.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use ndarray::{s, Array2, Array3, Array4, ArrayView4, Axis};

use crate::attention_maps::{AttentionMaps, MapAccumulator};
use crate::batch::{LatentSize, PendingRows, UnetRow};
use crate::concept::Concept;
use crate::error::{Error, Result};
use crate::guidance::{combine, CfgMode, RowKind};
use crate::request::ValidRequest;
use crate::scheduler::Scheduler;

/// Identifies a job within one engine (assigned in admission order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job {}", self.0)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting for its prompt to be encoded.
    Text,
    /// In the denoising loop.
    Denoising,
    /// Denoised; waiting for the VAE decode.
    Decoding,
    /// Images decoded.
    Done,
    Failed,
    Cancelled,
}

/// The stages a job's time is accounted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// From submission to the start of its text encoding.
    Queue,
    Text,
    /// From its first denoising step to its last.
    Denoise,
    Decode,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::Queue, Stage::Text, Stage::Denoise, Stage::Decode];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Text => "encode text",
            Stage::Denoise => "denoise",
            Stage::Decode => "decode",
        }
    }
}

/// Wall-clock time of one job, per stage, plus its denoising steps and the time it spent inside
/// UNet calls (`batch`): denoising wall time minus `batch` is time spent waiting for calls of
/// other sizes or other jobs' guidance and scheduler steps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobTimings {
    pub stages: BTreeMap<Stage, Duration>,
    /// One entry per denoising step (bounded by the step count): from the end of the previous
    /// step to this step's scheduler step (its UNet calls, and waits for calls of other jobs).
    pub steps: Vec<Duration>,
    /// Sum of the durations of the UNet calls that held rows of this job.
    pub batch: Duration,
    /// Number of UNet calls that held rows of this job.
    pub unet_calls: usize,
}

impl JobTimings {
    fn add(&mut self, stage: Stage, time: Duration) {
        *self.stages.entry(stage).or_default() += time;
    }

    pub fn get(&self, stage: Stage) -> Duration {
        self.stages.get(&stage).copied().unwrap_or_default()
    }
}

/// Intermediate values of one generation, for parity tests and debugging.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub input_ids: Vec<i64>,
    pub placeholder_index: usize,
    /// `[1, 77, C_txt]` each.
    pub text_cond: Option<Array3<f32>>,
    pub text_uncond: Option<Array3<f32>>,
    /// Initial latents, already × init_noise_sigma.
    pub init_latents: Option<Array4<f32>>,
    /// Latents after step k (1-based), for the requested steps and the last one.
    pub latents: BTreeMap<usize, Array4<f32>>,
}

/// Progress of a job, as sent to its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEvent {
    /// Its prompt was encoded; denoising starts.
    Started { steps: usize },
    /// A denoising step finished (`step` is 1-based).
    Step { step: usize, steps: usize },
    /// Denoising finished; the VAE decode is next.
    Decoding,
}

/// Where a job's progress goes. A listener that has gone away cancels the job at its next step
/// boundary (as text-generation-inference drops a request whose response channel is closed).
pub trait JobEvents: Send {
    /// Delivers an event; false when nobody listens any more.
    fn send(&mut self, event: JobEvent) -> bool;

    /// True when nobody listens any more (checked before each UNet call).
    fn is_closed(&self) -> bool {
        false
    }
}

impl JobEvents for std::sync::mpsc::Sender<JobEvent> {
    fn send(&mut self, event: JobEvent) -> bool {
        std::sync::mpsc::Sender::send(self, event).is_ok()
    }
}

impl<F: FnMut(JobEvent) + Send> JobEvents for F {
    fn send(&mut self, event: JobEvent) -> bool {
        self(event);
        true
    }
}

/// Cancels a job from another thread (a deadline, a shutdown): the job stops at its next step
/// boundary and its rows leave the batch.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> CancelToken {
        CancelToken::default()
    }

    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Box<Generation>),
    Failed(Error),
    Cancelled,
}

/// A finished job's result.
pub struct Generation {
    pub images: Vec<RgbImage>,
    pub trace: Trace,
    /// The attention maps averaged over the requested steps (when the request asked).
    pub attention_maps: Option<AttentionMaps>,
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generation")
            .field("images", &self.images.len())
            .finish_non_exhaustive()
    }
}

/// A job that left the engine, with its timings.
#[derive(Debug)]
pub struct FinishedJob {
    pub id: JobId,
    pub outcome: Outcome,
    pub timings: JobTimings,
}

/// The conditional text embeddings of a job and the unconditional ones (shared by all jobs).
#[derive(Debug, Clone)]
pub struct TextEmbeddings {
    /// `[77, C_txt]`.
    pub cond: Array2<f32>,
    /// `[77, C_txt]`.
    pub uncond: Arc<Array2<f32>>,
}

/// One generation in flight.
pub struct Job {
    id: JobId,
    request: ValidRequest,
    concept: Arc<Concept>,
    cfg: CfgMode,
    state: JobState,
    text: Option<TextEmbeddings>,
    scheduler: Box<dyn Scheduler>,
    /// `[n, 4, h, w]`: the current latents.
    latents: Array4<f32>,
    /// The current step's UNet input (`latents` scaled by the scheduler).
    model_input: Array4<f32>,
    /// `[2n, 4, h, w]`: the current step's noise predictions, conditional rows first.
    noise_pred: Array4<f32>,
    /// Rows of the current step already computed (`0..next_row`).
    next_row: usize,
    /// Completed denoising steps.
    step: usize,
    /// Run in UNet calls of its own (set after a shared call failed).
    solo: bool,
    /// Sums of the conditional rows' attention maps (when the request asked for them).
    maps: Option<MapAccumulator>,
    trace: Trace,
    timings: JobTimings,
    events: Option<Box<dyn JobEvents>>,
    cancel: CancelToken,
    images: Vec<RgbImage>,
    /// When the current stage (or, while queued, the job) started.
    stage_start: Instant,
    step_start: Option<Instant>,
}

impl fmt::Debug for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

impl Job {
    /// A job in the [`JobState::Text`] state. `latents` are the initial latents, already ×
    /// the scheduler's init_noise_sigma.
    pub(crate) fn new(
        id: JobId,
        request: ValidRequest,
        concept: Arc<Concept>,
        cfg: CfgMode,
        scheduler: Box<dyn Scheduler>,
        latents: Array4<f32>,
    ) -> Job {
        let n = latents.dim().0;
        let trace = Trace {
            input_ids: request.input_ids().to_vec(),
            placeholder_index: request.placeholder_index(),
            init_latents: Some(latents.clone()),
            ..Trace::default()
        };
        let (_, c, h, w) = latents.dim();
        let maps = request
            .attention_map_steps()
            .map(|window| MapAccumulator::new(n, request.input_ids().len(), (h, w), window));
        Job {
            id,
            concept,
            cfg,
            state: JobState::Text,
            text: None,
            scheduler,
            model_input: Array4::zeros((n, c, h, w)),
            noise_pred: Array4::zeros((2 * n, c, h, w)),
            latents,
            next_row: 0,
            step: 0,
            solo: false,
            maps,
            trace,
            timings: JobTimings::default(),
            events: None,
            cancel: CancelToken::new(),
            images: Vec::new(),
            stage_start: Instant::now(),
            step_start: None,
            request,
        }
    }

    pub fn id(&self) -> JobId {
        self.id
    }

    pub fn state(&self) -> JobState {
        self.state
    }

    pub fn request(&self) -> &ValidRequest {
        &self.request
    }

    /// Completed denoising steps.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    pub fn steps(&self) -> usize {
        self.scheduler.num_steps()
    }

    pub fn latent_size(&self) -> LatentSize {
        let (_, _, height, width) = self.latents.dim();
        LatentSize { height, width }
    }

    /// Whether the job asked for attention maps.
    pub fn wants_attention_maps(&self) -> bool {
        self.maps.is_some()
    }

    /// Images of the job (`n`).
    pub fn images(&self) -> usize {
        self.latents.dim().0
    }

    /// Progress goes to `events`; when it stops listening the job is cancelled.
    pub fn with_events(mut self, events: Box<dyn JobEvents>) -> Job {
        self.events = Some(events);
        self
    }

    /// The job stops at its next step boundary once `cancel` is cancelled.
    pub fn with_cancel(mut self, cancel: CancelToken) -> Job {
        self.cancel = cancel;
        self
    }

    /// How the job's guidance rows may share calls (default: the engine's).
    pub fn with_cfg(mut self, cfg: CfgMode) -> Job {
        self.cfg = cfg;
        self
    }

    /// Replaces the initial latents (`[n, 4, h, w]`, already × init_noise_sigma); for parity
    /// tests that start from a reference's latents.
    pub fn with_initial_latents(mut self, latents: Array4<f32>) -> Result<Job> {
        if latents.shape() != self.latents.shape() {
            return Err(crate::error::invalid(
                "init_latents",
                format!(
                    "shape {:?}, expected {:?}",
                    latents.shape(),
                    self.latents.shape()
                ),
            ));
        }
        self.trace.init_latents = Some(latents.clone());
        self.latents = latents;
        Ok(self)
    }

    /// Skips the text state with given embeddings (`[77, C]` each); for parity tests that
    /// start from a reference's text embeddings.
    pub fn with_text(mut self, cond: Array2<f32>, uncond: Array2<f32>) -> Job {
        self.start_denoising(TextEmbeddings {
            cond,
            uncond: Arc::new(uncond),
        });
        self
    }

    /// The job's cancellation token (cancel it from anywhere).
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Whether the job should stop: cancelled, or nobody listens any more.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled() || self.events.as_ref().is_some_and(|e| e.is_closed())
    }

    pub(crate) fn concept(&self) -> &Concept {
        &self.concept
    }

    /// The text state ends: `text` holds the prompt's embeddings; denoising starts.
    pub(crate) fn start_denoising(&mut self, text: TextEmbeddings) {
        self.trace.text_cond = Some(text.cond.clone().insert_axis(Axis(0)));
        self.trace.text_uncond = Some(text.uncond.as_ref().clone().insert_axis(Axis(0)));
        self.text = Some(text);
        self.state = JobState::Denoising;
        self.stage_start = Instant::now();
        let steps = self.steps();
        self.notify(JobEvent::Started { steps });
        self.begin_step();
    }

    /// Accounts the time since submission as queue time and the text encoding's duration.
    pub(crate) fn record_text_time(&mut self, queued_until: Instant, text: Duration) {
        let queued = queued_until.saturating_duration_since(self.stage_start);
        self.timings.add(Stage::Queue, queued);
        self.timings.add(Stage::Text, text);
    }

    /// The rows of the current step that still need a UNet call.
    pub(crate) fn pending(&self) -> Option<PendingRows> {
        let total = 2 * self.images();
        (self.state == JobState::Denoising && self.next_row < total).then(|| PendingRows {
            job: self.id,
            size: self.latent_size(),
            rows: self.next_row..total,
            images: self.images(),
            cfg: self.cfg,
            solo: self.solo,
        })
    }

    /// Every UNet input of one row of the current step.
    pub(crate) fn row(&self, row: usize) -> Option<UnetRow<'_>> {
        let text = self.text.as_ref()?;
        let n = self.images();
        let kind = RowKind::of_row(row, n);
        Some(UnetRow {
            sample: self.model_input.index_axis(Axis(0), row % n),
            timestep: *self.scheduler.timesteps().get(self.step)?,
            text: match kind {
                RowKind::Conditional => text.cond.view(),
                RowKind::Unconditional => text.uncond.view(),
            },
            local: self.concept.local_embeddings.view(),
            local_index: self.request.placeholder_index() as i64,
            lambda: match kind {
                RowKind::Conditional => self.request.lambda(),
                RowKind::Unconditional => 0.0,
            },
            want_maps: kind == RowKind::Conditional && self.wants_maps_now(),
        })
    }

    /// Whether this job accumulates the current step's attention maps.
    fn wants_maps_now(&self) -> bool {
        self.maps.as_ref().is_some_and(|m| m.wants(self.step + 1))
    }

    /// Takes the attention maps of rows `rows` of the current step (`tokens` `[R, T, h, w]`,
    /// `gate` `[R, 1, h, w]`), before [`Job::accept`] takes their noise predictions. Only the
    /// conditional rows inside the job's step window are accumulated; others are ignored (the
    /// graph computes maps for every row of a call that any row asked for).
    pub(crate) fn accept_maps(
        &mut self,
        rows: Range<usize>,
        tokens: ArrayView4<f32>,
        gate: ArrayView4<f32>,
    ) -> Result<()> {
        if !self.wants_maps_now() {
            return Ok(());
        }
        if rows.start != self.next_row || rows.len() != tokens.dim().0 || rows.len() != gate.dim().0
        {
            return Err(Error::Internal(format!(
                "{}: maps of rows {rows:?} delivered, row {} expected",
                self.id, self.next_row
            )));
        }
        let n = self.images();
        let Some(maps) = self.maps.as_mut() else {
            return Ok(());
        };
        for (i, row) in rows.enumerate().filter(|(_, row)| *row < n) {
            maps.add(
                row,
                tokens.index_axis(Axis(0), i),
                gate.index_axis(Axis(0), i),
            )
            .map_err(|e| Error::BadOutput {
                graph: "unet.onnx",
                tensor: "attention_maps",
                message: format!("in the rows of {}: {e}", self.id),
            })?;
        }
        Ok(())
    }

    /// Makes the job run in calls of its own from now on.
    pub(crate) fn isolate(&mut self) {
        self.solo = true;
    }

    /// Takes the noise predictions of rows `rows` (which must be the next uncomputed ones) from
    /// a UNet call that took `call_time`; when they complete the step, applies guidance and the
    /// scheduler step. Non-finite predictions fail the job (and only this job).
    pub(crate) fn accept(
        &mut self,
        rows: Range<usize>,
        noise_pred: ArrayView4<f32>,
        call_time: Duration,
    ) -> Result<()> {
        if rows.start != self.next_row || rows.len() != noise_pred.dim().0 {
            return Err(Error::Internal(format!(
                "{}: rows {rows:?} delivered, row {} expected",
                self.id, self.next_row
            )));
        }
        if noise_pred.iter().any(|v| !v.is_finite()) {
            return Err(Error::BadOutput {
                graph: "unet.onnx",
                tensor: "noise_pred",
                message: format!(
                    "contains NaN or infinity in the rows of {} (check its concept and initial \
                     latents)",
                    self.id
                ),
            });
        }
        self.noise_pred
            .slice_mut(s![rows.clone(), .., .., ..])
            .assign(&noise_pred);
        self.next_row = rows.end;
        self.timings.batch += call_time;
        self.timings.unet_calls += 1;
        if self.next_row == 2 * self.images() {
            self.finish_step()?;
        }
        Ok(())
    }

    /// Guidance, the scheduler step, the trace and the progress event of the current step.
    fn finish_step(&mut self) -> Result<()> {
        let n = self.images();
        let mut guided = Array4::zeros(self.latents.raw_dim());
        for i in 0..n {
            combine(
                self.noise_pred.index_axis(Axis(0), i),
                self.noise_pred.index_axis(Axis(0), n + i),
                self.request.guidance(),
                guided.index_axis_mut(Axis(0), i),
            );
        }
        let (Some(eps), Some(sample)) = (guided.as_slice(), self.latents.as_slice_mut()) else {
            return Err(Error::Internal("latents are not contiguous".into()));
        };
        self.scheduler.step(self.step, eps, sample)?;
        if let Some(start) = self.step_start.take() {
            self.timings.steps.push(start.elapsed());
        }
        self.step += 1;
        let (done, steps) = (self.step, self.steps());
        if self.request.record_steps().contains(&done) || done == steps {
            self.trace.latents.insert(done, self.latents.clone());
        }
        self.notify(JobEvent::Step { step: done, steps });
        if done == steps {
            self.timings.add(Stage::Denoise, self.stage_start.elapsed());
            self.state = JobState::Decoding;
            self.stage_start = Instant::now();
            self.notify(JobEvent::Decoding);
        } else {
            self.begin_step();
        }
        Ok(())
    }

    /// The current step's UNet input: the latents scaled by the scheduler. The step's time
    /// runs from here to its scheduler step: its UNet calls and any wait for calls of others.
    fn begin_step(&mut self) {
        self.step_start = Some(Instant::now());
        self.model_input.assign(&self.latents);
        if let Some(x) = self.model_input.as_slice_mut() {
            self.scheduler.scale_model_input(self.step, x);
        }
        self.next_row = 0;
    }

    /// The final latents (`[n, 4, h, w]`, not yet divided by the VAE scaling factor).
    pub(crate) fn latents(&self) -> &Array4<f32> {
        &self.latents
    }

    /// Images decoded so far.
    pub(crate) fn decoded(&self) -> usize {
        self.images.len()
    }

    /// Appends decoded images; the job is done once all are there.
    pub(crate) fn add_images(&mut self, images: Vec<RgbImage>, time: Duration) {
        self.images.extend(images);
        self.timings.add(Stage::Decode, time);
        if self.images.len() >= self.images() {
            self.state = JobState::Done;
        }
    }

    fn notify(&mut self, event: JobEvent) {
        if let Some(events) = &mut self.events {
            if !events.send(event) {
                self.cancel.cancel();
            }
        }
    }

    /// Ends the job; `error` None means done (if all images are decoded) or cancelled.
    pub(crate) fn finish(self, error: Option<Error>) -> FinishedJob {
        let maps = match (&error, self.state, &self.maps) {
            (None, JobState::Done, Some(acc)) => Some(acc.finish()),
            _ => None,
        }
        .transpose();
        let outcome = match (error, self.state, maps) {
            (Some(e), _, _) => Outcome::Failed(e),
            (None, JobState::Done, Err(e)) => {
                Outcome::Failed(Error::Internal(format!("{}: {e}", self.id)))
            }
            (None, JobState::Done, Ok(attention_maps)) => Outcome::Done(Box::new(Generation {
                images: self.images,
                trace: self.trace,
                attention_maps,
            })),
            (None, _, _) => Outcome::Cancelled,
        };
        FinishedJob {
            id: self.id,
            outcome,
            timings: self.timings,
        }
    }
}
