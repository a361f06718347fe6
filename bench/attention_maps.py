"""What the UNet's optional attention maps cost: bundle size, and the UNet's per-step time with
the maps off (against the same bundle without them) and on.

    .venv/bin/python bench/attention_maps.py --size tiny        # onnx/tiny, 256², 20 steps
    .venv/bin/python bench/attention_maps.py --size full        # scratch/full/bundle, 256², 8 steps

Three bundles of the same weights, made under ``scratch/maps/<size>/`` (the big files are
hard links to the source bundle's, so it must be on the same file system):

- **before**: the UNet without the maps (export/maps_graph.py's ``strip_attention_maps`` of a
  bundle with them, which gives the graph of bundles exported before them byte for byte; or the
  source bundle itself when it has none);
- **after**: the UNet with them (the source bundle, or ``add_attention_maps`` of it);

and three variants, run in rotating order in every repetition: *before*, *after* with maps
off, *after* with ``--attention-maps`` (every step). Each run is one ``elite-ort run
--timings json`` process (``--no-cache --no-verify``: loading is not measured); the figure per
variant is the median over all repetitions of the per-step times (the first step of each run
left out: it includes the first UNet call's allocations) and of the UNet time per call. Runs
wait for idle CPUs and are repeated when other processes took more than ``--max-contention``
(bench/run.py's harness). Raw samples: ``scratch/bench/<time>-maps-<size>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import run as harness  # noqa: E402  (bench/run.py: the shared process harness)
from export.maps_graph import (  # noqa: E402
    add_attention_maps,
    has_attention_maps,
    strip_attention_maps,
)

SIZES: dict[str, dict[str, object]] = {
    "tiny": {"bundle": "onnx/tiny", "steps": 20, "side": 256},
    "full": {"bundle": "scratch/full/bundle", "steps": 8, "side": 256},
}
# SD v1's UNet (and the tiny and full-size random models) has four resolution levels.
LEVELS = 4
TOKENS = 77


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def derived_bundle(source: Path, dest: Path, model: onnx.ModelProto) -> None:
    """``dest``: ``source`` with links to its files, ``model`` as unet.onnx, and the manifest's
    entry for it updated (its external data, if any, is the source's, linked)."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for f in source.iterdir():
        if f.name not in ("unet.onnx", "elite.json"):
            # Hard links: ONNX Runtime refuses external data that resolves outside the model's
            # directory, which a symbolic link to the source bundle does.
            (dest / f.name).hardlink_to(f.resolve())
    unet = dest / "unet.onnx"
    onnx.save_model(model, str(unet))
    doc = json.loads((source / "elite.json").read_text())
    doc["files"]["unet.onnx"] = {"sha256": sha256(unet), "bytes": unet.stat().st_size}
    (dest / "elite.json").write_text(json.dumps(doc, indent=2) + "\n")


def bundles(source: Path, work: Path) -> dict[str, Path]:
    model = onnx.load(str(source / "unet.onnx"), load_external_data=False)
    if has_attention_maps(model):
        strip_attention_maps(model)
        derived_bundle(source, work / "before", model)
        return {"before": work / "before", "after": source}
    add_attention_maps(model, LEVELS, TOKENS)
    derived_bundle(source, work / "after", model)
    return {"before": source, "after": work / "after"}


def bundle_bytes(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.iterdir())  # stat follows the links


class Runner:
    def __init__(self, args: argparse.Namespace, binary: Path, steps: int, side: int) -> None:
        self.args, self.binary, self.steps, self.side = args, binary, steps, side

    def once(self, bundle: Path, maps: bool) -> harness.Child:
        with tempfile.TemporaryDirectory() as out:
            cmd = [str(self.binary), "run", "--bundle", str(bundle), "--prompt", "a photo of a S"]
            cmd += ["--image", str(harness.IMAGE), "--mask", str(harness.MASK)]
            cmd += ["--steps", str(self.steps), "--height", str(self.side)]
            cmd += ["--width", str(self.side), "--out", f"{out}/o.png", "--quiet"]
            cmd += ["--timings", "json", "--no-cache", "--no-verify"]
            if maps:
                cmd += ["--attention-maps", out]
            for attempt in range(self.args.retries + 1):
                harness.wait_idle(self.args.max_contention, self.args.idle_timeout)
                child = harness.run_child(cmd)
                if child.contention <= self.args.max_contention:
                    return child
                harness.log(f"contended run ({child.contention:.0%}), attempt {attempt + 1}")
            return child


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--bundle", help="source bundle (default: the size's)")
    p.add_argument("--steps", type=int)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--max-contention", type=float, default=0.15)
    p.add_argument("--idle-timeout", type=float, default=600.0)
    p.add_argument("--retries", type=int, default=2)
    args = p.parse_args()
    spec = SIZES[args.size]
    source = (harness.ROOT / str(args.bundle or spec["bundle"])).resolve()
    steps = args.steps or int(str(spec["steps"]))
    side = int(str(spec["side"]))
    binary = harness.cargo_binary(not args.no_build)
    work = harness.ROOT / "scratch" / "maps" / args.size
    paths = bundles(source, work)
    runner = Runner(args, binary, steps, side)
    variants = [("before", paths["before"], False), ("off", paths["after"], False)]
    variants.append(("on", paths["after"], True))
    harness.log("warm-up runs (page cache; not counted)")
    for _, bundle, maps in variants:
        runner.once(bundle, maps)
    samples: dict[str, dict[str, list[float]]] = {v[0]: {"step": [], "call": []} for v in variants}
    for rep in range(args.reps):
        order = variants[rep % 3 :] + variants[: rep % 3]
        for name, bundle, maps in order:
            child = runner.once(bundle, maps)
            calls = child.doc["unet calls"]
            samples[name]["step"] += child.doc["denoise step"][1:]
            samples[name]["call"].append(calls["seconds"] / max(calls["calls"], 1))
            harness.log(
                f"rep {rep + 1} {name}: step {statistics.median(samples[name]['step']):.4f} s"
            )
    med = {k: {m: statistics.median(v[m]) for m in v} for k, v in samples.items()}
    unet = {k: (v / "unet.onnx").stat().st_size for k, v in paths.items()}
    total = {k: bundle_bytes(v) for k, v in paths.items()}
    data = paths["after"] / "unet.onnx.data"
    graph_note = " (graph; weights in unet.onnx.data, unchanged)" if data.exists() else ""
    lines = [
        f"## Attention maps, {args.size} ({harness.shown(source)}), {side}², {steps} steps, "
        f"{dt.date.today()}",
        "",
        f"Machine: {harness.machine()}.",
        f"Command: `.venv/bin/python bench/attention_maps.py {' '.join(sys.argv[1:])}`",
        "",
        "| variant | denoise step s | vs before | UNet s per call | vs before |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("before", "bundle without maps"),
        ("off", "with maps, maps off"),
        ("on", "with maps, `--attention-maps`"),
    ):
        m = med[name]
        lines.append(
            f"| {label} | {m['step']:.4f} | {m['step'] / med['before']['step']:.3f} "
            f"| {m['call']:.4f} | {m['call'] / med['before']['call']:.3f} |"
        )
    lines += [
        "",
        f"unet.onnx{graph_note}: {unet['before']} → {unet['after']} bytes "
        f"(+{unet['after'] / unet['before'] - 1:.2%}); bundle: {total['before']} → "
        f"{total['after']} bytes (+{total['after'] / total['before'] - 1:.3%}).",
    ]
    print("\n".join(lines))
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = harness.ROOT / "scratch" / "bench" / f"{stamp}-maps-{args.size}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps({"samples": samples, "lines": lines}, indent=1))


if __name__ == "__main__":
    main()
