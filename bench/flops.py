"""FLOP accounting: the multiply-accumulate work of each stage of one generation, both sides.

    .venv/bin/python bench/flops.py --size full                    # 256², the benchmark's size
    .venv/bin/python bench/flops.py --size full --height 512 --width 512 --json flops.json

**Ours** (``onnx_macs``): each graph of the bundle as exported (the graph ONNX Runtime is given;
its own fusions and layout changes do not change the arithmetic), with the run's input shapes
(batch, latent size) propagated through the whole graph by ONNX Runtime's symbolic shape
inference, which knows the ``com.microsoft`` ops. Counted, per node:

- ``MatMul`` (numpy broadcasting): ``prod(batch dims of the output) · M · K · N``;
- ``Gemm``: ``M · K · N``;
- ``Conv``: ``N · C_out · prod(output spatial) · C_in / group · prod(kernel)``;
  ``ConvTranspose``: ``N · C_in · prod(input spatial) · C_out / group · prod(kernel)``;
- ``com.microsoft.MultiHeadAttention`` (separate Q, K, V): ``B · S_q · S_kv · (D_qk + D_v)``
  (``Q Kᵀ`` and ``P V`` for all heads); ``com.microsoft.Attention`` adds its QKV projection.

Everything else (softmax, norms, element-wise ops) is not counted: it is memory-bound work
whose time shows in the fraction of the GEMM rate that a stage reaches. A graph with an op of
another kind that does GEMM-like work (``Einsum``, ``QAttention``, ...) is an error rather than
a silent undercount.

**Reference** (``reference_flops``): the same PyTorch modules the reference pipeline runs
(``export/reference.py``: two batch-1 CLIP calls, the mappers, two batch-1 text-encoder calls,
two batch-1 UNet calls per step — the unconditional one without ELITE's local branch — and the
VAE decode), built from the upstream directory's configs on the ``meta`` device (no weights, no
arithmetic) and counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts
``2 · MAC`` for matmuls, convolutions and attention).

Stages, per generation of one image (as ``bench/run.py`` times them): ``concept`` (CLIP vision
on the image and the masked image, both mappers), ``text`` (conditional and unconditional
prompts), ``denoise step`` (one step: ours one batch-2 UNet call, the reference two batch-1
calls), ``decode`` (the VAE decoder). ``GFLOP`` everywhere means 10⁹ floating-point operations,
``2 · MAC``.

``--check`` (run by ``export/tests/test_flops.py``) compares the ONNX count of single-node
graphs and of individual layers of the tiny bundle with counts by hand, and the ONNX total of
every tiny graph with torch's count of the same modules.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]

# Op types that do multiply-accumulate work and are counted; an op of GEMM_LIKE that is not
# counted is an error (see the module docstring).
COUNTED = {"MatMul", "Gemm", "Conv", "ConvTranspose", "MultiHeadAttention", "Attention"}
GEMM_LIKE = {
    "Einsum",
    "MatMulInteger",
    "QLinearMatMul",
    "QLinearConv",
    "ConvInteger",
    "QAttention",
    "FusedMatMul",
    "FusedConv",
    "FusedGemm",
    "PackedMultiHeadAttention",
    "GroupQueryAttention",
}


def _dims(value: onnx.ValueInfoProto) -> list[int] | None:
    shape = value.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in shape.dim]
    return dims if dims and all(d > 0 for d in dims) else ([] if not shape.dim else None)


def _prod(values: list[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph without weight data: large initializers become typed graph inputs, so shape
    inference sees their shapes without their bytes (the UNet's live in external data)."""
    graph = model.graph
    keep = []
    for init in graph.initializer:
        small = _prod(list(init.dims)) <= 64 and init.data_location != TensorProto.EXTERNAL
        if small:
            keep.append(init)
        else:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model


def load_graph(path: Path) -> onnx.ModelProto:
    """A bundle graph without its weights' bytes (external data is not read)."""
    return _weights_as_inputs(onnx.load(str(path), load_external_data=False))


