"""bf16 on the CPU: does an ONNX Runtime execution provider run the UNet in bf16 here, how fast,
and how far do the images move from fp32? (issue 14; results in bench/RESULTS.md)

This is the first measurement, through the separate ``onnxruntime-openvino`` wheel. The runtime
now has it as ``--precision bf16``, through the OpenVINO *plugin* provider loaded into its own
ONNX Runtime (src/openvino.rs; tests/precision.rs bounds the golden images), which needs none of
the graph rewriting below.

Run it with a Python whose ``onnxruntime`` has the provider, e.g. a scratch venv with the
OpenVINO provider's wheel (not a dependency of the project)::

    python3 -m venv scratch/ov-venv && scratch/ov-venv/bin/pip install onnxruntime-openvino onnx
    scratch/ov-venv/bin/python bench/bf16.py speed --bundle scratch/full/bundle --size 256
    scratch/ov-venv/bin/python bench/bf16.py golden            # the LMS golden cases, onnx/tiny

The rows in bench/RESULTS.md were measured on onnx/tiny as it was before attention maps
(issue 12); today's tiny UNet also has the maps' ``If`` nodes, which this script runs with the
maps off (``run_unet``) but which were not tried through the OpenVINO provider.

Variants: ``cpu`` (ONNX Runtime's CPU provider, Level3, as the runtime runs it: fp32),
``ov-fp32`` (OpenVINO provider, ``INFERENCE_PRECISION_HINT`` f32), ``ov-bf16`` (the same with
bf16: on CPUs with AVX512_BF16 / AMX the CPU plugin runs its matmuls and convolutions in bf16
with fp32 accumulation). The OpenVINO variants run the UNet with ONNX Runtime's contrib ops
written in standard ONNX (``openvino_graph``), so that OpenVINO takes the whole graph.

``speed``: one UNet call of batch 2 (one guidance step) at ``--size``²: session creation, the
first call, the median of ``--runs`` more, and each variant's ``noise_pred`` against ``cpu``
(max and mean absolute difference, relative to the mean magnitude).

``golden``: every LMS case of tests/golden (the tiny model) from its golden inputs: the
golden text and local embeddings and initial latents, the UNet of each variant, guidance and
the LMS step with the golden coefficients (f32, diffusers' order), the VAE decoder on the CPU
provider in fp32, uint8 as the runtime rounds. Prints, per case and variant, the max and mean
absolute level difference from the golden image (``cpu`` shows what this script's own
pipeline costs: it must be within a level or two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
VARIANTS = ["cpu", "ov-fp32", "ov-bf16"]


def openvino_graph(path: Path) -> Path:
    """``path`` with ONNX Runtime's contrib ops written in standard ONNX ops, so that the
    OpenVINO provider takes the whole graph: ``SkipLayerNormalization`` as ``Add`` and
    ``LayerNormalization`` (the exporter's fusion emits the four-output form, which OpenVINO's
    ONNX reader refuses), ``MultiHeadAttention`` as reshapes, two ``MatMul`` and a ``Softmax``
    (scale 1/sqrt(head size)), ``Gelu`` with ``Erf``. A graph split between OpenVINO and the CPU
    provider fails at its first run ("Output names mismatch between OpenVINO and ONNX",
    onnxruntime-openvino 1.24.1). Saved under scratch/bf16/ beside a hard link to the graph's
    external data (ONNX Runtime refuses a symbolic link that leaves the model's directory). The
    arithmetic is the same; weights are not read."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    nodes = []

    def const(name: str, values: list, dtype: int = TensorProto.INT64) -> str:
        tensor = helper.make_tensor(name, dtype, [len(values)], values)
        nodes.append(helper.make_node("Constant", [], [name], value=tensor))
        return name

    for i, node in enumerate(model.graph.node):
        if node.domain != "com.microsoft":
            nodes.append(node)
            continue
        p = f"ov{i}_{node.op_type}"
        if node.op_type == "SkipLayerNormalization":
            x, skip, gamma = node.input[:3]
            beta = node.input[3] if len(node.input) > 3 else ""
            bias = node.input[4] if len(node.input) > 4 else ""
            outs = list(node.output) + [""] * (4 - len(node.output))
            total = outs[3] or f"{p}_sum"
            eps = [a.f for a in node.attribute if a.name == "epsilon"] or [1e-12]
            if bias:
                nodes.append(helper.make_node("Add", [x, skip], [f"{p}_xs"]))
                nodes.append(helper.make_node("Add", [f"{p}_xs", bias], [total]))
            else:
                nodes.append(helper.make_node("Add", [x, skip], [total]))
            ln_inputs = [total, gamma] + ([beta] if beta else [])
            nodes.append(
                helper.make_node(
                    "LayerNormalization", ln_inputs, [outs[0]], axis=-1, epsilon=eps[0]
                )
            )
        elif node.op_type == "MultiHeadAttention":
            if len(node.input) != 3 or any(a.name != "num_heads" for a in node.attribute):
                raise SystemExit(f"{node.name}: only MultiHeadAttention(q, k, v, num_heads)")
            heads = node.attribute[0].i
            q, k, v = node.input
            split = const(f"{p}_split", [0, 0, heads, -1])
            for name, perm in [(q, [0, 2, 1, 3]), (k, [0, 2, 3, 1]), (v, [0, 2, 1, 3])]:
                nodes.append(helper.make_node("Reshape", [name, split], [f"{p}_{name}_4"]))
                nodes.append(
                    helper.make_node("Transpose", [f"{p}_{name}_4"], [f"{p}_{name}_t"], perm=perm)
                )
            nodes.append(helper.make_node("Shape", [f"{p}_{q}_4"], [f"{p}_d"], start=3))
            nodes.append(helper.make_node("Cast", [f"{p}_d"], [f"{p}_df"], to=TensorProto.FLOAT))
            nodes.append(helper.make_node("Sqrt", [f"{p}_df"], [f"{p}_sd"]))
            nodes.append(helper.make_node("Reciprocal", [f"{p}_sd"], [f"{p}_scale"]))
            nodes.append(helper.make_node("MatMul", [f"{p}_{q}_t", f"{p}_{k}_t"], [f"{p}_qk"]))
            nodes.append(helper.make_node("Mul", [f"{p}_qk", f"{p}_scale"], [f"{p}_qks"]))
            nodes.append(helper.make_node("Softmax", [f"{p}_qks"], [f"{p}_p"], axis=-1))
            nodes.append(helper.make_node("MatMul", [f"{p}_p", f"{p}_{v}_t"], [f"{p}_o"]))
            nodes.append(helper.make_node("Transpose", [f"{p}_o"], [f"{p}_ot"], perm=[0, 2, 1, 3]))
            merge = const(f"{p}_merge", [0, 0, -1])
            nodes.append(helper.make_node("Reshape", [f"{p}_ot", merge], [node.output[0]]))
        elif node.op_type == "Gelu":
            x = node.input[0]
            r2 = const(f"{p}_r2", [2**-0.5], TensorProto.FLOAT)
            half = const(f"{p}_half", [0.5], TensorProto.FLOAT)
            one = const(f"{p}_one", [1.0], TensorProto.FLOAT)
            nodes.append(helper.make_node("Mul", [x, r2], [f"{p}_xr"]))
            nodes.append(helper.make_node("Erf", [f"{p}_xr"], [f"{p}_erf"]))
            nodes.append(helper.make_node("Add", [f"{p}_erf", one], [f"{p}_e1"]))
            nodes.append(helper.make_node("Mul", [x, half], [f"{p}_xh"]))
            nodes.append(helper.make_node("Mul", [f"{p}_xh", f"{p}_e1"], [node.output[0]]))
        else:
            raise SystemExit(f"{node.name}: no standard form of com.microsoft.{node.op_type} here")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    out_dir = ROOT / "scratch" / "bf16" / path.parent.name
    out_dir.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    if data.exists() and not (out_dir / data.name).exists():
        os.link(data.resolve(), out_dir / data.name)
    out = out_dir / path.name
    onnx.save(model, str(out))
    return out


def session(path: Path, variant: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    if variant == "cpu":
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # OpenVINO optimises the graph itself; ONNX Runtime's fusions would hand it contrib ops.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"this onnxruntime ({ort.__file__}) has no OpenVINO provider")
    hint = {"ov-fp32": "f32", "ov-bf16": "bf16"}[variant]
    # load_config: OpenVINO properties per device, as JSON text (this provider parses the
    # option's value itself, not a file name).
    ov = {
        "device_type": "CPU",
        "load_config": json.dumps({"CPU": {"INFERENCE_PRECISION_HINT": hint}}),
    }
    sess = ort.InferenceSession(
        str(openvino_graph(path)),
        options,
        providers=[("OpenVINOExecutionProvider", ov), "CPUExecutionProvider"],
    )
    # ONNX Runtime falls back to the CPU provider with only a logged error when the provider
    # cannot be created: that would measure fp32 under a bf16 label.
    if "OpenVINOExecutionProvider" not in sess.get_providers():
        raise SystemExit(f"{variant}: the OpenVINO provider was not created for {path}")
    return sess


def unet_feed(dims: dict, batch: int, h: int, w: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    txt = int(dims["text_hidden"])
    return {
        "sample": rng.standard_normal((batch, 4, h, w), dtype=np.float32),
        "timestep": np.full((batch,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, txt), dtype=np.float32),
        "local_embeddings": rng.standard_normal((batch, 256, txt), dtype=np.float32),
        "local_index": np.full((batch,), 5, np.int64),
        "local_lambda": np.array([0.8] + [0.0] * (batch - 1), np.float32),
    }


def run_unet(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> np.ndarray:
    """``noise_pred`` of one call; a bundle with attention maps (issue 12) runs with them off."""
    if any(i.name == "want_attention_maps" for i in sess.get_inputs()):
        batch = feed["sample"].shape[0]
        feed = {**feed, "want_attention_maps": np.zeros((batch,), np.int64)}
    return np.asarray(sess.run(["noise_pred"], feed)[0])


def cmd_speed(args: argparse.Namespace) -> None:
    bundle = ROOT / args.bundle
    dims = json.loads((bundle / "elite.json").read_text())["dims"]
    lat = args.size // 8
    feed = unet_feed(dims, 2, lat, lat)
    results: dict[str, dict[str, float]] = {}
    outputs: dict[str, np.ndarray] = {}
    for variant in args.variants:
        start = time.perf_counter()
        sess = session(bundle / "unet.onnx", variant)
        created = time.perf_counter() - start
        start = time.perf_counter()
        outputs[variant] = run_unet(sess, feed)
        first = time.perf_counter() - start
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            run_unet(sess, feed)
            times.append(time.perf_counter() - start)
        results[variant] = {"session s": created, "first s": first}
        results[variant]["call s"] = statistics.median(times)
        del sess
        print(f"{variant}: {results[variant]}", flush=True)
    base = outputs.get("cpu")
    print(f"\nUNet, batch 2, {args.size}², median of {args.runs} calls after the first")
    print(
        f"{'variant':10s} {'session s':>10s} {'first s':>8s} {'call s':>8s} {'vs cpu':>7s} "
        f"{'max |Δ|':>9s} {'mean |Δ|':>9s} {'mean |x|':>9s}"
    )
    for variant, r in results.items():
        speedup = results["cpu"]["call s"] / r["call s"] if "cpu" in results else float("nan")
        diff = np.abs(outputs[variant] - base) if base is not None else np.full(1, np.nan)
        scale = float(np.abs(base).mean()) if base is not None else float("nan")
        print(
            f"{variant:10s} {r['session s']:10.2f} {r['first s']:8.2f} {r['call s']:8.3f} "
            f"{speedup:6.2f}× {diff.max():9.2e} {diff.mean():9.2e} {scale:9.2e}"
        )


def lms_case(case: dict, unet: ort.InferenceSession, vae: ort.InferenceSession) -> np.ndarray:
    """One golden LMS case from its golden stage inputs; the uint8 image ``[H, W, 3]``."""

    def load(key: str) -> np.ndarray:
        return np.load(GOLDEN / case["files"][key])

    cond, uncond = load("text_cond"), load("text_uncond")
    local = load("local_embeddings")
    latents = load("init_latents").astype(np.float32)
    sigmas = load("sigmas").astype(np.float32)
    timesteps = load("timesteps").astype(np.float32)
    coeffs = load("lms_coefficients")
    # The golden initial latents are already scaled by the scheduler's init_noise_sigma.
    guidance = np.float32(case["guidance"])
    derivatives: list[np.ndarray] = []
    for k, t in enumerate(timesteps):
        sigma = sigmas[k]
        x_in = (latents / np.sqrt(sigma**2 + 1)).astype(np.float32)
        feed = {
            "sample": np.concatenate([x_in, x_in]),
            "timestep": np.full((2,), t, np.float32),
            "encoder_hidden_states": np.concatenate([cond, uncond]).astype(np.float32),
            "local_embeddings": np.concatenate([local, local]).astype(np.float32),
            "local_index": np.array([case["placeholder_index"]] * 2, np.int64),
            "local_lambda": np.array([case["lam"], 0.0], np.float32),
        }
        eps_cond, eps_uncond = run_unet(unet, feed)
        eps = (eps_uncond + guidance * (eps_cond - eps_uncond))[None].astype(np.float32)
        x0 = latents - sigma * eps
        derivatives.insert(0, ((latents - x0) / sigma).astype(np.float32))
        del derivatives[4:]
        step = np.zeros(latents.shape, np.float32)
        for j, d in enumerate(derivatives):
            step = (step + np.float32(coeffs[k, j]) * d).astype(np.float32)
        latents = (latents + step).astype(np.float32)
    scale = np.float32(0.18215)
    decoded = vae.run(None, {"latent_sample": (latents / scale).astype(np.float32)})[0]
    pixels = np.clip(decoded[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0)
    return np.round(pixels * 255).astype(np.uint8)


def cmd_golden(args: argparse.Namespace) -> None:
    bundle = ROOT / args.bundle
    cases = [c for c in json.loads((GOLDEN / "cases.json").read_text())["cases"]]
    cases = [c for c in cases if c["scheduler"] == "lms"]
    vae = session(bundle / "vae_decoder.onnx", "cpu")
    unets = {v: session(bundle / "unet.onnx", v) for v in args.variants}
    print(
        f"{'case':18s} {'steps':>5s} {'variant':8s} {'max Δ level':>11s} "
        f"{'mean Δ level':>12s} {'vs cpu max':>10s} {'vs cpu mean':>11s}"
    )
    for case in cases:
        golden = np.load(GOLDEN / case["files"]["image"]).astype(np.int32)
        images = {v: lms_case(case, unets[v], vae).astype(np.int32) for v in args.variants}
        for v, img in images.items():
            d = np.abs(img - golden)
            c = np.abs(img - images["cpu"]) if "cpu" in images else d
            print(
                f"{case['name']:18s} {case['steps']:5d} {v:8s} {d.max():11d} "
                f"{d.mean():12.3f} {c.max():10d} {c.mean():11.3f}",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed", help="UNet call time and output difference per variant")
    s.add_argument("--bundle", default="scratch/full/bundle")
    s.add_argument("--size", type=int, default=256)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    g = sub.add_parser("golden", help="image level differences on the golden LMS cases")
    g.add_argument("--bundle", default="onnx/tiny")
    g.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    args = p.parse_args()
    {"speed": cmd_speed, "golden": cmd_golden}[args.cmd](args)


if __name__ == "__main__":
    main()
