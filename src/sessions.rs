//! The engine's ONNX Runtime sessions: created lazily, one per graph, under one memory policy,
//! and the helpers every graph call goes through (borrowed inputs, checked outputs).
//!
//! All session policy lives here: which per-graph options a session gets (graph cache, weight
//! pre-packing, TensorRT profile and engine cache, all derived from the user's
//! [`ExecutionConfig`]), when sessions are created and when they are released. A server keeps
//! every session resident; the CLI releases each phase's graphs once the run has moved past that
//! phase, which keeps its peak memory at the largest phase instead of the sum.
//!
//! Sessions that are created together ([`SessionSet::preload`]) are created in parallel, the
//! largest graph first: creating a session is mostly single-threaded work inside ONNX Runtime
//! (reading the graph, packing weights and, above all for the UNet, planning its buffers:
//! 1.6–2.0 s of a full-size later start on one core; bench/RESULTS.md), so the other graphs
//! load on the cores that would otherwise wait.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ndarray::{Array, ArrayView, ArrayViewD, Dimension};
use ort::session::{Session, SessionInputValue, SessionOutputs};
use ort::value::{PrimitiveTensorElementType, Tensor, TensorRef};

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::graphs::{check_session, Graph, ShapeRange};
use crate::runtime::{
    create_session_with, Device, ExecutionConfig, OrtEnv, Precision, SessionOptions,
};

/// When sessions are released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryPolicy {
    /// Keep every session once created (a server: no reload between requests).
    Resident,
    /// Release the graphs of a phase once the run moves to a later phase (the CLI: the concept
    /// graphs before denoising, the text encoder and UNet before the VAE decode; full-size
    /// bundle at 512²: peak RSS 7.2 → 6.0 GB).
    #[default]
    LowPeak,
}

/// The phases of generation, in order, each with the graphs it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Concept,
    Text,
    Denoise,
    Decode,
}

impl Phase {
    pub fn graphs(self) -> &'static [Graph] {
        match self {
            Phase::Concept => &[Graph::ImageEncoder, Graph::GlobalMapper, Graph::LocalMapper],
            Phase::Text => &[Graph::TextEncoder],
            Phase::Denoise => &[Graph::Unet],
            Phase::Decode => &[Graph::VaeDecoder],
        }
    }

    fn of(graph: Graph) -> Phase {
        match graph {
            Graph::ImageEncoder | Graph::GlobalMapper | Graph::LocalMapper => Phase::Concept,
            Graph::TextEncoder => Phase::Text,
            Graph::Unet => Phase::Denoise,
            Graph::VaeDecoder => Phase::Decode,
        }
    }
}

/// Where the session set keeps what it caches, and the shapes TensorRT engines are built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub execution: ExecutionConfig,
    /// Optimised CPU graphs (see [`crate::cache`]); None: no graph cache.
    pub graph_cache: Option<PathBuf>,
    /// TensorRT engines and timing caches; None: none kept.
    pub trt_cache: Option<PathBuf>,
    pub policy: MemoryPolicy,
    /// Largest batch of any graph call (the engine's `max_batch`).
    pub max_batch: usize,
    /// Largest latent side (`max_side / vae_scale_factor`).
    pub max_latent: usize,
}

/// The sessions of one bundle.
pub struct SessionSet {
    env: &'static OrtEnv,
    bundle: Bundle,
    config: SessionConfig,
    sessions: HashMap<Graph, Session>,
    /// Time spent creating each graph's sessions (summed over reloads; graphs created in
    /// parallel overlap).
    loads: BTreeMap<Graph, Duration>,
    /// Wall time spent creating sessions, all graphs together.
    loading: Duration,
}

