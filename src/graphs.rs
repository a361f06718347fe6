//! One IO descriptor per ONNX graph (names, element types, ranks) from DESIGN.md, and the check of a loaded session against it.
//!
//! The table here is the Rust side of DESIGN.md §2's graph table: everything that feeds or
//! reads a graph takes tensor names from these specs rather than spelling them again.

use std::fmt;

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use crate::bundle::Dims;

/// Element type of a graph input or output (the contract allows only these two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    Float32,
    Int64,
}

impl ElemType {
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Float32 => "f32",
            Self::Int64 => "i64",
        }
    }

    fn matches(self, found: TensorElementType) -> bool {
        matches!(
            (self, found),
            (Self::Float32, TensorElementType::Float32) | (Self::Int64, TensorElementType::Int64)
        )
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// CLIP layers in `image_features` (L24, L4, L8, L12, L16): the manifest's `clip_layers`.
pub const CLIP_LAYERS: usize = 5;

/// One axis of a tensor in the contract. Sizes that a bundle's manifest gives (widths, token
/// counts, the CLIP input side, latent channels) are named here and resolved against its
/// [`Dims`], so that the manifest is the one source of truth for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// Batch `B`: dynamic in every graph.
    Batch,
    /// A size fixed by the contract itself (RGB channels, CLIP layers).
    Fixed(usize),
    /// `C_txt`, the text hidden size (`dims.text_hidden` in the manifest).
    TextHidden,
    /// `C_img`, the image hidden size (`dims.image_hidden`).
    ImageHidden,
    /// Text tokens per prompt (`dims.max_tokens`, 77).
    Tokens,
    /// Local embedding tokens, one per CLIP patch (`dims.patch_grid²`, 256).
    Patches,
    /// CLIP vision tokens: class token and patches (`dims.patch_grid² + 1`, 257).
    ImageTokens,
    /// Side of the square CLIP input (`dims.image_size`, 224).
    ImageSide,
    /// Latent channels (`dims.latent_channels`, 4).
    LatentChannels,
    /// Latent height `h` (dynamic).
    LatentHeight,
    /// Latent width `w` (dynamic).
    LatentWidth,
    /// Image height `8h` (dynamic).
    ImageHeight,
    /// Image width `8w` (dynamic).
    ImageWidth,
}

impl Dim {
    /// The size this axis must have for a bundle of `dims`; None for dynamic axes.
    pub fn resolve(self, dims: &Dims) -> Option<usize> {
        match self {
            Self::Fixed(n) => Some(n),
            Self::TextHidden => Some(dims.text_hidden),
            Self::ImageHidden => Some(dims.image_hidden),
            Self::Tokens => Some(dims.max_tokens),
            Self::Patches => Some(dims.patches()),
            Self::ImageTokens => Some(dims.image_tokens()),
            Self::ImageSide => Some(dims.image_size),
            Self::LatentChannels => Some(dims.latent_channels),
            Self::Batch
            | Self::LatentHeight
            | Self::LatentWidth
            | Self::ImageHeight
            | Self::ImageWidth => None,
        }
    }

    /// The manifest field this axis comes from, for messages; None for the contract's own.
    pub fn manifest_field(self) -> Option<&'static str> {
        match self {
            Self::TextHidden => Some("dims.text_hidden"),
            Self::ImageHidden => Some("dims.image_hidden"),
            Self::Tokens => Some("dims.max_tokens"),
            Self::Patches => Some("dims.patch_grid²"),
            Self::ImageTokens => Some("dims.patch_grid² + 1"),
            Self::ImageSide => Some("dims.image_size"),
            Self::LatentChannels => Some("dims.latent_channels"),
            Self::ImageHeight | Self::ImageWidth => Some("dims.vae_scale_factor"),
            _ => None,
        }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Batch => f.write_str("B"),
            Self::Fixed(n) => write!(f, "{n}"),
            Self::TextHidden => f.write_str("C_txt"),
            Self::ImageHidden => f.write_str("C_img"),
            Self::Tokens => f.write_str("T"),
            Self::Patches => f.write_str("P"),
            Self::ImageTokens => f.write_str("P+1"),
            Self::ImageSide => f.write_str("S"),
            Self::LatentChannels => f.write_str("C_lat"),
            Self::LatentHeight => f.write_str("h"),
            Self::LatentWidth => f.write_str("w"),
            Self::ImageHeight => f.write_str("8h"),
            Self::ImageWidth => f.write_str("8w"),
        }
    }
}

