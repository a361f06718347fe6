//! One IO descriptor per ONNX graph (names, element types, ranks) from DESIGN.md, and the check of a loaded session against it.
//!
//! The table here is the Rust side of DESIGN.md §2's graph table: everything that feeds or
//! reads a graph takes tensor names from these specs rather than spelling them again.

use std::fmt;

use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

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

/// One axis of a tensor in the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dim {
    /// Batch `B`: dynamic in every graph.
    Batch,
    /// A size fixed by the contract (checked when the graph declares a concrete size).
    Fixed(usize),
    /// `C_txt`, the text hidden size (`dims.text_hidden` in the manifest).
    TextHidden,
    /// `C_img`, the image hidden size (`dims.image_hidden`).
    ImageHidden,
    /// Latent height `h` (dynamic).
    LatentHeight,
    /// Latent width `w` (dynamic).
    LatentWidth,
    /// Image height `8h` (dynamic).
    ImageHeight,
    /// Image width `8w` (dynamic).
    ImageWidth,
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Batch => f.write_str("B"),
            Self::Fixed(n) => write!(f, "{n}"),
            Self::TextHidden => f.write_str("C_txt"),
            Self::ImageHidden => f.write_str("C_img"),
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
}

/// Shape in the contract's notation, e.g. `[B,4,h,w]`.
struct DimsList(&'static [Dim]);

impl fmt::Display for DimsList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
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

/// The sizes a [`TrtProfile`] spans: batch and latent side, each as (min, opt, max).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeRange {
    pub batch: [usize; 3],
    pub latent: [usize; 3],
    pub text_hidden: usize,
    pub image_hidden: usize,
}

impl GraphSpec {
    /// The profile of this graph's inputs over `range` (latent side × 8 = image side).
    pub fn trt_profile(&self, range: &ShapeRange) -> TrtProfile {
        let shapes = |i: usize| {
            self.inputs
                .iter()
                .map(|t| {
                    let dims: Vec<String> = t
                        .dims
                        .iter()
                        .map(|d| match d {
                            Dim::Batch => range.batch[i],
                            Dim::Fixed(n) => *n,
                            Dim::TextHidden => range.text_hidden,
                            Dim::ImageHidden => range.image_hidden,
                            Dim::LatentHeight | Dim::LatentWidth => range.latent[i],
                            Dim::ImageHeight | Dim::ImageWidth => range.latent[i] * 8,
                        })
                        .map(|n| n.to_string())
                        .collect();
                    format!("{}:{}", t.name, dims.join("x"))
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
    Batch, Fixed, ImageHeight, ImageHidden, ImageWidth, LatentHeight, LatentWidth, TextHidden,
};
use ElemType::{Float32, Int64};

const fn t(name: &'static str, elem: ElemType, dims: &'static [Dim]) -> TensorSpec {
    TensorSpec { name, elem, dims }
}

/// `[B,5,257,C_img]`: layers L24, L4, L8, L12, L16; CLS + 16x16 patches.
const IMAGE_FEATURES: &[Dim] = &[Batch, Fixed(5), Fixed(257), ImageHidden];
const LATENT: &[Dim] = &[Batch, Fixed(4), LatentHeight, LatentWidth];

pub static IMAGE_ENCODER: GraphSpec = GraphSpec {
    name: "image_encoder",
    file: "image_encoder.onnx",
    inputs: &[t(
        "pixel_values",
        Float32,
        &[Batch, Fixed(3), Fixed(224), Fixed(224)],
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
        &[Batch, Fixed(5), TextHidden],
    )],
};

pub static LOCAL_MAPPER: GraphSpec = GraphSpec {
    name: "local_mapper",
    file: "local_mapper.onnx",
    inputs: &[
        t("image_features", Float32, IMAGE_FEATURES),
        t("mask", Float32, &[Batch, Fixed(256)]),
    ],
    outputs: &[t(
        "local_embeddings",
        Float32,
        &[Batch, Fixed(256), TextHidden],
    )],
};

pub static TEXT_ENCODER: GraphSpec = GraphSpec {
    name: "text_encoder",
    file: "text_encoder.onnx",
    inputs: &[
        t("input_ids", Int64, &[Batch, Fixed(77)]),
        t("inj_embedding", Float32, &[Batch, TextHidden]),
        t("inj_index", Int64, &[Batch]),
    ],
    outputs: &[t(
        "last_hidden_state",
        Float32,
        &[Batch, Fixed(77), TextHidden],
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
            &[Batch, Fixed(77), TextHidden],
        ),
        t(
            "local_embeddings",
            Float32,
            &[Batch, Fixed(256), TextHidden],
        ),
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

/// Compares one tensor of the session with its spec; the element type and rank always, and
/// the sizes the contract fixes where the graph declares a concrete size.
fn compare(direction: Direction, spec: &TensorSpec, found: &ValueType) -> Option<SignatureProblem> {
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
    let fixed_ok = spec
        .dims
        .iter()
        .zip(shape.iter())
        .all(|(dim, &size)| match dim {
            Dim::Fixed(n) => size < 0 || usize::try_from(size).is_ok_and(|s| s == *n),
            _ => true,
        });
    if fixed_ok {
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
    Some(SignatureProblem::Mismatch {
        direction,
        name: spec.name,
        expected: format!("{} shape {}", spec.elem, DimsList(spec.dims)),
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

/// Checks the names, element types and ranks of a session's inputs and outputs (and the sizes
/// the contract fixes) against `spec`; every difference is reported, naming the graph file,
/// the tensor and what was expected.
pub fn check_session(spec: &GraphSpec, session: &Session) -> Result<(), GraphError> {
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
                Some(outlet) => problems.extend(compare(direction, tensor, outlet.dtype())),
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

    #[test]
    fn trt_profile_lists_every_input_with_its_range() {
        let range = ShapeRange {
            batch: [1, 2, 8],
            latent: [32, 64, 128],
            text_hidden: 768,
            image_hidden: 1024,
        };
        let p = Graph::Unet.spec().trt_profile(&range);
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
        let p = Graph::ImageEncoder.spec().trt_profile(&range);
        assert_eq!(p.max, "pixel_values:8x3x224x224");
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
