"""One PyTorch reference run for the benchmark (bench/run.py starts it as a child process).

Loads an ELITE model from upstream-format files (as ``python -m export`` writes them), encodes
the concept, generates one image with ``export.reference.ReferencePipeline`` (two batch-1 UNet
calls per step, as the official scripts) and prints one JSON line of timings in seconds:
``load``, ``preprocess``, ``encode concept``, ``encode text``, ``denoise step`` (a list, one per
step), ``denoise``, ``decode``, ``total``, plus ``threads`` (torch's intra-op threads).
``--device cuda --dtype fp16`` runs it as the official scripts do (the GPU benchmark); stage
times then wait for the GPU (``torch.cuda.synchronize``) before each clock read.
Run from the repository root so that ``export`` resolves.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from export.__main__ import load_upstream  # noqa: E402
from export.reference import ReferencePipeline, Timings  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--upstream", required=True, help="directory written by export/tiny.py")
    p.add_argument("--size", default="tiny", help="label for the model source")
    p.add_argument("--image", required=True)
    p.add_argument("--mask")
    p.add_argument("--prompt", required=True)
    p.add_argument("--placeholder", default="S")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--scheduler", default="lms", help="a runtime scheduler name (diffusers' own)")
    p.add_argument("--height", type=int, required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--lam", type=float, default=0.8)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timings: Timings = {"import": [time.perf_counter() - START]}

    start = time.perf_counter()
    pipe = ReferencePipeline(
        load_upstream(Path(args.upstream), args.size), args.device, DTYPES[args.dtype]
    )
    timings["load"] = [time.perf_counter() - start]
    concept = pipe.encode_concept(Path(args.image), Path(args.mask) if args.mask else None, timings)
    gen = pipe.generate(
        concept,
        args.prompt,
        placeholder=args.placeholder,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        lam=args.lam,
        height=args.height,
        width=args.width,
        record=(),
        timings=timings,
        scheduler=args.scheduler,
    )
    assert gen.image is not None
    Image.fromarray(gen.image).save(args.out)
    timings["total"] = [time.perf_counter() - START]
    doc: dict[str, object] = {k: (v if k == "denoise step" else sum(v)) for k, v in timings.items()}
    doc["threads"] = torch.get_num_threads()
    doc["device"] = str(pipe.device)
    doc["dtype"] = args.dtype
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
