//! An estimate of the memory a run needs, checked against what the machine has before any
//! model runs, so that `-n 64` at 4096² fails in milliseconds with a message instead of an
//! abort (or the OOM killer) an hour later.
//!
//! The estimate is deliberately simple and on the high side: the weights of the largest phase
//! (or of every graph for a server, which keeps all sessions), the run's own buffers (latents,
//! noise predictions, decoded images), and the activations of the largest UNet call and VAE
//! decode, from per-pixel costs measured on the full-size model (SD v1-4 widths, fp32, ONNX
//! Runtime's CPU arena; `bench/RESULTS.md`: one extra UNet row at 512² costs ~170 MiB, a
//! 512² VAE decode ~1.2 GiB) and scaled to smaller models by the square root of their graph
//! size (activations grow with the channel count, weights with its square).

use std::path::Path;

use crate::bundle::Bundle;
use crate::graphs::Graph;
use crate::request::ValidRequest;
use crate::sessions::{MemoryPolicy, Phase};

/// Peak activation bytes per latent pixel per UNet row, full-size SD v1-4 in fp32 (170 MiB per
/// row at a 64×64 latent, measured).
const UNET_BYTES_PER_LATENT_PIXEL: f64 = 170.0 * 1024.0 * 1024.0 / 4096.0;
/// Peak activation bytes per output pixel per decoded image, full-size VAE decoder in fp32
/// (~1.2 GiB at 512², measured).
const VAE_BYTES_PER_PIXEL: f64 = 1.2 * 1024.0 * 1024.0 * 1024.0 / 262_144.0;
/// The full-size graphs' sizes the costs above were measured with (fp32).
const FULL_UNET_BYTES: f64 = 3.44e9;
const FULL_VAE_BYTES: f64 = 1.98e8;

/// What the run needs, by part, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    pub parts: Vec<(&'static str, u64)>,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|(_, b)| b).sum()
    }
}

/// How the run will use memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunShape {
    pub max_batch: usize,
    pub decode_batch: usize,
    pub policy: MemoryPolicy,
    /// The sessions are loaded already (a server): their weights are in the process's memory
    /// and not in what is still available.
    pub weights_loaded: bool,
}

/// The sizes the estimate needs of a bundle: each graph's bytes (with its external data) and
/// the VAE's upsampling factor.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSizes {
    pub graph_bytes: Vec<(Graph, u64)>,
    pub vae_scale_factor: usize,
}

impl ModelSizes {
    pub fn of(bundle: &Bundle) -> ModelSizes {
        let files = &bundle.manifest().files;
        let bytes = |graph: Graph| {
            let name = graph.file_name();
            let main = files.get(name).map_or(0, |e| e.bytes);
            main + files.get(&format!("{name}.data")).map_or(0, |e| e.bytes)
        };
        ModelSizes {
            graph_bytes: Graph::ALL.iter().map(|&g| (g, bytes(g))).collect(),
            vae_scale_factor: bundle.dims().vae_scale_factor,
        }
    }

    fn bytes(&self, graph: Graph) -> u64 {
        self.graph_bytes
            .iter()
            .find(|(g, _)| *g == graph)
            .map_or(0, |(_, b)| *b)
    }
}

/// `sqrt(graph / full-size graph)`, at most 1 (a model larger than SD v1-4 is counted as
/// SD v1-4: the estimate is for refusing absurd requests, not for planning).
fn scale(bytes: u64, full: f64) -> f64 {
    (bytes as f64 / full).sqrt().min(1.0)
}

/// Estimates the memory of running `requests` together.
pub fn estimate(bundle: &Bundle, requests: &[&ValidRequest], run: RunShape) -> MemoryEstimate {
    let shapes: Vec<[usize; 4]> = requests.iter().map(|r| r.latent_shape()).collect();
    estimate_shapes(&ModelSizes::of(bundle), &shapes, run)
}

/// [`estimate`] for jobs of these latent shapes (`[n, 4, h, w]` each).
pub fn estimate_shapes(sizes: &ModelSizes, jobs: &[[usize; 4]], run: RunShape) -> MemoryEstimate {
    let weights: u64 = match run.policy {
        _ if run.weights_loaded => 0,
        MemoryPolicy::Resident => Graph::ALL.iter().map(|&g| sizes.bytes(g)).sum(),
        MemoryPolicy::LowPeak => [Phase::Concept, Phase::Text, Phase::Denoise, Phase::Decode]
            .iter()
            .map(|p| p.graphs().iter().map(|&g| sizes.bytes(g)).sum::<u64>())
            .max()
            .unwrap_or(0),
    };
    let factor = sizes.vae_scale_factor as u64;
    let mut buffers = 0u64;
    let mut unet = 0f64;
    let mut vae = 0f64;
    let unet_scale = scale(sizes.bytes(Graph::Unet), FULL_UNET_BYTES);
    let vae_scale = scale(sizes.bytes(Graph::VaeDecoder), FULL_VAE_BYTES);
    for shape in jobs {
        let [n, c, h, w] = shape.map(|v| v as u64);
        let latent = n * c * h * w * 4;
        // latents, the scaled model input, the 2n noise predictions, the guided prediction and
        // the trace's copies (initial, recorded steps, last): about eight latent-sized buffers.
        buffers += 8 * latent;
        let pixels = h * w * factor * factor;
        // Decoded images (RGB8) wait for the output transaction.
        buffers += n * pixels * 3;
        let rows = (2 * n as usize).min(run.max_batch) as f64;
        unet = unet.max(rows * (h * w) as f64 * UNET_BYTES_PER_LATENT_PIXEL * unet_scale);
        let decode = run.decode_batch.min(n as usize) as f64;
        vae = vae.max(decode * pixels as f64 * VAE_BYTES_PER_PIXEL * vae_scale);
    }
    // The UNet and the VAE do not hold their activations at the same time (one call at a time).
    let activations = unet.max(vae) as u64;
    MemoryEstimate {
        parts: vec![
            ("weights", weights),
            ("activations of the largest graph call", activations),
            ("latents and images", buffers),
        ],
    }
}

