"""The UNet graph's optional attention-map outputs (DESIGN.md §2 and §6), added after export.

ONNX Runtime runs every node of a graph whatever outputs the caller fetches (an unfetched
output is computed and thrown away: onnxruntime issues #16483, #27615; measured in
bench/RESULTS.md), so extra outputs alone are not free. This pass adds:

- an input ``want_attention_maps`` i64 ``[B]``; ``cond = ReduceMax(want) != 0``, once;
- per ``attn2`` layer, right after ELITE's gate ``A / M`` is computed, an ``If(cond)`` whose
  *then* branch adds the layer's maps (export/attention_maps.py: head mean of ``P_g`` and of the
  gate, reshape to the layer's grid, bicubic resize to the latent size, clamp at 0) to a running
  sum, and whose *else* branch passes an empty tensor on. The last layer's ``If`` divides by
  the layer count and splits the sum into
- outputs ``attention_maps`` f32 ``[B, T, h, w]`` and ``placeholder_gate`` f32 ``[B, 1, h, w]``,
  empty (``[0, …]``) when no row asked.

With every flag 0 the graph runs 16 ``If`` nodes that each forward an empty tensor; nothing
else of the UNet changes (``noise_pred`` is computed by the same nodes). One ``If`` per layer,
placed where its inputs appear, rather than one at the end: an ``If``'s inputs stay alive
until it runs, and sixteen ``P_g`` kept to the end would cost about 65 MB per row at 512².

The layers are found by the nodes the tracer exported: each ``attn2``'s ``GatherElements``
(the placeholder column ``A``, whose data input is ``P_g``) and the ``Div`` of ``A`` by its max.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .attention_maps import layer_level

WANT = "want_attention_maps"
MAPS = "attention_maps"
GATE = "placeholder_gate"
PREFIX = "maps"  # names of everything this pass adds start with it


class MapsGraphError(RuntimeError):
    pass


@dataclass(frozen=True)
class Layer:
    module: str  # ".../attn2" scope of the exported nodes
    level: int
    probs: str  # P_g [B, heads, N, T]
    gate: str  # A / M [B, heads, N, 1]
    after: str  # name of the node the If goes after (the gate's Div)


def has_attention_maps(model: onnx.ModelProto) -> bool:
    return any(i.name == WANT for i in model.graph.input)


def find_layers(model: onnx.ModelProto, levels: int) -> list[Layer]:
    """Every ``attn2`` of the graph, in graph order, with its ``P_g`` and gate tensors."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    layers = []
    for node in model.graph.node:
        if node.op_type != "GatherElements":
            continue
        module = node.name.rsplit("/", 1)[0]
        divs = [
            c
            for c in consumers.get(node.output[0], [])
            if c.op_type == "Div" and c.input[0] == node.output[0]
        ]
        if len(divs) != 1:
            raise MapsGraphError(f"{node.name}: expected one Div of the placeholder column")
        level = layer_level(module.replace("/", "."), levels)
        layers.append(Layer(module, level, node.input[0], divs[0].output[0], divs[0].name))
    if not layers:
        raise MapsGraphError("no attn2 layer (GatherElements) in the UNet graph")
    return layers