/// One input or output of a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: &'static str,
    pub elem: ElemType,
    pub dims: &'static [Dim],
}

impl TensorSpec {
    pub fn rank(&self) -> usize {
        self.dims.len()
    }

    /// The shape this tensor has in a call at batch `batch` on latents of `latent` = (h, w) for
    /// a bundle of `dims` (image side = latent side × `dims.vae_scale_factor`): e.g. the VAE
    /// decoder's `sample` is `[B, 3, 8h, 8w]`.
    pub fn shape_for(&self, dims: &Dims, batch: usize, latent: (usize, usize)) -> Vec<usize> {
        self.dims
            .iter()
            .map(|d| match d {
                Dim::Batch => batch,
                Dim::LatentHeight => latent.0,
                Dim::LatentWidth => latent.1,
                Dim::ImageHeight => latent.0.saturating_mul(dims.vae_scale_factor),
                Dim::ImageWidth => latent.1.saturating_mul(dims.vae_scale_factor),
                fixed => fixed.resolve(dims).unwrap_or_default(),
            })
            .collect()
    }
}

/// Shape in the contract's notation with the manifest's sizes filled in, e.g. `[B,4,h,w]`.
struct ShapeText<'a>(&'static [Dim], &'a Dims);

impl fmt::Display for ShapeText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match d.resolve(self.1) {
                Some(n) => write!(f, "{n}")?,
                None => write!(f, "{d}")?,
            }
        }
        f.write_str("]")
    }
}

/// The IO descriptor of one graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphSpec {
    /// Graph name as in DESIGN.md (`unet`).
    pub name: &'static str,
    /// File name inside a bundle (`unet.onnx`).
    pub file: &'static str,
    pub inputs: &'static [TensorSpec],
    pub outputs: &'static [TensorSpec],
}

impl GraphSpec {
    pub fn input(&self, name: &str) -> Option<&'static TensorSpec> {
        self.inputs.iter().find(|t| t.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&'static TensorSpec> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// The six graphs of a bundle, in pipeline order.
/// A TensorRT optimisation profile: `input:d0xd1x…` lists (comma-separated) of the smallest,
/// typical and largest shapes a graph is built for. With one, TensorRT builds a single engine
/// for the whole range instead of one per shape seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrtProfile {
    pub min: String,
    pub opt: String,
    pub max: String,
}

/// The sizes a [`TrtProfile`] spans: batch and latent side, each as (min, opt, max); every
/// other size comes from the bundle's [`Dims`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeRange {
    pub batch: [usize; 3],
    pub latent: [usize; 3],
}

