"""The symbolic shapes written into every graph (export/shape_labels.py): names that mean what
they say at sizes never probed, and names ONNX Runtime keeps."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.graphs import Dims, GraphSpec, graph_specs, sample_inputs
from export.paths import TINY_BUNDLE
from export.shape_labels import GRAPHS, PROBES, dim_name

DIMS = Dims(text_hidden=16, image_hidden=32)
SPECS = [s for s in graph_specs(DIMS) if s.name in GRAPHS]

# (batch, latent h, latent w) that are not among the probes: the trace size, a non-square
# one, and a batch and aspect further out than any probe.
UNSEEN = ((2, 64, 64), (1, 40, 24), (5, 8, 56))


def test_dimensions_are_named_by_how_they_vary() -> None:
    b = [p[0] for p in PROBES]
    h = [p[1] for p in PROBES]
    w = [p[2] for p in PROBES]
    assert dim_name(b) == "B"
    assert dim_name([x * 8 for x in b]) == "B*8"
    assert dim_name([x // 2 for x in h]) == "h/2"
    assert dim_name(w) == "w"
    assert dim_name([y * x // 4 for y, x in zip(h, w)]) == "h*w/4"
    assert dim_name([n * y * x for n, y, x in zip(b, h, w)]) == "B*h*w"
    # No simple formula: the values themselves, so equal names still mean equal sizes.
    sums = [y + x for y, x in zip(h, w)]
    assert dim_name(sums) == "d" + "_".join(map(str, sums))
    assert len({tuple(h), tuple(w), tuple(b), tuple(sums)}) == 4  # the probes tell them apart


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    # No optimisation: the two graphs then differ only in how the planner reuses buffers.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _feeds(spec: GraphSpec, batch: int, h: int, w: int, seed: int) -> dict[str, np.ndarray]:
    want_maps = True if spec.optional_inputs else None
    inputs = sample_inputs(spec, DIMS, batch, (h, w), seed, want_maps=want_maps)
    return {k: v.numpy() for k, v in inputs.items()}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_labels_hold_at_sizes_never_probed(spec: GraphSpec) -> None:
    """The committed graph and the same graph without its labels give identical outputs at
    sizes outside the probes (attention maps on, so the `If` branches run too). A name that
    claimed two different sizes equal would make ONNX Runtime reuse a buffer too small for
    its value, which it refuses with an error."""
    labelled = onnx.load(str(TINY_BUNDLE / spec.file))
    assert len(labelled.graph.value_info) > 0.9 * len(labelled.graph.node)
    bare = onnx.ModelProto()
    bare.CopyFrom(labelled)
    del bare.graph.value_info[:]
    with_labels, without = _session(labelled), _session(bare)
    for seed, (batch, h, w) in enumerate(UNSEEN):
        feeds = _feeds(spec, batch, h, w, seed)
        for got, want in zip(with_labels.run(None, feeds), without.run(None, feeds)):
            assert got.shape == want.shape
            assert np.array_equal(got, want), f"{spec.name} at B={batch}, {h}×{w}"


def _anonymous_dims(model: onnx.ModelProto) -> tuple[int, int]:
    """(dims ONNX Runtime named itself, all non-fixed dims) over the intermediate values of
    ``model`` as ONNX Runtime saves it after its own shape inference."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "resolved.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        resolved = onnx.load(options.optimized_model_filepath)
    dims = [
        d
        for v in resolved.graph.value_info
        for d in v.type.tensor_type.shape.dim
        if not d.HasField("dim_value")
    ]
    return sum(1 for d in dims if not d.dim_param or d.dim_param.startswith("unk__")), len(dims)


def test_onnx_runtime_keeps_the_names() -> None:
    """ONNX Runtime's shape inference keeps a graph's names and invents its own (``unk__N``)
    only where the graph has none: after it resolved the labelled tiny CLIP vision graph,
    every non-fixed dimension of an intermediate value still carries a label."""
    labelled = onnx.load(str(TINY_BUNDLE / "image_encoder.onnx"))
    anonymous, total = _anonymous_dims(labelled)
    print(f"anonymous dims after ONNX Runtime's inference: {anonymous} of {total}")
    assert total > 500  # batch-dependent dims of the 1914 labelled values
    assert anonymous == 0