def _i64(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _empty(output: str, channels: str) -> list[onnx.NodeProto]:
    """An empty ``[0, C, 0, 0]`` float tensor, the *else* branches' result; ``channels``
    names the outer graph's i64 ``[C]``. Built by ``ConstantOfShape`` from outer-scope values
    rather than held in a ``Constant``: ONNX Runtime turns a subgraph's ``Constant`` into a
    subgraph initializer, which its plugin execution providers (OpenVINO, ``--precision bf16``)
    are not handed, so OpenVINO could not convert the ``If``."""
    shape = output + "_shape"
    zero = numpy_helper.from_array(np.zeros((1,), np.float32))
    return [
        helper.make_node("Concat", ["maps_0", channels, "maps_0", "maps_0"], [shape], axis=0),
        helper.make_node("ConstantOfShape", [shape], [output], value=zero),
    ]


def _out(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None)


def _then_branch(
    k: int, layer: Layer, tokens: int, count: int, acc: str | None, half: bool
) -> tuple[onnx.GraphProto, list[str]]:
    """Layer ``k``'s map added to ``acc`` (outer-scope names ``maps_*`` are initializers).
    ``half``: the attention runs in fp16; the maps are computed in fp32 from its head means."""
    p = f"{PREFIX}{k}_"
    n = helper.make_node
    nodes = [
        n("ReduceMean", [layer.probs], [p + "p"], axes=[1], keepdims=0),  # [B, N, T]
        n("ReduceMean", [layer.gate], [p + "g"], axes=[1], keepdims=0),  # [B, N, 1]
    ]
    if half:
        nodes += [
            n("Cast", [p + "p"], [p + "p32"], to=TensorProto.FLOAT),
            n("Cast", [p + "g"], [p + "g32"], to=TensorProto.FLOAT),
        ]
    suffix = "32" if half else ""
    nodes += [
        n("Concat", [p + "p" + suffix, p + "g" + suffix], [p + "pg"], axis=2),
        n("Transpose", [p + "pg"], [p + "t"], perm=[0, 2, 1]),  # [B, T+1, N]
        n("Shape", ["sample"], [p + "s"]),
        n("Slice", [p + "s", "maps_0", "maps_1"], [p + "b"]),  # [B]
        n("Slice", [p + "s", "maps_2", "maps_4"], [p + "hw"]),  # [h, w]
        # ceil(hw / 2^level): the layer's grid.
        n("Add", [p + "hw", f"maps_f{layer.level}m1"], [p + "hw1"]),
        n("Div", [p + "hw1", f"maps_f{layer.level}"], [p + "grid"]),
        n("Concat", [p + "b", "maps_c", p + "grid"], [p + "shape"], axis=0),
        n("Reshape", [p + "t", p + "shape"], [p + "r"]),  # [B, T+1, h_l, w_l]
    ]
    x = p + "r"
    if layer.level > 0:
        nodes += [
            n("Concat", [p + "b", "maps_c", p + "hw"], [p + "size"], axis=0),
            # PyTorch's bicubic (a = -0.75, half-pixel centres, edge pixels repeated).
            n(
                "Resize",
                [x, "", "", p + "size"],
                [p + "up"],
                mode="cubic",
                cubic_coeff_a=-0.75,
                coordinate_transformation_mode="half_pixel",
            ),
        ]
        x = p + "up"
    nodes.append(n("Relu", [x], [p + "c"]))  # clamp at 0
    x = p + "c"
    if acc is not None:
        nodes.append(n("Add", [acc, x], [p + "sum"]))
        x = p + "sum"
    if k < count - 1:
        return helper.make_graph(nodes, f"{p}then", [], [_out(x)]), [x]
    nodes += [
        n("Mul", [x, "maps_scale"], [p + "mean"]),
        n("Split", [p + "mean", "maps_split"], [p + MAPS, p + GATE], axis=1),
    ]
    outs = [p + MAPS, p + GATE]
    return helper.make_graph(nodes, f"{p}then", [], [_out(o) for o in outs]), outs


def _else_branch(k: int, count: int, acc: str | None) -> onnx.GraphProto:
    p = f"{PREFIX}{k}_"
    if k < count - 1:
        if acc is None:
            nodes = _empty(p + "none", "maps_c")
        else:
            nodes = [helper.make_node("Identity", [acc], [p + "none"])]
        return helper.make_graph(nodes, f"{p}else", [], [_out(p + "none")])
    nodes = _empty(p + "nomaps", "maps_t") + _empty(p + "nogate", "maps_1")
    return helper.make_graph(nodes, f"{p}else", [], [_out(p + "nomaps"), _out(p + "nogate")])


def add_attention_maps(model: onnx.ModelProto, levels: int, tokens: int, half: bool = False) -> int:
    """Adds the input, the ``If`` nodes and the two outputs to an exported UNet graph, in place.
    ``levels``: the UNet's resolution levels; ``tokens``: text tokens (77); ``half``: an fp16
    graph. Returns the number of layers."""
    if has_attention_maps(model):
        raise MapsGraphError(f"the graph already has `{WANT}`")
    graph = model.graph
    layers = find_layers(model, levels)
    count = len(layers)
    graph.initializer.extend(
        [
            _i64("maps_0", [0]),
            _i64("maps_1", [1]),
            _i64("maps_2", [2]),
            _i64("maps_4", [4]),
            _i64("maps_c", [tokens + 1]),
            _i64("maps_t", [tokens]),
            _i64("maps_split", [tokens, 1]),
            numpy_helper.from_array(np.array(1.0 / count, np.float32), "maps_scale"),
        ]
        + [
            t
            for level in sorted({layer.level for layer in layers})
            for t in (
                _i64(f"maps_f{level}", [2**level]),
                _i64(f"maps_f{level}m1", [2**level - 1]),
            )
        ]
    )
    graph.input.append(helper.make_tensor_value_info(WANT, TensorProto.INT64, ["B"]))
    cond = [
        helper.make_node("ReduceMax", [WANT], ["maps_any"], name="maps/ReduceMax", keepdims=0),
        helper.make_node(
            "Cast", ["maps_any"], ["maps_cond"], name="maps/Cast", to=TensorProto.BOOL
        ),
    ]
    by_anchor: dict[str, onnx.NodeProto] = {}
    acc: str | None = None
    for k, layer in enumerate(layers):
        then, _ = _then_branch(k, layer, tokens, count, acc, half)
        if k < count - 1:
            result = [f"{PREFIX}{k}_acc"]
        else:
            result = [MAPS, GATE]
        by_anchor[layer.after] = helper.make_node(
            "If",
            ["maps_cond"],
            result,
            name=f"{layer.module}/AttentionMaps",
            then_branch=then,
            else_branch=_else_branch(k, count, acc),
        )
        acc = result[0]
    nodes: list[onnx.NodeProto] = cond[:]
    for node in graph.node:
        nodes.append(node)
        if node.name in by_anchor:
            nodes.append(by_anchor[node.name])
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output.extend(
        [
            helper.make_tensor_value_info(MAPS, TensorProto.FLOAT, ["B", tokens, "h", "w"]),
            helper.make_tensor_value_info(GATE, TensorProto.FLOAT, ["B", 1, "h", "w"]),
        ]
    )
    return count


def add_attention_maps_file(path: Path, levels: int, tokens: int, half: bool = False) -> int:
    """:func:`add_attention_maps` on the graph file at ``path``, rewritten in place. Its weights
    are not loaded: a graph with external data keeps referring to its ``.data`` file, which the
    pass leaves untouched."""
    model = onnx.load(str(path), load_external_data=False)
    count = add_attention_maps(model, levels, tokens, half)
    tmp = path.with_name(path.name + ".maps.tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(path)
    onnx.checker.check_model(str(path))
    return count


def strip_attention_maps(model: onnx.ModelProto) -> None:
    """The inverse of :func:`add_attention_maps`, in place: the graph exported without maps
    (byte for byte once serialised; the tests and bench/attention_maps.py use it to compare
    with bundles exported before attention maps)."""
    graph = model.graph
    added = {"maps_any", "maps_cond"}
    nodes = [
        n
        for n in graph.node
        if not (n.op_type == "If" and n.name.endswith("/AttentionMaps"))
        and not set(n.output) & added
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    for field, names in (
        (graph.input, {WANT}),
        (graph.output, {MAPS, GATE}),
    ):
        kept = [v for v in field if v.name not in names]
        del field[:]
        field.extend(kept)
    inits = [i for i in graph.initializer if not i.name.startswith(f"{PREFIX}_")]
    del graph.initializer[:]
    graph.initializer.extend(inits)