/// Bytes the process can still use: `MemAvailable`, or less under a cgroup memory limit.
pub fn available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        * 1024;
    Some(cgroup_room().map_or(mem, |room| room.min(mem)))
}

/// Room left under the cgroup v2 limit of this process, when there is one.
fn cgroup_room() -> Option<u64> {
    let read = |name: &str| std::fs::read_to_string(Path::new("/sys/fs/cgroup").join(name)).ok();
    let max = read("memory.max")?.trim().parse::<u64>().ok()?; // "max" → no limit
    let current = read("memory.current")?.trim().parse::<u64>().ok()?;
    Some(max.saturating_sub(current))
}

/// An invalid request when the estimate exceeds what is available (no check where the
/// available memory cannot be read).
pub fn check(estimate: &MemoryEstimate) -> Result<(), crate::error::Error> {
    let Some(available) = available() else {
        return Ok(());
    };
    let total = estimate.total();
    if total <= available {
        return Ok(());
    }
    let parts: Vec<String> = estimate
        .parts
        .iter()
        .map(|(name, bytes)| format!("{name} {}", gib(*bytes)))
        .collect();
    Err(crate::error::invalid(
        "num_images",
        format!(
            "the run needs an estimated {} ({}), more than the {} this machine has available; \
             ask for fewer images, a smaller size, or a smaller --max-batch",
            gib(total),
            parts.join(", "),
            gib(available)
        ),
    ))
}

/// GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SD v1-4 / CLIP-L / ELITE at fp32, as the full-size export writes them.
    fn full() -> ModelSizes {
        ModelSizes {
            graph_bytes: vec![
                (Graph::ImageEncoder, 1_220_000_000),
                (Graph::GlobalMapper, 190_000_000),
                (Graph::LocalMapper, 190_000_000),
                (Graph::TextEncoder, 492_000_000),
                (Graph::Unet, 3_440_000_000),
                (Graph::VaeDecoder, 198_000_000),
            ],
            vae_scale_factor: 8,
        }
    }

    const CLI: RunShape = RunShape {
        max_batch: 8,
        decode_batch: 1,
        policy: MemoryPolicy::LowPeak,
        weights_loaded: false,
    };

    #[test]
    fn an_ordinary_run_fits_and_a_huge_one_does_not() {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let one = estimate_shapes(&full(), &[[1, 4, 64, 64]], CLI);
        // Measured on this model: peak RSS 3.70 GiB for one 512² image (bench/RESULTS.md).
        let total = gib(one.total());
        assert!((3.0..6.0).contains(&total), "512², one image: {total} GiB");
        let huge = estimate_shapes(&full(), &[[64, 4, 512, 512]], CLI);
        assert!(gib(huge.total()) > 64.0, "{:?}", huge);
        // The rows per call are capped by max_batch: more images add buffers, not activations.
        let eight = estimate_shapes(&full(), &[[8, 4, 64, 64]], CLI);
        let sixteen = estimate_shapes(&full(), &[[16, 4, 64, 64]], CLI);
        assert_eq!(eight.parts[1], sixteen.parts[1]);
        assert!(sixteen.parts[2].1 > eight.parts[2].1);
    }

    #[test]
    fn a_server_counts_its_loaded_weights_once() {
        let run = RunShape {
            weights_loaded: true,
            policy: MemoryPolicy::Resident,
            ..CLI
        };
        assert_eq!(
            estimate_shapes(&full(), &[[1, 4, 64, 64]], run).parts[0].1,
            0
        );
        let resident = RunShape {
            weights_loaded: false,
            ..run
        };
        let low = estimate_shapes(&full(), &[[1, 4, 64, 64]], CLI).parts[0].1;
        let all = estimate_shapes(&full(), &[[1, 4, 64, 64]], resident).parts[0].1;
        assert!(
            all > low,
            "resident weights are all graphs, low-peak only the largest phase"
        );
    }

    #[test]
    fn smaller_models_need_less_per_pixel() {
        let mut tiny = full();
        for (_, b) in &mut tiny.graph_bytes {
            *b /= 1000;
        }
        let big = estimate_shapes(&full(), &[[1, 4, 128, 128]], CLI).parts[1].1;
        let small = estimate_shapes(&tiny, &[[1, 4, 128, 128]], CLI).parts[1].1;
        assert!(small * 20 < big, "{small} vs {big}");
    }
}