impl SessionSet {
    pub fn new(env: &'static OrtEnv, bundle: Bundle, config: SessionConfig) -> SessionSet {
        SessionSet {
            env,
            bundle,
            config,
            sessions: HashMap::new(),
            loads: BTreeMap::new(),
            loading: Duration::ZERO,
        }
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Time spent creating each graph's sessions (those created together overlap).
    pub fn load_times(&self) -> &BTreeMap<Graph, Duration> {
        &self.loads
    }

    /// Wall time spent creating sessions, all graphs together.
    pub fn loading_time(&self) -> Duration {
        self.loading
    }

    /// Creates (once) and returns the session of a graph, its signature checked.
    pub fn get(&mut self, graph: Graph) -> Result<&mut Session> {
        if !self.sessions.contains_key(&graph) {
            let start = Instant::now();
            let session = self.create(graph);
            let took = start.elapsed();
            self.loading += took;
            self.insert(graph, session, took)?;
        }
        self.sessions
            .get_mut(&graph)
            .ok_or_else(|| Error::Internal(format!("{graph} session vanished")))
    }

    fn insert(&mut self, graph: Graph, session: Result<Session>, took: Duration) -> Result<()> {
        *self.loads.entry(graph).or_default() += took;
        self.sessions.insert(graph, session?);
        Ok(())
    }

    fn create(&self, graph: Graph) -> Result<Session> {
        let content_id = self.bundle.content_id(graph);
        let options = self.options(graph, content_id.as_deref());
        let session = create_session_with(
            self.env,
            &self.bundle.graph_path(graph),
            content_id.as_deref(),
            &self.config.execution,
            &options,
        )?;
        check_session(graph.spec(), &session, self.bundle.dims())?;
        Ok(session)
    }

    /// The per-graph options: weight pre-packing as [`prepacks`] says; TensorRT gets one
    /// profile spanning every batch and size the engine accepts, and an engine cache per graph
    /// contents (none for a graph whose contents are unknown).
    fn options(&self, graph: Graph, content_id: Option<&str>) -> SessionOptions {
        let dims = self.bundle.dims();
        let c = &self.config;
        let trt_profile = (c.execution.device == Device::TensorRt).then(|| {
            let max_batch = c.max_batch.max(2);
            let min_latent = (dims.size_multiple / dims.vae_scale_factor).max(1);
            let opt_latent =
                (dims.image_size * 2 / dims.vae_scale_factor).clamp(min_latent, c.max_latent);
            graph.spec().trt_profile(
                &ShapeRange {
                    batch: [1, 2, max_batch],
                    latent: [min_latent, opt_latent, c.max_latent.max(min_latent)],
                },
                dims,
            )
        });
        let trt_cache_dir = match (&c.trt_cache, content_id) {
            (Some(base), Some(id)) => Some(crate::cache::tensorrt_cache_dir(
                base,
                id,
                c.execution.trt_fp16,
                trt_profile.as_ref(),
            )),
            _ => None,
        };
        SessionOptions {
            graph_cache: c.graph_cache.clone(),
            no_prepacking: !prepacks(graph, c.policy),
            memory_pattern: false,
            trt_profile,
            trt_cache_dir,
            openvino_bf16: matches!(graph, Graph::Unet | Graph::VaeDecoder)
                && c.execution.precision == Precision::Bf16,
        }
    }

    /// Creates every session of the given graphs now (so that their load time is not counted
    /// in a later stage, and a provider that cannot load fails before any work), in parallel
    /// on up to one thread per core, the largest graph first so that it does not start last.
    /// Graphs that fail to load are reported by the first of them in `graphs`' order, whatever
    /// order the threads finished in; the others are kept.
    pub fn preload(&mut self, graphs: &[Graph]) -> Result<()> {
        let mut missing: Vec<Graph> = Vec::new();
        for &graph in graphs {
            if !self.sessions.contains_key(&graph) && !missing.contains(&graph) {
                missing.push(graph);
            }
        }
        let start = Instant::now();
        let created = self.create_all(&missing);
        self.loading += start.elapsed();
        let mut first_error = None;
        for (graph, session, took) in created {
            if let Err(e) = self.insert(graph, session, took) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Creates the sessions of `graphs` on worker threads; results in `graphs`' order.
    fn create_all(&self, graphs: &[Graph]) -> Vec<(Graph, Result<Session>, Duration)> {
        let timed = |graph: Graph| {
            let start = Instant::now();
            let session = self.create(graph);
            (graph, session, start.elapsed())
        };
        let workers = thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(graphs.len());
        if workers <= 1 {
            return graphs.iter().map(|&g| timed(g)).collect();
        }
        let mut by_size: Vec<Graph> = graphs.to_vec();
        by_size.sort_by_key(|&g| std::cmp::Reverse(self.bundle.graph_bytes(g)));
        let next = AtomicUsize::new(0);
        let mut done: Vec<(Graph, Result<Session>, Duration)> = thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        while let Some(&graph) = by_size.get(next.fetch_add(1, Ordering::Relaxed)) {
                            mine.push(timed(graph));
                        }
                        mine
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        // A worker that panicked (a bug in ONNX Runtime's bindings, not bad input) lost its
        // graphs: they are reported as not created rather than silently missing.
        for &graph in graphs {
            if !done.iter().any(|(g, _, _)| *g == graph) {
                let lost = Err(Error::Internal(format!(
                    "creating the {graph} session panicked"
                )));
                done.push((graph, lost, Duration::ZERO));
            }
        }
        done.sort_by_key(|(g, _, _)| graphs.iter().position(|x| x == g));
        done
    }

    /// The run moves to `phase`: under [`MemoryPolicy::LowPeak`], the sessions of earlier
    /// phases are released.
    pub fn enter(&mut self, phase: Phase) {
        if self.config.policy == MemoryPolicy::LowPeak {
            self.sessions.retain(|&graph, _| Phase::of(graph) >= phase);
        }
    }

    /// Runs a graph and returns its one f32 output, checked for rank and finiteness.
    pub fn run<D: Dimension>(
        &mut self,
        graph: Graph,
        inputs: Vec<Input<'_>>,
        output: &'static str,
    ) -> Result<Array<f32, D>> {
        let session = self.get(graph)?;
        let outputs = session.run(inputs).map_err(ort_err(graph, "run"))?;
        output_array::<D>(&outputs, graph, output)
    }
}

/// Whether a graph's session pre-packs its weights. Packing costs load time and repays it per
/// call: the UNet runs once per step, so it is always packed. CLIP vision and the text encoder
/// run once per image; the CLI ([`MemoryPolicy::LowPeak`], one run) leaves them unpacked,
/// while resident sessions (a server: once per upload or request, for the life of the process)
/// pack them — created in parallel, beside the UNet's packing (full size: upload 1.40 → 1.17 s,
/// text 0.111 → 0.075 s; bench/RESULTS.md). The mappers and the VAE decoder are never packed:
/// the mappers' GEMMs have a handful of rows, for which ONNX Runtime's packed kernel rounds
/// differently from the unpacked one (a server would no longer give the CLI's pictures
/// exactly) and saves nothing measurable, and the decoder's convolutions gain nothing.
fn prepacks(graph: Graph, policy: MemoryPolicy) -> bool {
    match graph {
        Graph::Unet => true,
        Graph::ImageEncoder | Graph::TextEncoder => policy == MemoryPolicy::Resident,
        Graph::GlobalMapper | Graph::LocalMapper | Graph::VaeDecoder => false,
    }
}

/// One named graph input, borrowed from an ndarray (no copy).
pub type Input<'a> = (&'static str, SessionInputValue<'a>);

/// A borrowed graph input.
pub fn input<'a, T, D>(
    graph: Graph,
    name: &'static str,
    array: ArrayView<'a, T, D>,
) -> Result<Input<'a>>
where
    T: PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static,
    D: Dimension + 'static,
{
    let tensor = TensorRef::from_array_view(array).map_err(ort_err(graph, "input"))?;
    Ok((name, tensor.into()))
}

/// An owned ONNX Runtime value, for an `IoBinding` (which keeps it for later calls).
pub fn owned<T, A>(graph: Graph, array: A) -> Result<ort::value::DynValue>
where
    T: PrimitiveTensorElementType + std::fmt::Debug,
    A: ort::value::OwnedTensorArrayData<T>,
{
    Ok(Tensor::from_array(array)
        .map_err(ort_err(graph, "input"))?
        .into_dyn())
}

/// Maps an ONNX Runtime error of `action` on `graph`.
pub fn ort_err(graph: Graph, action: &'static str) -> impl FnOnce(ort::Error) -> Error {
    move |source| Error::Inference {
        graph: graph.file_name(),
        action,
        source,
    }
}

/// Output `tensor` of a graph run as an owned f32 array of the expected rank, checked finite.
pub fn output_array<D: Dimension>(
    outputs: &SessionOutputs<'_>,
    graph: Graph,
    tensor: &'static str,
) -> Result<Array<f32, D>> {
    let view = output_view(outputs, graph, tensor)?;
    if view.iter().any(|v| !v.is_finite()) {
        return Err(bad_output(graph, tensor, "contains NaN or infinity".into()));
    }
    view.to_owned()
        .into_dimensionality::<D>()
        .map_err(|e| bad_output(graph, tensor, e.to_string()))
}

/// Output `tensor` of a graph run as a view (finiteness not checked: a batched call checks it
/// per job, so that one job's NaN fails only that job).
pub fn output_view<'a>(
    outputs: &'a SessionOutputs<'_>,
    graph: Graph,
    tensor: &'static str,
) -> Result<ArrayViewD<'a, f32>> {
    outputs
        .get(tensor)
        .ok_or_else(|| bad_output(graph, tensor, "is missing".into()))?
        .try_extract_array::<f32>()
        .map_err(|e| bad_output(graph, tensor, e.to_string()))
}

pub fn bad_output(graph: Graph, tensor: &'static str, message: String) -> Error {
    Error::BadOutput {
        graph: graph.file_name(),
        tensor,
        message,
    }
}
