"""``python -m export``: bundles from upstream weights, the tiny bundle, the full-size
random-weight bundle (for benchmarks), and the golden data."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from .exporter import ExportError, export_bundle
from .models import CheckpointError, EliteModels, load_elite
from .tiny import CONFIGS, write_upstream


def load_random(workdir: Path, size: str = "tiny") -> EliteModels:
    """Write the ``size`` random-weight model (export/tiny.py) to ``workdir`` and load it back."""
    paths = write_upstream(workdir, CONFIGS[size])
    return load_upstream(workdir, size, paths)


def load_upstream(
    workdir: Path, size: str = "tiny", paths: dict[str, Path] | None = None
) -> EliteModels:
    """Load a random-weight model that ``write_upstream`` wrote into ``workdir`` earlier."""
    if paths is None:
        paths = {
            "sd": workdir / "stable-diffusion",
            "clip": workdir / "clip",
            "global_mapper": workdir / "global_mapper.pt",
            "local_mapper": workdir / "local_mapper.pt",
        }
    models = load_elite(
        str(paths["sd"]), str(paths["clip"]), paths["global_mapper"], paths["local_mapper"]
    )
    models.source = {
        "unet": f"{size} (export/tiny.py)",
        "clip": f"{size} (export/tiny.py)",
        "global_mapper": "global_mapper.pt",
        "local_mapper": "local_mapper.pt",
    }
    return models


def load_tiny(workdir: Path) -> EliteModels:
    return load_random(workdir, "tiny")


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
        fuse=not args.no_fuse,
        attention_maps=not args.no_attention_maps,
    )


def cmd_tiny(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="elite-tiny-") as tmp:
        upstream = Path(args.upstream) if args.upstream else Path(tmp)
        models = load_tiny(upstream)
        export_bundle(models, Path(args.out), "elite-tiny", "fp32", random_weights=True)


def cmd_full_random(args: argparse.Namespace) -> None:
    out = Path(args.out)
    upstream = Path(args.upstream) if args.upstream else out / "upstream"
    bundle = out / "bundle"
    upstream.mkdir(parents=True, exist_ok=True)
    models = load_random(upstream, "full")
    export_bundle(
        models,
        bundle,
        "elite-full-random",
        "fp16" if args.fp16 else "fp32",
        random_weights=True,
        validate=not args.no_validate,
        fuse=not args.no_fuse,
        attention_maps=not args.no_attention_maps,
    )


def cmd_golden(args: argparse.Namespace) -> None:
    from .golden import write_golden

    with tempfile.TemporaryDirectory(prefix="elite-tiny-") as tmp:
        write_golden(load_tiny(Path(tmp)), Path(args.out))


NO_FUSE_HELP = "keep the UNet's self-attention unfused (export/fusion.py)"
NO_MAPS_HELP = (
    "leave out the UNet's optional attention-map input and outputs (export/maps_graph.py): the "
    "UNet is then exactly the graph of bundles exported before them"
)


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
    b.add_argument("--no-fuse", action="store_true", help=NO_FUSE_HELP)
    b.add_argument("--no-attention-maps", action="store_true", help=NO_MAPS_HELP)
    b.set_defaults(func=cmd_bundle)

    t = sub.add_parser("tiny", help="generate the tiny random-weight model and export it")
    t.add_argument("--out", default="onnx/tiny")
    t.add_argument("--upstream", help="also keep the upstream-format checkpoints in this directory")
    t.set_defaults(func=cmd_tiny)

    f = sub.add_parser(
        "full-random",
        help="generate a random-weight model with SD v1-4 / CLIP ViT-L/14 / ELITE dimensions and "
        "export it (for benchmarks; about 11 GB of disk in fp32)",
    )
    f.add_argument(
        "--out",
        default="scratch/full",
        help="directory for upstream/ (the PyTorch checkpoints) and bundle/ (the ONNX bundle)",
    )
    f.add_argument("--upstream", help="put the upstream checkpoints here instead of OUT/upstream")
    f.add_argument(
        "--fp16", action="store_true", help="fp16 weights and compute, fp32 inputs/outputs"
    )
    f.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-torch check")
    f.add_argument("--no-fuse", action="store_true", help=NO_FUSE_HELP)
    f.add_argument("--no-attention-maps", action="store_true", help=NO_MAPS_HELP)
    f.set_defaults(func=cmd_full_random)

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
