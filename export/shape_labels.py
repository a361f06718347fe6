"""Symbolic shapes for every intermediate value of an exported graph (``value_info``).

Why: ONNX Runtime's allocation planner (``PlannerImpl::FindReusableTensor``, run once per
session) walks its list of freed buffers for every value it places, and for each entry with a
known shape compares element sizes through a string-keyed type lookup. A buffer is only
reused for a value of the *same* symbolic shape. The tracer's graphs have dynamic ``B``/``h``/
``w``, and ONNX Runtime's own shape inference gives each Reshape, Concat or Conv output fresh
unknown dimensions (``unk__123``), so almost nothing matches, the free list grows with the
graph and planning is quadratic in the graph's size: 0.55 s of the tiny UNet's 0.68 s session
creation (0.12 s with memory reuse off, which ONNX Runtime's C API cannot set), and the
full-size CLIP vision's cached session takes 0.14 s unlabelled, 0.03 s labelled. Labelling each value with the same names for the
same dimensions lets the planner match buffers again: creation drops to what static shapes
give, and planned reuse at run time returns with it — which is why only the graphs in
``GRAPHS`` get names (see there).

How: the graph runs at a few input sizes (all of them valid for the runtime: latent sides a
multiple of 8) with every intermediate value fetched, and each dimension is named by how it
varies across those runs: fixed → its value; proportional to ``B``, ``h``, ``w``, ``h*w`` (or
products with ``B``) → that formula (``h/2``, ``B*8``, ``h*w/4``); anything else → its
values (``d1_3_2_4``), so that equal names still mean equal sizes. A name is only a claim the
planner relies on to *reuse* a buffer, and ONNX Runtime checks a reused buffer's size at run
time, so a wrong name would fail a run loudly rather than corrupt it; four runs with unrelated
sizes make a coincidence implausible. Values computed inside or downstream of control flow
(the attention maps' ``If`` nodes, whose outputs are empty unless a row asks for maps) keep the
shapes ONNX Runtime infers.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from .graphs import Dims, GraphSpec, sample_inputs

# The graphs that get names: those whose inputs are of fixed size but for the batch (CLIP
# vision at 224², 77 tokens, the mappers' 257 patches), whose activations are small. The UNet
# and the VAE decoder are left as traced. With names the planner also reuses buffers, and for
# the UNet's large activations that costs more than the faster creation saves, measured on the
# full-size UNet at 512² (bench/RESULTS.md): its cached session takes 0.3 s instead of 1.9 s,
# but with names as here peak RSS rises 3.92 → 4.69 GB and each step is 4 % slower; names
# that match only within windows of 64 values keep the memory as it was and still make each
# step 10 % slower. The decoder gains nothing (it is created beside the UNet) and its one call
# per image was 3 ms slower on the tiny bundle.
GRAPHS = ("image_encoder", "global_mapper", "local_mapper", "text_encoder")

# (batch, latent h, latent w): unrelated values, sides multiples of 8 (the runtime's rule),
# small enough that fetching every intermediate of the full-size UNet stays cheap.
PROBES: tuple[tuple[int, int, int], ...] = ((1, 8, 16), (3, 16, 8), (2, 8, 24), (4, 24, 8))

Shape = tuple[int, ...]


def dim_name(values: list[int], probes: tuple[tuple[int, int, int], ...] = PROBES) -> str:
    """The name of a dimension that took ``values`` in the runs at ``probes``."""
    bases: dict[str, list[int]] = {
        "B": [b for b, _, _ in probes],
        "h": [h for _, h, _ in probes],
        "w": [w for _, _, w in probes],
        "h*w": [h * w for _, h, w in probes],
        "B*h": [b * h for b, h, _ in probes],
        "B*w": [b * w for b, _, w in probes],
        "B*h*w": [b * h * w for b, h, w in probes],
    }
    for base, of in bases.items():
        ratios = {Fraction(v, x) for v, x in zip(values, of)}
        if len(ratios) != 1:
            continue
        k = ratios.pop()
        if k == 1:
            return base
        if k.denominator == 1:
            return f"{base}*{k.numerator}"
        if k.numerator == 1:
            return f"{base}/{k.denominator}"
    return "d" + "_".join(str(v) for v in values)


def _controlled(graph: onnx.GraphProto) -> set[str]:
    """Values produced by control-flow nodes, and everything computed from them."""
    tainted: set[str] = set()
    for node in graph.node:  # topologically sorted, as ONNX requires
        has_subgraph = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        )
        if has_subgraph or tainted.intersection(node.input):
            tainted.update(o for o in node.output if o)
    return tainted


def _candidates(graph: onnx.GraphProto) -> list[str]:
    """The intermediate values to label, in graph order."""
    exclude = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    exclude |= {o.name for o in graph.output} | _controlled(graph)
    names: list[str] = []
    for node in graph.node:
        for o in node.output:
            if o and o not in exclude:
                exclude.add(o)
                names.append(o)
    return names


def _feeds(session: ort.InferenceSession, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The probe inputs as the graph's input types (fp16 graphs take fp16)."""
    out: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        array = inputs[i.name].numpy()
        out[i.name] = array.astype(np.float16) if i.type == "tensor(float16)" else array
    return out