impl GraphSpec {
    /// The profile of this graph's inputs over `range` for a bundle of `dims` (image side =
    /// latent side × `dims.vae_scale_factor`).
    pub fn trt_profile(&self, range: &ShapeRange, dims: &Dims) -> TrtProfile {
        let shapes = |i: usize| {
            self.inputs
                .iter()
                .map(|t| {
                    let sizes: Vec<String> = t
                        .dims
                        .iter()
                        .map(|d| match d {
                            Dim::Batch => range.batch[i],
                            Dim::LatentHeight | Dim::LatentWidth => range.latent[i],
                            Dim::ImageHeight | Dim::ImageWidth => {
                                range.latent[i] * dims.vae_scale_factor
                            }
                            fixed => fixed.resolve(dims).unwrap_or_default(),
                        })
                        .map(|n| n.to_string())
                        .collect();
                    format!("{}:{}", t.name, sizes.join("x"))
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        TrtProfile {
            min: shapes(0),
            opt: shapes(1),
            max: shapes(2),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Graph {
    ImageEncoder,
    GlobalMapper,
    LocalMapper,
    TextEncoder,
    Unet,
    VaeDecoder,
}

impl Graph {
    pub const ALL: [Graph; 6] = [
        Graph::ImageEncoder,
        Graph::GlobalMapper,
        Graph::LocalMapper,
        Graph::TextEncoder,
        Graph::Unet,
        Graph::VaeDecoder,
    ];

    pub fn spec(self) -> &'static GraphSpec {
        match self {
            Self::ImageEncoder => &IMAGE_ENCODER,
            Self::GlobalMapper => &GLOBAL_MAPPER,
            Self::LocalMapper => &LOCAL_MAPPER,
            Self::TextEncoder => &TEXT_ENCODER,
            Self::Unet => &UNET,
            Self::VaeDecoder => &VAE_DECODER,
        }
    }

    pub fn name(self) -> &'static str {
        self.spec().name
    }

    pub fn file_name(self) -> &'static str {
        self.spec().file
    }
}

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

use Dim::{
    Batch, Fixed, ImageHeight, ImageHidden, ImageSide, ImageTokens, ImageWidth, LatentChannels,
    LatentHeight, LatentWidth, Patches, TextHidden, Tokens,
};
use ElemType::{Float32, Int64};

const fn t(name: &'static str, elem: ElemType, dims: &'static [Dim]) -> TensorSpec {
    TensorSpec { name, elem, dims }
}

/// `[B,5,257,C_img]`: layers L24, L4, L8, L12, L16; CLS + 16x16 patches.
const IMAGE_FEATURES: &[Dim] = &[Batch, Fixed(CLIP_LAYERS), ImageTokens, ImageHidden];
const LATENT: &[Dim] = &[Batch, LatentChannels, LatentHeight, LatentWidth];

pub static IMAGE_ENCODER: GraphSpec = GraphSpec {
    name: "image_encoder",
    file: "image_encoder.onnx",
    inputs: &[t(
        "pixel_values",
        Float32,
        &[Batch, Fixed(3), ImageSide, ImageSide],
    )],
    outputs: &[t("image_features", Float32, IMAGE_FEATURES)],
};

pub static GLOBAL_MAPPER: GraphSpec = GraphSpec {
    name: "global_mapper",
    file: "global_mapper.onnx",
    inputs: &[t("image_features", Float32, IMAGE_FEATURES)],
    outputs: &[t(
        "word_embeddings",
        Float32,
        &[Batch, Fixed(CLIP_LAYERS), TextHidden],
    )],
};

pub static LOCAL_MAPPER: GraphSpec = GraphSpec {
    name: "local_mapper",
    file: "local_mapper.onnx",
    inputs: &[
        t("image_features", Float32, IMAGE_FEATURES),
        t("mask", Float32, &[Batch, Patches]),
    ],
    outputs: &[t(
        "local_embeddings",
        Float32,
        &[Batch, Patches, TextHidden],
    )],
};

pub static TEXT_ENCODER: GraphSpec = GraphSpec {
    name: "text_encoder",
    file: "text_encoder.onnx",
    inputs: &[
        t("input_ids", Int64, &[Batch, Tokens]),
        t("inj_embedding", Float32, &[Batch, TextHidden]),
        t("inj_index", Int64, &[Batch]),
    ],
    outputs: &[t(
        "last_hidden_state",
        Float32,
        &[Batch, Tokens, TextHidden],
    )],
};

pub static UNET: GraphSpec = GraphSpec {
    name: "unet",
    file: "unet.onnx",
    inputs: &[
        t("sample", Float32, LATENT),
        t("timestep", Float32, &[Batch]),
        t(
            "encoder_hidden_states",
            Float32,
            &[Batch, Tokens, TextHidden],
        ),
        t("local_embeddings", Float32, &[Batch, Patches, TextHidden]),
        t("local_index", Int64, &[Batch]),
        t("local_lambda", Float32, &[Batch]),
    ],
    outputs: &[t("noise_pred", Float32, LATENT)],
};

pub static VAE_DECODER: GraphSpec = GraphSpec {
    name: "vae_decoder",
    file: "vae_decoder.onnx",
    inputs: &[t("latent_sample", Float32, LATENT)],
    outputs: &[t(
        "sample",
        Float32,
        &[Batch, Fixed(3), ImageHeight, ImageWidth],
    )],
};

/// Input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Input => "input",
            Self::Output => "output",
        })
    }
}

/// One way a session differs from its [`GraphSpec`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureProblem {
    Missing {
        direction: Direction,
        name: &'static str,
        expected: String,
    },
    Unexpected {
        direction: Direction,
        name: String,
        found: String,
    },
    Mismatch {
        direction: Direction,
        name: &'static str,
        expected: String,
        found: String,
    },
}

