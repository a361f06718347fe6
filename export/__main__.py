"""``python -m export``: bundles from upstream weights, the tiny bundle, and the golden data."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .exporter import ExportError, export_bundle
from .models import CheckpointError, EliteModels, load_elite
from .tiny import write_tiny_upstream


def load_tiny(workdir: Path) -> EliteModels:
    paths = write_tiny_upstream(workdir)
    models = load_elite(
        str(paths["sd"]), str(paths["clip"]), paths["global_mapper"], paths["local_mapper"]
    )
    models.source = {
        "unet": "tiny (export/tiny.py)",
        "clip": "tiny (export/tiny.py)",
        "global_mapper": "global_mapper.pt",
        "local_mapper": "local_mapper.pt",
    }
    return models


def cmd_bundle(args: argparse.Namespace) -> None:
    models = load_elite(
        args.sd, args.clip, Path(args.global_mapper), Path(args.local_mapper), args.allow_network
    )
    export_bundle(
        models,
        Path(args.out),
        args.name,
        "fp16" if args.fp16 else "fp32",
        validate=not args.no_validate,
    )


def cmd_tiny(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="elite-tiny-") as tmp:
        upstream = Path(args.upstream) if args.upstream else Path(tmp)
        models = load_tiny(upstream)
        export_bundle(models, Path(args.out), "elite-tiny", "fp32", random_weights=True)


def cmd_golden(args: argparse.Namespace) -> None:
    from .golden import write_golden

    with tempfile.TemporaryDirectory(prefix="elite-tiny-") as tmp:
        write_golden(load_tiny(Path(tmp)), Path(args.out))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bundle", help="export a bundle from upstream weights")
    b.add_argument(
        "--sd",
        required=True,
        help="Stable Diffusion v1-4 diffusers directory (or hub id with --allow-network)",
    )
    b.add_argument(
        "--clip", required=True, help="CLIP ViT-L/14 directory (or hub id with --allow-network)"
    )
    b.add_argument("--global-mapper", required=True, help="ELITE global_mapper.pt")
    b.add_argument("--local-mapper", required=True, help="ELITE local_mapper.pt")
    b.add_argument("--out", required=True, help="bundle directory to write")
    b.add_argument("--name", default="elite-sd14")
    b.add_argument(
        "--fp16", action="store_true", help="fp16 weights and compute, fp32 inputs/outputs"
    )
    b.add_argument("--allow-network", action="store_true", help="let hub ids download")
    b.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-torch check")
    b.set_defaults(func=cmd_bundle)

    t = sub.add_parser("tiny", help="generate the tiny random-weight model and export it")
    t.add_argument("--out", default="onnx/tiny")
    t.add_argument("--upstream", help="also keep the upstream-format checkpoints in this directory")
    t.set_defaults(func=cmd_tiny)

    g = sub.add_parser("golden", help="write the golden parity data from the reference pipeline")
    g.add_argument("--out", default="tests/golden")
    g.set_defaults(func=cmd_golden)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ExportError, CheckpointError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
