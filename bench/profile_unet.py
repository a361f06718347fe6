"""Where the UNet's time goes: ONNX Runtime's profiler on one bundle's UNet, totals per op type.

    .venv/bin/python bench/profile_unet.py --bundle scratch/full/bundle --size 512 --batch 2

Runs the UNet the way the runtime does on the CPU (Level3 optimisation, memory pattern off) on
random inputs: one untimed run, then ``--runs`` profiled ones, and prints seconds per run and
share per op type (kernel time only). The profile JSON stays in scratch/prof/.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bundle", default="scratch/full/bundle")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (latent = /8)")
    p.add_argument("--batch", type=int, default=2, help="2 = one guidance call for one image")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--top", type=int, default=15)
    args = p.parse_args()

    bundle = ROOT / args.bundle
    manifest = json.loads((bundle / "elite.json").read_text())
    text_hidden = int(manifest["dims"]["text_hidden"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_mem_pattern = False
    prof_dir = ROOT / "scratch" / "prof"
    prof_dir.mkdir(parents=True, exist_ok=True)
    options.enable_profiling = True
    options.profile_file_prefix = str(prof_dir / "unet")
    start = time.perf_counter()
    session = ort.InferenceSession(
        str(bundle / "unet.onnx"), options, providers=["CPUExecutionProvider"]
    )
    print(f"session: {time.perf_counter() - start:.1f} s")

    b, h = args.batch, args.size // 8
    rng = np.random.default_rng(0)
    feed = {
        "sample": rng.standard_normal((b, 4, h, h), dtype=np.float32),
        "timestep": np.full((b,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((b, 77, text_hidden), dtype=np.float32),
        "local_embeddings": rng.standard_normal((b, 256, text_hidden), dtype=np.float32),
        "local_index": np.full((b,), 5, np.int64),
        "local_lambda": np.full((b,), 0.8, np.float32),
    }
    session.run(None, feed)  # not counted: first-run allocations
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
    total = sum(per_op.values())
    print(f"\n{args.size}², batch {b}: kernel time {total / runs / 1e6:.3f} s per run")
    print(f"{'op':28s} {'s/run':>8s} {'share':>7s} {'nodes':>6s}")
    for op, us in per_op.most_common(args.top):
        print(f"{op:28s} {us / runs / 1e6:8.3f} {100 * us / total:6.1f}% {nodes[op] // runs:6d}")


if __name__ == "__main__":
    main()