impl fmt::Display for SignatureProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing {
                direction,
                name,
                expected,
            } => write!(f, "missing {direction} `{name}` (expected {expected})"),
            Self::Unexpected {
                direction,
                name,
                found,
            } => write!(
                f,
                "unexpected {direction} `{name}` ({found}), not in the graph table"
            ),
            Self::Mismatch {
                direction,
                name,
                expected,
                found,
            } => write!(f, "{direction} `{name}` expected {expected}, found {found}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The session's inputs/outputs do not match the contract; every difference is listed.
    #[error("{file}: {}", ProblemList(.problems))]
    Signature {
        file: &'static str,
        problems: Vec<SignatureProblem>,
    },
    /// A graph's output has another shape than the contract and the manifest give for the call.
    #[error("{file}: output `{tensor}` has shape {found:?}, expected {expected:?}{origin}")]
    OutputShape {
        file: &'static str,
        tensor: &'static str,
        found: Vec<usize>,
        expected: Vec<usize>,
        /// The manifest fields of the axes that differ, e.g. ` (the manifest's
        /// dims.vae_scale_factor)`; empty when none.
        origin: String,
    },
}

/// Checks the shape of output `tensor` of `spec` after a call at batch `batch` on latents of
/// (h, w) = `latent` (see [`TensorSpec::shape_for`]). Sizes a graph leaves dynamic, such as the
/// VAE decoder's image side, can only be checked here: a manifest `vae_scale_factor` that
/// disagrees with the decoder is named instead of surfacing as a wrong-sized image.
pub fn check_output_shape(
    spec: &GraphSpec,
    tensor: &'static str,
    found: &[usize],
    dims: &Dims,
    batch: usize,
    latent: (usize, usize),
) -> Result<(), GraphError> {
    let Some(t) = spec.output(tensor) else {
        return Ok(());
    };
    let expected = t.shape_for(dims, batch, latent);
    if found == expected.as_slice() {
        return Ok(());
    }
    let mut fields: Vec<&str> = t
        .dims
        .iter()
        .enumerate()
        .filter(|(i, _)| found.get(*i) != expected.get(*i))
        .filter_map(|(_, d)| d.manifest_field())
        .collect();
    fields.dedup();
    let origin = if fields.is_empty() {
        String::new()
    } else {
        format!(" (the manifest's {})", fields.join(", "))
    };
    Err(GraphError::OutputShape {
        file: spec.file,
        tensor: t.name,
        found: found.to_vec(),
        expected,
        origin,
    })
}

struct ProblemList<'a>(&'a [SignatureProblem]);

impl fmt::Display for ProblemList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

fn elem_short_name(ty: TensorElementType) -> String {
    let name = match ty {
        TensorElementType::Float32 => "f32",
        TensorElementType::Float16 => "f16",
        TensorElementType::Float64 => "f64",
        TensorElementType::Bfloat16 => "bf16",
        TensorElementType::Int64 => "i64",
        TensorElementType::Int32 => "i32",
        TensorElementType::Int16 => "i16",
        TensorElementType::Int8 => "i8",
        TensorElementType::Uint64 => "u64",
        TensorElementType::Uint32 => "u32",
        TensorElementType::Uint16 => "u16",
        TensorElementType::Uint8 => "u8",
        TensorElementType::Bool => "bool",
        TensorElementType::String => "string",
        other => return format!("{other:?}"),
    };
    name.to_string()
}

fn describe_expected(spec: &TensorSpec) -> String {
    format!("{} rank {}", spec.elem, spec.rank())
}

/// Compares one tensor of the session with its spec: the element type and rank always, and
/// every size the contract or the manifest's `dims` fixes where the graph declares a concrete
/// size. A size that disagrees with the manifest names the manifest field.
fn compare(
    direction: Direction,
    spec: &TensorSpec,
    found: &ValueType,
    dims: &Dims,
) -> Option<SignatureProblem> {
    let mismatch = |found: String| {
        Some(SignatureProblem::Mismatch {
            direction,
            name: spec.name,
            expected: describe_expected(spec),
            found,
        })
    };
    let ValueType::Tensor { ty, shape, .. } = found else {
        return mismatch(format!("a non-tensor value ({found})"));
    };
    if !spec.elem.matches(*ty) || shape.len() != spec.rank() {
        return mismatch(format!("{} rank {}", elem_short_name(*ty), shape.len()));
    }
    // Axes whose declared concrete size is not the one the contract and manifest fix.
    let wrong: Vec<Dim> = spec
        .dims
        .iter()
        .zip(shape.iter())
        .filter(|(dim, &size)| match dim.resolve(dims) {
            Some(n) => size >= 0 && usize::try_from(size).ok() != Some(n),
            None => false,
        })
        .map(|(dim, _)| *dim)
        .collect();
    if wrong.is_empty() {
        return None;
    }
    let found_dims: Vec<String> = shape
        .iter()
        .map(|&s| {
            if s < 0 {
                "?".to_string()
            } else {
                s.to_string()
            }
        })
        .collect();
    let mut fields: Vec<&str> = wrong.iter().filter_map(|d| d.manifest_field()).collect();
    fields.dedup();
    let origin = if fields.is_empty() {
        String::new()
    } else {
        format!(" (the manifest's {})", fields.join(", "))
    };
    Some(SignatureProblem::Mismatch {
        direction,
        name: spec.name,
        expected: format!("{} shape {}{origin}", spec.elem, ShapeText(spec.dims, dims)),
        found: format!("{} shape [{}]", elem_short_name(*ty), found_dims.join(",")),
    })
}

