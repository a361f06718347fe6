"""Where the UNet's time goes: ONNX Runtime's profiler on one bundle's UNet, totals per op type.

    .venv/bin/python bench/profile_unet.py --bundle scratch/full/bundle --size 512 --batch 2
    .venv/bin/python bench/profile_unet.py --graph image_encoder --batch 2   # CLIP vision tower

With ``--flops``, each op type's multiply-accumulate work (``bench/flops.py``, at the same
shapes) is printed beside its time, as GFLOP/s: which ops stand between a graph and the
machine's GEMM rate (``bench/roofline.py``).

Runs the UNet the way the runtime does on the CPU (Level3 optimisation, memory pattern off) on
random inputs: one untimed run, then ``--runs`` profiled ones, and prints seconds per run and
share per op type (kernel time only). The profile JSON stays in scratch/prof/.
``--no-prepacking`` runs the graph with weights not pre-packed, as the runtime runs the graphs
that run once per image (CLIP vision; ``SessionOptions::no_prepacking``).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from runtime_options import cpu_options

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", default="scratch/full/bundle")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latent = /8)")
    p.add_argument("--batch", type=int, default=2, help="2 = one guidance call for one image")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--graph", choices=["unet", "image_encoder"], default="unet")
    p.add_argument("--flops", action="store_true", help="GFLOP/s per op type (bench/flops.py)")
    p.add_argument(
        "--no-prepacking",
        action="store_true",
        help="weights not pre-packed, as the runtime runs the run-once graphs (CLIP vision)",
    )
    args = p.parse_args()

    bundle = ROOT / args.bundle
    manifest = json.loads((bundle / "elite.json").read_text())
    text_hidden = int(manifest["dims"]["text_hidden"])
    options = cpu_options(prepack=not args.no_prepacking)
    prof_dir = ROOT / "scratch" / "prof"
    prof_dir.mkdir(parents=True, exist_ok=True)
    options.enable_profiling = True
    options.profile_file_prefix = str(prof_dir / args.graph)
    start = time.perf_counter()
    session = ort.InferenceSession(
        str(bundle / f"{args.graph}.onnx"), options, providers=["CPUExecutionProvider"]
    )
    print(f"session: {time.perf_counter() - start:.1f} s")

    b, h = args.batch, args.size // 8
    rng = np.random.default_rng(0)
    feed: dict[str, np.ndarray] = {
        "sample": rng.standard_normal((b, 4, h, h), dtype=np.float32),
        "timestep": np.full((b,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((b, 77, text_hidden), dtype=np.float32),
        "local_embeddings": rng.standard_normal((b, 256, text_hidden), dtype=np.float32),
        "local_index": np.full((b,), 5, np.int64),
        "local_lambda": np.full((b,), 0.8, np.float32),
    }
    if args.graph == "image_encoder":
        size = int(manifest["dims"]["image_size"])
        feed = {"pixel_values": rng.standard_normal((b, 3, size, size), dtype=np.float32)}
        shape_note = f"{size}² image"
    else:
        shape_note = f"{args.size}²"
        if any(i.name == "want_attention_maps" for i in session.get_inputs()):
            # A bundle with attention maps (issue 12): maps off, as a run without them has.
            feed["want_attention_maps"] = np.zeros((b,), np.int64)
    start = time.perf_counter()
    session.run(None, feed)  # not counted: first-run allocations
    print(f"first run: {time.perf_counter() - start:.3f} s (not profiled)")
    for i in range(args.runs):
        start = time.perf_counter()
        session.run(None, feed)
        print(f"run {i + 1}: {time.perf_counter() - start:.3f} s (profiler on)")
    events = json.loads(Path(session.end_profiling()).read_text())
    # Count only the kernels after the first run.
    run_ends = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
    counted_from = run_ends[0]

    per_op: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    runs = args.runs
    for e in events:
        if (
            e.get("cat") == "Node"
            and e["name"].endswith("_kernel_time")
            and e["ts"] >= counted_from
        ):
            op = e["args"].get("op_name", "?")
            per_op[op] += e["dur"]
            nodes[op] += 1
    # ONNX Runtime's fused kernels carry the work of the exported graph's nodes: MatMul and Gemm
    # (+ FusedMatMul, FusedGemm) count as MatMul, Conv as Conv (+ NchwcConv, FusedConv).
    family = {"FusedMatMul": "MatMul", "Gemm": "MatMul", "FusedGemm": "MatMul"}
    family |= {"NchwcConv": "Conv", "FusedConv": "Conv"}
    merged: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    for op, us in per_op.items():
        merged[family.get(op, op)] += us
        count[family.get(op, op)] += nodes[op] // runs
    total = sum(merged.values())
    work: dict[str, int] = {}
    if args.flops:
        import flops  # bench/flops.py, beside this file

        shapes = {k: list(v.shape) for k, v in feed.items()}
        for op, macs in flops.onnx_macs(bundle / f"{args.graph}.onnx", shapes).items():
            name = family.get(op.split(".")[-1], op.split(".")[-1])
            work[name] = work.get(name, 0) + 2 * macs
        gflop = sum(work.values()) / 1e9
        print(
            f"work: {gflop:.1f} GFLOP per run, {gflop / (total / runs / 1e6):.0f} GFLOP/s "
            "over the kernel time"
        )
    print(
        f"\n{args.graph}, {shape_note}, batch {b}: kernel time {total / runs / 1e6:.3f} s per run"
    )
    print(f"{'op':28s} {'s/run':>8s} {'share':>7s} {'nodes':>6s} {'GFLOP':>8s} {'GFLOP/s':>8s}")
    for op, us in merged.most_common(args.top):
        gf = work.get(op, 0) / 1e9
        rate = f"{gf / (us / runs / 1e6):8.0f}" if gf else ""
        print(
            f"{op:28s} {us / runs / 1e6:8.3f} {100 * us / total:6.1f}% {count[op]:6d} "
            f"{gf:8.1f} {rate}"
        )


if __name__ == "__main__":
    main()