def infer_shapes(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """``model`` with its inputs fixed to ``shapes`` and every value's shape inferred."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    for inp in model.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            if len(dims) != len(shapes[inp.name]):
                raise ValueError(f"input {inp.name}: rank {len(dims)}, given {shapes[inp.name]}")
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = v
    missing = [i.name for i in model.graph.input if i.name not in shapes and _dims(i) is None]
    if missing:
        raise ValueError(f"no shape given for inputs {missing}")
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False)
    if inferred is None:
        raise RuntimeError("symbolic shape inference failed")
    return inferred


def _node_macs(node: onnx.NodeProto, shape: dict[str, list[int]]) -> int:
    def get(name: str) -> list[int]:
        if name not in shape:
            raise ValueError(f"{node.op_type} node {node.name!r}: no shape for {name!r}")
        return shape[name]

    op = node.op_type
    if op == "MatMul":
        a, b, y = get(node.input[0]), get(node.input[1]), get(node.output[0])
        k = a[-1]
        if len(a) == 1 or len(b) == 1:  # vector products: the output has no M or N axis
            return _prod(y) * k
        return _prod(y) * k  # y = [..., M, N]: each output element is K MACs
    if op == "Gemm":
        a, y = get(node.input[0]), get(node.output[0])
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return _prod(y) * k
    if op == "Conv":
        w, y = get(node.input[1]), get(node.output[0])
        # w = [C_out, C_in / group, k...]: each output element is C_in/group · prod(k) MACs
        return _prod(y) * _prod(w[1:])
    if op == "ConvTranspose":
        x, w = get(node.input[0]), get(node.input[1])
        # w = [C_in, C_out / group, k...]: each input element feeds C_out/group · prod(k)
        return _prod(x) * _prod(w[1:])
    if op == "MultiHeadAttention":
        sq, sk, sv = (get(name) for name in node.input[:3])
        if len(sq) != 3 or len(sk) != 3 or len(sv) != 3:
            raise ValueError(
                f"MultiHeadAttention {node.name!r}: only separate [B, S, D] Q, K, V are counted "
                f"(shapes {sq}, {sk}, {sv})"
            )
        return sq[0] * sq[1] * sk[1] * (sq[2] + sv[2])
    if op == "Attention":
        x, w = get(node.input[0]), get(node.input[1])
        batch, seq, hidden = x
        sizes = _attr(node, "qkv_hidden_sizes", None)
        dq, _, dv = [int(v) for v in sizes] if isinstance(sizes, list) else [w[1] // 3] * 3
        return batch * seq * hidden * w[1] + batch * seq * seq * (dq + dv)
    raise AssertionError(op)


def onnx_macs(path: Path, shapes: dict[str, list[int]]) -> dict[str, int]:
    """MACs per op type of the graph at ``path`` with its inputs at ``shapes``."""
    model = infer_shapes(load_graph(path), shapes)
    return graph_macs(model)


def graph_macs(model: onnx.ModelProto) -> dict[str, int]:
    """MACs per op type of a model whose shapes are all known (see ``infer_shapes``)."""
    shape: dict[str, list[int]] = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = _dims(v)
        if dims is not None:
            shape[v.name] = dims
    for init in model.graph.initializer:
        shape[init.name] = list(init.dims)
    out: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        if node.op_type in GEMM_LIKE:
            raise ValueError(f"{node.op_type} node {node.name!r}: not counted by this tool")
        if node.op_type in COUNTED:
            key = (
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            )
            out[key] += _node_macs(node, shape)
    return dict(out)


@dataclass(frozen=True)
class Run:
    """The shapes of one benchmark generation: one image, one prompt."""

    height: int
    width: int


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "elite.json").read_text())


def ours_calls(bundle: Path, run: Run) -> dict[str, list[tuple[str, dict[str, list[int]]]]]:
    """Per stage, the graph calls the runtime makes (graph name, input shapes)."""
    d = _manifest(bundle)["dims"]
    txt, img, grid, size = d["text_hidden"], d["image_hidden"], d["patch_grid"], d["image_size"]
    h, w = run.height // d["vae_scale_factor"], run.width // d["vae_scale_factor"]
    feats = [1, 5, grid * grid + 1, img]
    unet = {
        "sample": [2, d["latent_channels"], h, w],
        "timestep": [2],
        "encoder_hidden_states": [2, d["max_tokens"], txt],
        "local_embeddings": [2, grid * grid, txt],
        "local_index": [2],
        "local_lambda": [2],
        # Bundles with attention maps (issue 12): the flag input, off in a benchmark run. The
        # maps' work sits inside If branches, which the count does not enter (not run then).
        "want_attention_maps": [2],
    }
    return {
        "concept": [
            ("image_encoder", {"pixel_values": [2, 3, size, size]}),
            ("global_mapper", {"image_features": feats}),
            ("local_mapper", {"image_features": feats, "mask": [1, grid * grid]}),
        ],
        "text": [
            (
                "text_encoder",
                {"input_ids": [2, d["max_tokens"]], "inj_embedding": [2, txt], "inj_index": [2]},
            )
        ],
        "denoise step": [("unet", unet)],
        "decode": [("vae_decoder", {"latent_sample": [1, d["latent_channels"], h, w]})],
    }


def ours_flops(bundle: Path, run: Run) -> dict[str, dict[str, int]]:
    """Per stage, FLOPs (2 · MAC) per op type of the runtime's calls."""
    out: dict[str, dict[str, int]] = {}
    memo: dict[str, dict[str, int]] = {}
    for stage, calls in ours_calls(bundle, run).items():
        total: collections.Counter[str] = collections.Counter()
        for graph, shapes in calls:
            key = f"{graph} {sorted(shapes.items())}"
            if key not in memo:
                memo[key] = onnx_macs(bundle / f"{graph}.onnx", shapes)
            for op, macs in memo[key].items():
                total[op] += 2 * macs
        out[stage] = dict(total)
    return out


def reference_flops(upstream: Path | None, run: Run, config: object = None) -> dict[str, int]:
    """Per stage, FLOPs (2 · MAC) of the reference pipeline's module calls, counted by torch on
    modules built on the ``meta`` device from ``upstream``'s configs (or from an
    ``export.tiny.ModelConfig`` given as ``config``)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPConfig, CLIPModel

    sys.path.insert(0, str(ROOT))
    from export.attention import EliteUNet, install_elite_attention
    from export.clip import ImageEncoder, TextEncoder
    from export.mappers import GlobalMapper, LocalMapper
    from export.tiny import ModelConfig, build_unet, build_vae, clip_config

    with torch.device("meta"):
        if isinstance(config, ModelConfig):
            unet, vae = build_unet(config), build_vae(config)
            clip_cfg = clip_config(config)
            mapper_hidden = config.mapper_hidden
        elif upstream is not None:
            sd = upstream / "stable-diffusion"
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(sd / "vae"))
            clip_cfg = CLIPConfig.from_pretrained(upstream / "clip")
            mapper_hidden = _mapper_hidden(upstream)
        else:
            raise ValueError("reference_flops needs an upstream directory or a ModelConfig")
        clip_cfg._attn_implementation = "eager"  # as export/models.py loads CLIP
        clip = CLIPModel(clip_cfg)
        vision, text = clip.vision_model, clip.text_model
        img, txt = int(vision.config.hidden_size), int(text.config.hidden_size)
        install_elite_attention(unet)
        gmap = GlobalMapper(img, mapper_hidden, txt)
        lmap = LocalMapper(img, mapper_hidden, txt)
    image_encoder, text_encoder, elite = ImageEncoder(vision), TextEncoder(text), EliteUNet(unet)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    h, w = run.height // factor, run.width // factor
    size = int(vision.config.image_size)
    grid = size // int(vision.config.patch_size)

    def count(fn: Callable[[], object]) -> int:
        mode = FlopCounterMode(display=False)
        with mode, torch.no_grad():
            fn()
        return int(mode.get_total_flops())

    def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(*shape, dtype=dtype, device="meta")

    pixels = zeros(1, 3, size, size)
    ids = zeros(1, 77, dtype=torch.int64)
    cond = zeros(1, 77, txt)
    local = zeros(1, grid * grid, txt)
    latents = zeros(1, int(unet.config.in_channels), h, w)
    t = torch.tensor(500.0, device="meta")
    idx = zeros(1, dtype=torch.int64)
    lam = zeros(1)
    mask = zeros(1, grid * grid)
    return {
        "concept": count(lambda: (gmap(image_encoder(pixels)), lmap(image_encoder(pixels), mask))),
        "text": count(lambda: (text_encoder(ids, cond[:, 0], idx), text_encoder(ids))),
        "denoise step": count(
            lambda: (elite(latents, t, cond, local, idx, lam), elite(latents, t, cond))
        ),
        "decode": count(lambda: vae.decode(latents).sample),
    }


def _mapper_hidden(upstream: Path) -> int:
    """The mappers' hidden width: the random-weight model's config, else the checkpoint."""
    config = upstream / "model_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["mapper_hidden"])
    import torch

    state = torch.load(upstream / "global_mapper.pt", map_location="meta", weights_only=True)
    return int(state["mapping_0.0.weight"].shape[0])


def stage_flops(bundle: Path, upstream: Path, run: Run) -> dict[str, dict[str, object]]:
    """``{stage: {"ours": FLOPs, "ours by op": {...}, "reference": FLOPs}}``."""
    ours = ours_flops(bundle, run)
    ref = reference_flops(upstream, run)
    return {
        stage: {
            "ours": sum(ours[stage].values()),
            "ours by op": ours[stage],
            "reference": ref[stage],
        }
        for stage in ours
    }


# --- self-check against counts by hand --------------------------------------------------------


def _single_node(op: str, inputs: dict[str, list[int]], domain: str = "", **attrs: object) -> int:
    """MACs of a one-node graph ``op(inputs) → y`` as this tool counts them."""
    node = helper.make_node(op, list(inputs), ["y"], domain=domain)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in attrs.items())
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    return sum(graph_macs(infer_shapes(model, inputs)).values())


def check(tiny_bundle: Path) -> list[str]:
    """Compares counts with counts by hand; returns the failures (empty = all agree)."""
    failures: list[str] = []

    def expect(what: str, got: int, want: int) -> None:
        status = "ok" if got == want else "MISMATCH"
        print(f"{status:8s} {what}: counted {got:,}, by hand {want:,}")
        if got != want:
            failures.append(what)

    # One node of each kind, shapes as in SD's UNet at level 1 (32² latent, batch 2).
    expect(
        "MatMul [2,1024,320]·[320,1280]",
        _single_node("MatMul", {"a": [2, 1024, 320], "b": [320, 1280]}),
        2 * 1024 * 320 * 1280,
    )
    expect(
        "MatMul batched [2,8,1024,40]·[2,8,40,77]",
        _single_node("MatMul", {"a": [2, 8, 1024, 40], "b": [2, 8, 40, 77]}),
        2 * 8 * 1024 * 40 * 77,
    )
    expect(
        "Gemm [1,1280]·[1280,320]ᵀ",
        _single_node("Gemm", {"a": [1, 1280], "b": [320, 1280]}, transB=1),
        1280 * 320,
    )
    expect(
        "Conv 3×3 320→320 pad 1 on [2,320,32,32]",
        _single_node("Conv", {"x": [2, 320, 32, 32], "w": [320, 320, 3, 3]}, pads=[1, 1, 1, 1]),
        2 * 320 * 32 * 32 * 320 * 9,
    )
    expect(
        "Conv 3×3 stride 2 320→320 on [2,320,32,32]",
        _single_node(
            "Conv",
            {"x": [2, 320, 32, 32], "w": [320, 320, 3, 3]},
            pads=[1, 1, 1, 1],
            strides=[2, 2],
        ),
        2 * 320 * 16 * 16 * 320 * 9,
    )
    expect(
        "Conv grouped (4 groups) 1×1 64→32",
        _single_node("Conv", {"x": [1, 64, 8, 8], "w": [32, 16, 1, 1]}, group=4),
        32 * 8 * 8 * 16,
    )
    expect(
        "ConvTranspose 2×2 stride 2 8→4 on [1,8,5,5]",
        _single_node("ConvTranspose", {"x": [1, 8, 5, 5], "w": [8, 4, 2, 2]}, strides=[2, 2]),
        8 * 5 * 5 * 4 * 2 * 2,
    )
    expect(
        "MultiHeadAttention 8 heads, 1024 queries, 1024 keys, D 320",
        _single_node(
            "MultiHeadAttention",
            {"q": [2, 1024, 320], "k": [2, 1024, 320], "v": [2, 1024, 320]},
            domain="com.microsoft",
            num_heads=8,
        ),
        2 * 1024 * 1024 * 320 * 2,
    )

    # Layers of the committed tiny bundle at 256² (latent 32²), batch 2, found by their weights.
    run = Run(256, 256)
    calls = ours_calls(tiny_bundle, run)
    unet_shapes = calls["denoise step"][0][1]
    model = infer_shapes(load_graph(tiny_bundle / "unet.onnx"), unet_shapes)
    sys.path.insert(0, str(ROOT))
    from export.tiny import TINY

    c0 = TINY.unet_channels[0]
    shape = {
        v.name: _dims(v) or []
        for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]
    }
    conv_in = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[0] == "sample")
    expect(
        "tiny UNet conv_in (3×3, 4→C0 on [2,4,32,32])",
        _node_macs(conv_in, shape),
        2 * c0 * 32 * 32 * 4 * 9,
    )
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    first = mha[0]
    expect(
        "tiny UNet first self-attention (MultiHeadAttention, 1024 tokens, D C0)",
        _node_macs(first, shape),
        2 * 1024 * 1024 * c0 * 2,
    )
    attn2_q = [
        n
        for n in model.graph.node
        if n.op_type == "MatMul"
        and shape.get(n.input[0], [0])[-1] == c0
        and shape.get(n.input[1], [0, 0])[-2:] == [c0, c0]
        and shape.get(n.output[0], [0])[:2] == [2, 1024]
    ]
    if attn2_q:
        expect(
            "tiny UNet a C0→C0 projection at level 1 (MatMul [2,1024,C0]·[C0,C0])",
            _node_macs(attn2_q[0], shape),
            2 * 1024 * c0 * c0,
        )
    else:
        failures.append("no level-1 C0→C0 projection found in the tiny UNet")

    # Whole graphs: the ONNX count against torch's count of the same modules (tiny model).
    ours = {s: sum(v.values()) for s, v in ours_flops(tiny_bundle, run).items()}
    ref = reference_flops(None, run, TINY)
    # The reference's unconditional UNet call skips ELITE's local branch; ours computes it
    # with λ = 0 (one batch-2 call): add that branch's cost for one row, by hand.
    extra = local_branch_flops(TINY, run)
    for stage in ours:
        want = ref[stage] + (extra if stage == "denoise step" else 0)
        note = f" + the local branch of one row by hand, {extra:,}" if want != ref[stage] else ""
        expect(f"tiny {stage}: ONNX against torch{note}", ours[stage], want)
    return failures


def local_branch_flops(cfg: object, run: Run) -> int:
    """FLOPs of ELITE's local branch for one UNet row, by hand: in each of SD's 16 ``attn2``
    layers (2 per down level 0-2, 1 in the mid block, 3 per up level 1-3) with ``N`` queries
    of width ``C``, the
    bias-free ``K_l``, ``V_l`` projections of the 256 local tokens (``2 · 256 · C_txt · C``
    MACs) and ``Q K_lᵀ``, ``P_l V_l`` (``2 · N · 256 · C``)."""
    channels = list(cfg.unet_channels)  # type: ignore[attr-defined]
    txt = int(cfg.text_hidden)  # type: ignore[attr-defined]
    tokens = (run.height // 8) * (run.width // 8)
    layers = [(tokens // 4**i, channels[i]) for i in range(3) for _ in range(2)]
    layers += [(tokens // 4**3, channels[3])]  # the mid block, at the lowest resolution
    layers += [(tokens // 4 ** (3 - j), channels[3 - j]) for j in range(1, 4) for _ in range(3)]
    assert len(layers) == 16
    return sum(2 * (2 * 256 * txt * c + 2 * n * 256 * c) for n, c in layers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=["tiny", "full"], default="full")
    p.add_argument("--bundle", help="bundle directory (default: per --size, as bench/run.py)")
    p.add_argument("--upstream", help="upstream directory (default: per --size)")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--json", help="write the counts here")
    p.add_argument("--check", action="store_true", help="compare with counts by hand (tiny)")
    args = p.parse_args()
    if args.check:
        failures = check(ROOT / "onnx/tiny")
        if failures:
            raise SystemExit(f"FLOP count differs from the count by hand: {failures}")
        return
    default = {"tiny": ("onnx/tiny", "scratch/tiny/upstream")}.get(
        args.size, ("scratch/full/bundle", "scratch/full/upstream")
    )
    bundle = ROOT / (args.bundle or default[0])
    upstream = ROOT / (args.upstream or default[1])
    counts = stage_flops(bundle, upstream, Run(args.height, args.width))
    print(f"{args.width}x{args.height}, one image; GFLOP = 10⁹ floating-point operations (2·MAC)")
    print(f"{'stage':14s} {'ours':>10s} {'reference':>10s}  ours by op")
    for stage, c in counts.items():
        ops = ", ".join(
            f"{op} {v / 1e9:.1f}"
            for op, v in sorted(c["ours by op"].items(), key=lambda kv: -kv[1])  # type: ignore
        )
        print(f"{stage:14s} {c['ours'] / 1e9:10.1f} {c['reference'] / 1e9:10.1f}  {ops}")  # type: ignore
    if args.json:
        Path(args.json).write_text(json.dumps(counts, indent=1) + "\n")


if __name__ == "__main__":
    main()
