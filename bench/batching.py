"""Step-level batching, measured: many generations in one engine against one at a time.

    .venv/bin/python bench/batching.py --size tiny
    .venv/bin/python bench/batching.py --size full            # scratch/full (export full-random)
    .venv/bin/python bench/batching.py --size full --memory   # + peak RSS per UNet row at 512²

Three measurements, each printed as a table with the exact commands' settings:

1. Eight generations (eight different prompts, one concept, same seed and settings):
   - "8 processes": eight ``elite-ort run`` processes, one prompt each (wall times summed);
   - "one job per call": one process, eight prompts, ``--max-batch 2``: every UNet call holds
     one job's two guidance rows, so the jobs take turns (the unbatched engine);
   - "max-batch 8" / "max-batch 16": one process, rows of 4 / 8 jobs per UNet call.
2. Per-row cost of one UNet call at batch 2, 4, 8, 16 (one prompt, ``-n B/2``,
   ``--max-batch B``: one call per step): median step time / B.
3. (``--memory``) Peak RSS of a 512² run at batch 2, 4, 8 (``-n 1, 2, 4``, one step): the
   slope is what one extra UNet row costs.

Timings come from ``--timings json`` (UNet time is the engine's sum over its calls); wall time
and peak RSS (``ru_maxrss``) from the driver. Each run waits for an idle machine and is
repeated when other processes took more than ``--max-contention`` of the CPUs (see run.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as harness  # noqa: E402  (bench/run.py: the shared process harness)

PROMPTS = [
    "a photo of a S",
    "a photo of S on the beach",
    "a painting of S",
    "S in the snow",
    "a S wearing sunglasses",
    "a watercolour of S",
    "S on a wooden table",
    "a close-up photo of S",
]

SIZES: dict[str, dict[str, object]] = {
    "tiny": {"bundle": "onnx/tiny", "steps": 20},
    "full": {"bundle": "scratch/full/bundle", "steps": 4},
}


class Runner:
    def __init__(self, args: argparse.Namespace, binary: Path, bundle: Path, cache: Path) -> None:
        self.args, self.binary, self.bundle, self.cache = args, binary, bundle, cache

    def command(self, out: Path, prompts: list[str], extra: list[str]) -> list[str]:
        cmd = [str(self.binary), "run", "--bundle", str(self.bundle)]
        for prompt in prompts:
            cmd += ["--prompt", prompt]
        cmd += ["--image", str(harness.IMAGE), "--mask", str(harness.MASK)]
        cmd += ["--out", str(out), "--force", "--quiet", "--timings", "json"]
        cmd += ["--cache-dir", str(self.cache)]
        if self.args.threads:
            cmd += ["--threads", str(self.args.threads)]
        return cmd + self.args.arg + extra

    def once(self, prompts: list[str], extra: list[str]) -> harness.Child:
        """One run, repeated while other processes contend for the CPUs."""
        with tempfile.TemporaryDirectory() as out:
            cmd = self.command(Path(out) / "o.png", prompts, extra)
            for attempt in range(self.args.retries + 1):
                harness.wait_idle(self.args.max_contention, self.args.idle_timeout)
                child = harness.run_child(cmd)
                if child.contention <= self.args.max_contention:
                    return child
                harness.log(f"contended run ({child.contention:.0%}), attempt {attempt + 1}")
            return child

    def median(self, prompts: list[str], extra: list[str]) -> dict[str, float]:
        samples = [self.once(prompts, extra) for _ in range(self.args.reps)]
        rows = [summary(c) for c in samples]
        return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


def summary(child: harness.Child) -> dict[str, float]:
    calls = child.doc.get("unet calls", {})
    steps = child.doc.get("denoise step", [])
    return {
        "wall": child.wall,
        "rss": float(child.rss),
        "unet": float(calls.get("seconds", 0.0)),
        "calls": float(calls.get("calls", 0)),
        "rows": float(calls.get("rows", 0)),
        "step": statistics.median(steps) if steps else 0.0,
        "contention": child.contention,
    }


def eight_generations(r: Runner, steps: int, size: int) -> list[str]:
    base = ["--steps", str(steps), "--height", str(size), "--width", str(size)]
    lines = [
        f"### Eight generations, {size}², {steps} steps",
        "",
        "| engine | wall s | vs 8 processes | UNet s | UNet calls | rows/call | peak RSS GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    separate = [r.median([p], base) for p in PROMPTS]
    total = {k: sum(s[k] for s in separate) for k in ("wall", "unet", "calls", "rows")}
    total["rss"] = max(s["rss"] for s in separate)
    results = [("8 processes, one prompt each", total)]
    # Eight jobs have 16 rows per step: larger batches change nothing here.
    for batch in (2, 8, 16):
        label = (
            "one process, one job per call (--max-batch 2)"
            if batch == 2
            else f"one process, --max-batch {batch}"
        )
        results.append((label, r.median(PROMPTS, base + ["--max-batch", str(batch)])))
    for label, s in results:
        lines.append(
            f"| {label} | {s['wall']:.2f} | {s['wall'] / total['wall']:.2f} | {s['unet']:.2f} "
            f"| {s['calls']:.0f} | {s['rows'] / max(s['calls'], 1):.1f} "
            f"| {s['rss'] / 2**30:.2f} |"
        )
    return lines


def per_row_cost(r: Runner, size: int, batches: list[int]) -> list[str]:
    lines = [
        f"### One UNet call per step at batch B, {size}² (median step time / B)",
        "",
        "| batch B | step s | per row s | per row vs batch 2 |",
        "|---:|---:|---:|---:|",
    ]
    base = ["--steps", "3", "--height", str(size), "--width", str(size)]
    first = None
    # One --max-batch for all (a TensorRT profile, and so an engine, per value otherwise).
    largest = str(max(batches))
    for batch in batches:
        s = r.median(PROMPTS[:1], base + ["-n", str(batch // 2), "--max-batch", largest])
        per_row = s["step"] / batch
        first = first or per_row
        lines.append(f"| {batch} | {s['step']:.3f} | {per_row:.4f} | {per_row / first:.2f} |")
    return lines


def memory_per_row(r: Runner) -> list[str]:
    lines = [
        "### Peak RSS at 512², one step, one call of B rows",
        "",
        "| batch B | peak RSS GiB | + per extra row (MiB) |",
        "|---:|---:|---:|",
    ]
    base = ["--steps", "1", "--height", "512", "--width", "512"]
    prev: tuple[int, float] | None = None
    for batch in (2, 4, 8):
        s = r.median(PROMPTS[:1], base + ["-n", str(batch // 2), "--max-batch", str(batch)])
        slope = ""
        if prev is not None:
            slope = f"{(s['rss'] - prev[1]) / (batch - prev[0]) / 2**20:.0f}"
        lines.append(f"| {batch} | {s['rss'] / 2**30:.2f} | {slope} |")
        prev = (batch, s["rss"])
    return lines


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--bundle", help="bundle directory (default: per --size)")
    p.add_argument("--steps", type=int, help="steps of the eight generations")
    p.add_argument("--image-size", type=int, default=256, help="height = width (default 256)")
    p.add_argument("--reps", type=int, default=1, help="repetitions per run (median); default 1")
    p.add_argument("--threads", type=int)
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per row at 512²")
    p.add_argument("--max-contention", type=float, default=0.1)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--idle-timeout", type=float, default=600.0)
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--binary", help="the elite-ort binary (default: cargo's release build)")
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        help="extra flag for every elite-ort run, e.g. --arg=--device --arg=cuda (repeatable)",
    )
    p.add_argument("--sizes", default="2,4,8,16", help="batch sizes of the per-row table")
    p.add_argument("--json", help="also write the tables' lines to this JSON file")
    args = p.parse_args()

    spec = SIZES[args.size]
    bundle = Path(args.bundle or str(spec["bundle"]))
    if not bundle.is_absolute():
        bundle = harness.ROOT / bundle
    binary = Path(args.binary) if args.binary else harness.cargo_binary(build=not args.no_build)
    cache = harness.ROOT / "scratch/bench/cache"
    cache.mkdir(parents=True, exist_ok=True)
    runner = Runner(args, binary, bundle, cache)
    steps = args.steps or int(str(spec["steps"]))
    harness.log("warm-up run (fills the graph cache; not counted)")
    runner.once(PROMPTS[:1], ["--steps", "1", "--height", "64", "--width", "64"])

    batches = [int(b) for b in args.sizes.split(",") if b]
    lines = [
        f"## Batching, {args.size} ({harness.shown(bundle)}), {dt.date.today()}",
        "",
        f"Machine: {harness.machine()}.",
        f"Command: `.venv/bin/python bench/batching.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    lines += eight_generations(runner, steps, args.image_size) + [""]
    lines += per_row_cost(runner, args.image_size, batches) + [""]
    if args.memory:
        lines += memory_per_row(runner) + [""]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(lines, indent=1))


if __name__ == "__main__":
    main()
