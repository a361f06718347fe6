"""Does a cached graph's first call cost more than its later calls?

    .venv/bin/python bench/first_call.py --cache-dir scratch/bench/cache
    .venv/bin/python bench/first_call.py ... --after-free 6.4   # right after a 6.4 GiB process

Loads CLIP vision from the runtime's graph cache as a later start loads it (Level1, no
pre-packing unless ``--prepack``, memory pattern off: its weights memory mapped), then times
``--calls`` calls on random inputs (``pixel_values [2, 3, 224, 224]``, the concept stage's call), each with the process's minor and major page faults during
it (``getrusage``). ``--after-free N`` first runs a child process that touches N GiB and exits,
as the reference's process does before ours in ``bench/run.py``, and waits ``--wait`` seconds.
``--cache-dir``: a cache the runtime filled (``bench/run.py`` leaves scratch/bench/cache).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from runtime_options import cached_graph, cpu_options

ROOT = Path(__file__).resolve().parents[1]


def faults() -> tuple[int, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_majflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache-dir", default="scratch/bench/cache")
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--after-free", type=float, default=0.0, help="GiB a child touches first")
    p.add_argument("--wait", type=float, default=3.0, help="seconds after that child (3)")
    p.add_argument("--prepack", action="store_true")
    args = p.parse_args()
    graph = cached_graph(ROOT / args.cache_dir, "image_encoder.onnx")
    if args.after_free > 0:
        n = int(args.after_free * 2**30)
        code = f"b = bytearray({n}); b[::4096] = b'x' * len(b[::4096])"
        subprocess.run([sys.executable, "-c", code], check=True)
        time.sleep(args.wait)
    options = cpu_options(args.prepack, cached=True)
    f0, start = faults(), time.perf_counter()
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    f1 = faults()
    print(
        f"session {time.perf_counter() - start:.3f} s, "
        f"minor faults {f1[0] - f0[0]}, major {f1[1] - f0[1]}"
    )
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    for i in range(args.calls):
        f0, start = faults(), time.perf_counter()
        session.run(None, {"pixel_values": pixels})
        f1 = faults()
        print(
            f"call {i + 1}: {time.perf_counter() - start:.3f} s, "
            f"minor faults {f1[0] - f0[0]}, major {f1[1] - f0[1]}"
        )


if __name__ == "__main__":
    main()
