"""Would overlapping the concept stage with the UNet session's creation shorten a CLI run?

    .venv/bin/python bench/overlap_load.py --cache-dir scratch/bench/cache --rounds 3

The CLI creates the concept graphs' sessions, encodes the concept, then creates the UNet's
session (about 2 s on a later start, mostly ONNX Runtime's allocation planner; bench/RESULTS.md)
— one after the other, so that under the CLI's memory policy CLIP vision's weights are released
before the UNet's are loaded. This measures what running them at once would give, with the
sessions loaded from the runtime's graph cache as a later start loads them (Level1, the UNet
pre-packed, CLIP vision not, memory pattern off): per round, ``sequential`` (one batch-2 CLIP
vision call, then the UNet's session) and ``overlapped`` (the UNet's session created on a
second thread while the CLIP call runs), alternating which goes first, each in a fresh process.
It prints each variant's CLIP call, UNet session and wall time, and peak RSS.

``--cache-dir``: a cache the runtime filled (``bench/run.py`` leaves scratch/bench/cache).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from runtime_options import cached_graph, cpu_options

ROOT = Path(__file__).resolve().parents[1]


def one(cache: Path, mode: str) -> None:
    """One variant in this process; prints one line of `key=value` fields."""
    import numpy as np
    import onnxruntime as ort

    start = time.perf_counter()
    clip = ort.InferenceSession(
        str(cached_graph(cache, "image_encoder.onnx")),
        cpu_options(False, cached=True),
        providers=["CPUExecutionProvider"],
    )
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    unet: dict[str, float] = {}

    def create_unet() -> None:
        t = time.perf_counter()
        ort.InferenceSession(
            str(cached_graph(cache, "unet.onnx")),
            cpu_options(True, cached=True),
            providers=["CPUExecutionProvider"],
        )
        unet["s"] = time.perf_counter() - t

    thread = threading.Thread(target=create_unet)
    if mode == "overlapped":
        thread.start()
    t = time.perf_counter()
    clip.run(None, {"pixel_values": pixels})
    clip_s = time.perf_counter() - t
    del clip
    if mode == "sequential":
        thread.start()
    thread.join()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    wall = time.perf_counter() - start
    print(f"clip={clip_s:.3f} unet={unet['s']:.3f} wall={wall:.3f} rss={rss:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache-dir", default="scratch/bench/cache")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--one", choices=["sequential", "overlapped"], help=argparse.SUPPRESS)
    args = p.parse_args()
    cache = ROOT / args.cache_dir
    if args.one:
        one(cache, args.one)
        return
    results: dict[str, list[dict[str, float]]] = {"sequential": [], "overlapped": []}
    for r in range(args.rounds):
        order = ["sequential", "overlapped"] if r % 2 == 0 else ["overlapped", "sequential"]
        for mode in order:
            cmd = [sys.executable, __file__, "--cache-dir", args.cache_dir, "--one", mode]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            fields = dict(kv.split("=") for kv in line.split())
            results[mode].append({k: float(v) for k, v in fields.items()})
            print(f"round {r + 1} {mode:10s} {line.strip()}")
    print("| variant | CLIP call | UNet session | wall | peak RSS |")
    print("|---|---:|---:|---:|---:|")
    for mode, runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
        print(
            f"| {mode} | {med['clip']:.3f} s | {med['unet']:.3f} s | {med['wall']:.3f} s | "
            f"{med['rss']:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
