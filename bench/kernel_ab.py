"""One graph, both sides, in one process, call by call: the runtime's ONNX Runtime session against
the reference's PyTorch module, on the same inputs, alternating.

    .venv/bin/python bench/kernel_ab.py --graph image_encoder      # the concept stage's kernel
    .venv/bin/python bench/kernel_ab.py --graph unet --size 256    # one denoising step's UNet work

Why: ``bench/run.py`` compares two processes that run seconds to minutes apart, and on a shared
host the GEMM rate moves by 20–30 % between its two roofline measurements of one run
(bench/RESULTS.md) — as much as the differences a stage's ratio is meant to show. Here each round
runs every variant once, the order rotating from round to round, on identical inputs in one
process, so a drift of the machine hits all variants alike; the ratio is of medians over rounds.

- **ours**: the bundle's graph as the runtime runs it on the CPU (``src/runtime.rs``,
  ``src/sessions.rs``): Level3, memory pattern off, weights pre-packed for the UNet only (the
  CLI's policy), the default intra-op threads; one batch-2 call (CLIP vision: the image and the
  masked image; UNet: the conditional row with λ and the unconditional row with λ = 0, as
  ``src/batch.rs`` stacks them).
- **reference**: the modules ``export/reference.py`` runs, called as it calls them: CLIP vision
  as two batch-1 calls, the UNet as a conditional call with ELITE's local branch and an
  unconditional one without; torch's default threads.
- **reference, batch 2** (CLIP vision only): the same module on both images in one call, which
  separates what batching gives from what the kernels give.

The yardstick at the graph's own shapes: after the rounds, the one-node MatMul rate of the
graph's dominant GEMM shapes (``bench/roofline.py``'s measurement, ONNX Runtime and torch) in
the same process; each variant's GFLOP/s (its work counted by torch's FlopCounterMode on the
reference modules, and ``bench/flops.py`` on the ONNX graph) is printed as a fraction of its
library's rate. The largest absolute difference between ours and the reference's output is
printed too, so that a mismatch in the setup cannot pass as a speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # export/ (bench/'s own modules are beside this file)

from export.__main__ import load_upstream  # noqa: E402
from export.attention import EliteUNet  # noqa: E402
from export.clip import ImageEncoder  # noqa: E402

import flops  # noqa: E402
import roofline  # noqa: E402
from runtime_options import cpu_options  # noqa: E402

Feed = dict[str, np.ndarray]


def ort_session(path: Path, prepack: bool) -> ort.InferenceSession:
    """The runtime's CPU session (Level3 as on a first start; a later start loads the same
    optimised graph from the cache)."""
    return ort.InferenceSession(str(path), cpu_options(prepack), providers=["CPUExecutionProvider"])


def counted(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (torch's count: 2 · MAC)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


class Variant:
    def __init__(self, name: str, call: Callable[[], np.ndarray], flop: int, library: str):
        self.name, self.call, self.flop, self.library = name, call, flop, library
        self.times: list[float] = []

    def timed(self) -> None:
        start = time.perf_counter()
        self.call()
        self.times.append(time.perf_counter() - start)


def image_encoder(bundle: Path, models: object, rng: np.random.Generator) -> tuple:
    manifest = json.loads((bundle / "elite.json").read_text())
    size = int(manifest["dims"]["image_size"])
    pixels = rng.standard_normal((2, 3, size, size), dtype=np.float32)
    session = ort_session(bundle / "image_encoder.onnx", prepack=False)
    module = ImageEncoder(models.vision).eval()  # type: ignore[attr-defined]
    x = torch.from_numpy(pixels)

    def ours() -> np.ndarray:
        return session.run(None, {"pixel_values": pixels})[0]

    def reference() -> np.ndarray:
        return torch.cat([module(x[:1]), module(x[1:])]).numpy()

    def batched() -> np.ndarray:
        return module(x).numpy()

    work = flops.onnx_macs(bundle / "image_encoder.onnx", {"pixel_values": list(pixels.shape)})
    rows = 2 * (1 + int(manifest["dims"]["patch_grid"]) ** 2)
    hidden = int(manifest["dims"]["image_hidden"])
    shapes = [(rows, hidden, hidden), (rows, hidden, 4 * hidden), (rows, 4 * hidden, hidden)]
    variants = [
        Variant("ours (1 × batch 2)", ours, 2 * sum(work.values()), "ort"),
        Variant("reference (2 × batch 1)", reference, counted(reference), "torch"),
        Variant("reference, batch 2", batched, counted(batched), "torch"),
    ]
    return variants, shapes, f"{size}² image, 2 images"


def unet(bundle: Path, models: object, rng: np.random.Generator, side: int) -> tuple:
    manifest = json.loads((bundle / "elite.json").read_text())
    text_hidden = int(manifest["dims"]["text_hidden"])
    h = side // 8
    sample = rng.standard_normal((1, 4, h, h), dtype=np.float32)
    cond = rng.standard_normal((1, 77, text_hidden), dtype=np.float32)
    uncond = rng.standard_normal((1, 77, text_hidden), dtype=np.float32)
    local = rng.standard_normal((1, 256, text_hidden), dtype=np.float32)
    lam, index = 0.8, 5
    feed: Feed = {
        "sample": np.concatenate([sample, sample]),
        "timestep": np.full((2,), 500.0, np.float32),
        "encoder_hidden_states": np.concatenate([cond, uncond]),
        "local_embeddings": np.concatenate([local, local]),
        "local_index": np.full((2,), index, np.int64),
        "local_lambda": np.array([lam, 0.0], np.float32),
    }
    session = ort_session(bundle / "unet.onnx", prepack=True)
    if any(i.name == "want_attention_maps" for i in session.get_inputs()):
        feed["want_attention_maps"] = np.zeros((2,), np.int64)
    module = EliteUNet(models.unet).eval()  # type: ignore[attr-defined]
    t = torch.tensor(500.0)
    x, c, u, loc = (torch.from_numpy(a) for a in (sample, cond, uncond, local))
    idx, lam_t = torch.tensor([index]), torch.tensor([lam])

    def ours() -> np.ndarray:
        return session.run(["noise_pred"], feed)[0]

    def reference() -> np.ndarray:
        eps_cond = module(x, t, c, loc, idx, lam_t)
        eps_uncond = module(x, t, u)
        return torch.cat([eps_cond, eps_uncond]).numpy()

    shapes_in = {k: list(v.shape) for k, v in feed.items()}
    work = flops.onnx_macs(bundle / "unet.onnx", shapes_in)
    # roofline.SHAPES are the UNet's GEMMs at 256² (latent 32²), batch 2: rows scale with h².
    shapes = [(m * h * h // (32 * 32), k, n) for m, k, n in roofline.SHAPES[:3]]
    variants = [
        Variant("ours (1 × batch 2)", ours, 2 * sum(work.values()), "ort"),
        Variant("reference (2 × batch 1)", reference, counted(reference), "torch"),
    ]
    return variants, shapes, f"{side}², one step (conditional + unconditional)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--graph", choices=["image_encoder", "unet"], required=True)
    p.add_argument("--bundle", default="scratch/full/bundle")
    p.add_argument("--upstream", default="scratch/full/upstream")
    p.add_argument("--size", type=int, default=256, help="UNet: image side in pixels (256)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (5), after one untimed")
    p.add_argument("--gemm-seconds", type=float, default=1.0, help="per yardstick shape (1.0)")
    args = p.parse_args()
    bundle, upstream = ROOT / args.bundle, ROOT / args.upstream
    models = load_upstream(upstream, "full")
    rng = np.random.default_rng(0)
    torch.set_grad_enabled(False)
    if args.graph == "image_encoder":
        variants, shapes, what = image_encoder(bundle, models, rng)
    else:
        variants, shapes, what = unet(bundle, models, rng, args.size)
    diff = float(np.abs(variants[0].call() - variants[1].call()).max())
    for v in variants[2:]:
        v.call()
    for r in range(args.rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            v.timed()
    rates = {
        "ort": roofline.summary(roofline.ort_rates(args.gemm_seconds, shapes=shapes)),
        "torch": roofline.summary(roofline.torch_rates(args.gemm_seconds, "fp32", shapes=shapes)),
    }
    shape_text = ", ".join(f"{m}x{k}x{n}" for m, k, n in shapes)
    print(
        f"{args.graph}, {what}; {args.rounds} rounds, order rotating; ours vs reference max abs diff {diff:.2e}"
    )
    print(
        f"GEMM rate at the graph's shapes ({shape_text}): ONNX Runtime "
        f"{rates['ort']['rate']:.0f}, torch {rates['torch']['rate']:.0f} GFLOP/s"
    )
    base = statistics.median(variants[1].times)
    print("| variant | median | all | / reference | GFLOP | GFLOP/s | of its GEMM rate |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for v in variants:
        med = statistics.median(v.times)
        achieved = v.flop / med / 1e9
        rate = float(rates[v.library]["rate"])  # type: ignore[arg-type]
        print(
            f"| {v.name} | {med:.3f} s | {' '.join(f'{t:.2f}' for t in v.times)} | "
            f"{med / base:.2f} | {v.flop / 1e9:.1f} | {achieved:.0f} | {achieved / rate:.2f} |"
        )


if __name__ == "__main__":
    main()