def _probe(
    model: onnx.ModelProto, path: Path, spec: GraphSpec, dims: Dims, names: list[str]
) -> tuple[dict[str, list[Shape]], dict[str, int]]:
    """Runs ``model`` (the graph at ``path``) at every probe size fetching ``names``: their
    shapes and element types. ``model`` is left as it was."""
    outputs = len(model.graph.output)
    for name in names:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    # Beside the graph, so that its external data (if any) resolves as the graph's does.
    fd, probe_file = tempfile.mkstemp(prefix=".probe-", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(model, probe_file)
        del model.graph.output[outputs:]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(probe_file, options, providers=["CPUExecutionProvider"])
    finally:
        os.unlink(probe_file)
    shapes: dict[str, list[Shape]] = {n: [] for n in names}
    types: dict[str, int] = {}
    for seed, (batch, h, w) in enumerate(PROBES):
        want_maps = False if spec.optional_inputs else None
        inputs = sample_inputs(spec, dims, batch, (h, w), seed, want_maps=want_maps)
        values = session.run(names, _feeds(session, inputs))
        if not types:  # the same at every size
            types = {
                n: onnx.helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype)
                for n, v in zip(names, values)
            }
        for name, value in zip(names, values):
            shapes[name].append(tuple(np.shape(value)))
    return shapes, types


def _value_info(name: str, shapes: list[Shape], elem_type: int) -> onnx.ValueInfoProto | None:
    if len({len(s) for s in shapes}) != 1:
        return None  # rank depends on the input sizes: leave it to ONNX Runtime
    info = onnx.ValueInfoProto(name=name)
    info.type.tensor_type.elem_type = elem_type
    for k in range(len(shapes[0])):
        values = [s[k] for s in shapes]
        dim = info.type.tensor_type.shape.dim.add()
        if len(set(values)) == 1:
            dim.dim_value = values[0]
        else:
            dim.dim_param = dim_name(values)
    return info


def label_shapes_file(path: Path, spec: GraphSpec, dims: Dims) -> int:
    """Writes symbolic shapes of every intermediate value into the graph at ``path`` (its
    external data file, if any, is left as it is). Returns how many values were labelled."""
    model = onnx.load(str(path), load_external_data=False)
    names = _candidates(model.graph)
    shapes, types = _probe(model, path, spec, dims, names)
    infos = [i for n in names if (i := _value_info(n, shapes[n], types[n])) is not None]
    labelled = {i.name for i in infos}
    kept = [v for v in model.graph.value_info if v.name not in labelled]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept + infos)
    onnx.save_model(model, str(path))
    return len(infos)