fn describe_found(found: &ValueType) -> String {
    match found {
        ValueType::Tensor { ty, shape, .. } => {
            format!("{} rank {}", elem_short_name(*ty), shape.len())
        }
        other => format!("{other}"),
    }
}

/// Checks the names, element types and ranks of a session's inputs and outputs, and the sizes
/// the contract and the bundle's `dims` fix, against `spec`; every difference is reported,
/// naming the graph file, the tensor and what was expected. A manifest whose widths disagree
/// with its graphs is caught here, not as a kernel error in the middle of a run.
pub fn check_session(spec: &GraphSpec, session: &Session, dims: &Dims) -> Result<(), GraphError> {
    let mut problems = Vec::new();
    let sides = [
        (Direction::Input, spec.inputs, session.inputs()),
        (Direction::Output, spec.outputs, session.outputs()),
    ];
    for (direction, wanted, actual) in sides {
        for tensor in wanted {
            match actual.iter().find(|o| o.name() == tensor.name) {
                None => problems.push(SignatureProblem::Missing {
                    direction,
                    name: tensor.name,
                    expected: describe_expected(tensor),
                }),
                Some(outlet) => problems.extend(compare(direction, tensor, outlet.dtype(), dims)),
            }
        }
        for outlet in actual {
            if !wanted.iter().any(|t| t.name == outlet.name()) {
                problems.push(SignatureProblem::Unexpected {
                    direction,
                    name: outlet.name().to_string(),
                    found: describe_found(outlet.dtype()),
                });
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(GraphError::Signature {
            file: spec.file,
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ort::value::{Shape, SymbolicDimensions};

    /// SD v1-4 with CLIP ViT-L/14.
    fn sd14() -> Dims {
        Dims {
            text_hidden: 768,
            image_hidden: 1024,
            image_size: 224,
            patch_grid: 16,
            latent_channels: 4,
            vae_scale_factor: 8,
            size_multiple: 64,
            max_tokens: 77,
        }
    }

    #[test]
    fn trt_profile_lists_every_input_with_its_range() {
        let range = ShapeRange {
            batch: [1, 2, 8],
            latent: [32, 64, 128],
        };
        let p = Graph::Unet.spec().trt_profile(&range, &sd14());
        assert_eq!(
            p.opt,
            "sample:2x4x64x64,timestep:2,encoder_hidden_states:2x77x768,\
             local_embeddings:2x256x768,local_index:2,local_lambda:2"
        );
        assert!(
            p.min.starts_with("sample:1x4x32x32,timestep:1,"),
            "{}",
            p.min
        );
        assert!(p.max.starts_with("sample:8x4x128x128,"), "{}", p.max);
        let p = Graph::ImageEncoder.spec().trt_profile(&range, &sd14());
        assert_eq!(p.max, "pixel_values:8x3x224x224");
        // Every size comes from the manifest: a 336px CLIP with a 24x24 grid.
        let dims = Dims {
            image_size: 336,
            patch_grid: 24,
            ..sd14()
        };
        let p = Graph::LocalMapper.spec().trt_profile(&range, &dims);
        assert_eq!(p.opt, "image_features:2x5x577x1024,mask:2x576");
        let p = Graph::VaeDecoder.spec().trt_profile(&range, &dims);
        assert_eq!(p.max, "latent_sample:8x4x128x128");
    }

    fn tensor(ty: TensorElementType, shape: &[i64]) -> ValueType {
        ValueType::Tensor {
            ty,
            shape: Shape::new(shape.iter().copied()),
            dimension_symbols: SymbolicDimensions::new(shape.iter().map(|_| String::new())),
        }
    }

    #[test]
    fn declared_sizes_are_compared_with_the_manifest() {
        let spec = UNET.input("encoder_hidden_states").unwrap();
        let f32 = TensorElementType::Float32;
        let ok = tensor(f32, &[-1, 77, 768]);
        assert_eq!(compare(Direction::Input, spec, &ok, &sd14()), None);
        // Dynamic axes are accepted whatever the manifest says.
        let dynamic = tensor(f32, &[-1, -1, -1]);
        assert_eq!(compare(Direction::Input, spec, &dynamic, &sd14()), None);
        // A manifest that says 1024 where the graph declares 768.
        let dims = Dims {
            text_hidden: 1024,
            ..sd14()
        };
        let problem = compare(Direction::Input, spec, &ok, &dims).map(|p| p.to_string());
        assert_eq!(
            problem.as_deref(),
            Some(
                "input `encoder_hidden_states` expected f32 shape [B,77,1024] (the manifest's \
                 dims.text_hidden), found f32 shape [?,77,768]"
            )
        );
        let spec = IMAGE_ENCODER.input("pixel_values").unwrap();
        let declared = tensor(f32, &[-1, 3, 224, 224]);
        let dims = Dims {
            image_size: 256,
            ..sd14()
        };
        let problem = compare(Direction::Input, spec, &declared, &dims).map(|p| p.to_string());
        assert!(
            problem
                .as_deref()
                .is_some_and(|p| p.contains("[B,3,256,256] (the manifest's dims.image_size)")),
            "{problem:?}"
        );
    }

    #[test]
    fn specs_are_consistent() {
        for graph in Graph::ALL {
            let spec = graph.spec();
            assert_eq!(spec.file, format!("{}.onnx", spec.name));
            for side in [spec.inputs, spec.outputs] {
                for (i, a) in side.iter().enumerate() {
                    assert!(
                        !side[i + 1..].iter().any(|b| b.name == a.name),
                        "{}",
                        a.name
                    );
                    assert_eq!(
                        a.dims.first(),
                        Some(&Dim::Batch),
                        "{} {}",
                        spec.name,
                        a.name
                    );
                }
            }
        }
        assert_eq!(UNET.input("local_lambda").map(|t| t.rank()), Some(1));
        assert_eq!(VAE_DECODER.output("sample").map(|t| t.elem), Some(Float32));
    }

    #[test]
    fn output_shapes_follow_the_manifest() {
        let dims = sd14();
        let sample = VAE_DECODER.output("sample").unwrap();
        assert_eq!(sample.shape_for(&dims, 2, (64, 48)), [2, 3, 512, 384]);
        let ok = check_output_shape(
            &VAE_DECODER,
            "sample",
            &[2, 3, 512, 384],
            &dims,
            2,
            (64, 48),
        );
        assert!(ok.is_ok());
        // A decoder that upsamples 8x under a manifest that says 16.
        let dims16 = Dims {
            vae_scale_factor: 16,
            ..dims
        };
        let err = check_output_shape(
            &VAE_DECODER,
            "sample",
            &[2, 3, 512, 384],
            &dims16,
            2,
            (64, 48),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "vae_decoder.onnx: output `sample` has shape [2, 3, 512, 384], expected [2, 3, 1024, \
             768] (the manifest's dims.vae_scale_factor)"
        );
        let words = [1, 5, 16];
        let err = check_output_shape(&GLOBAL_MAPPER, "word_embeddings", &words, &dims, 1, (0, 0))
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("expected [1, 5, 768] (the manifest's dims.text_hidden)"),
            "{err}"
        );
    }

    #[test]
    fn problems_read_like_the_contract() {
        let err = GraphError::Signature {
            file: "unet.onnx",
            problems: vec![
                SignatureProblem::Mismatch {
                    direction: Direction::Input,
                    name: "local_lambda",
                    expected: "f32 rank 1".into(),
                    found: "i64 rank 1".into(),
                },
                SignatureProblem::Missing {
                    direction: Direction::Output,
                    name: "noise_pred",
                    expected: "f32 rank 4".into(),
                },
            ],
        };
        assert_eq!(
            err.to_string(),
            "unet.onnx: input `local_lambda` expected f32 rank 1, found i64 rank 1; \
             missing output `noise_pred` (expected f32 rank 4)"
        );
    }
}
