"""Export an ELITE model to a bundle: six ONNX graphs, tokenizer.json and elite.json.

Each graph is traced from its PyTorch module (opset 17, dynamic batch and latent size), then run
in ONNX Runtime against that module on fresh random inputs — at a second batch size and latent
size too, so a baked-in shape fails here and not in the runtime. Graphs over 2 GB are stored
with ONNX external data (``<graph>.onnx.data``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from .attention import EliteUNet
from .attention_maps import MapRecorder, aggregate
from .clip import CLIP_LAYERS
from .fusion import fuse_unet
from .maps_graph import add_attention_maps_file
from .shape_labels import GRAPHS as LABELLED_GRAPHS
from .shape_labels import label_shapes_file
from .graphs import Dims, GraphSpec, graph_module, graph_specs, sample_inputs
from .models import EliteModels
from .tokenizer import write_tokenizer_json

EXPORTER = "elite-ort export 0.1.0"
FORMAT_VERSION = 1
OPSET = 17
TWO_GB = 2**31 - 1
# Max |onnx - torch| / max|torch| allowed per precision. fp32 vs fp32 differs only by kernel
# summation order (~1e-6 relative); 1e-4 leaves room for the deep UNet at real size.
# fp16 graphs are compared with the fp32 module: half precision's 1e-3 per op compounds.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}


class ExportError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[export] {msg}", file=sys.stderr, flush=True)


class HalfPrecision(nn.Module):
    """Runs a module in fp16 while keeping fp32 inputs and outputs (DESIGN.md §2: fp32 I/O).

    Works on a copy: halving in place and converting back would round the caller's fp32
    weights through fp16 (the fp32 validation reference, and any later export, would change).
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(inner).half()

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        cast = [a.half() if a.is_floating_point() else a for a in args]
        return self.inner(*cast).float()


# The latent size the tracer runs the module at. The graph does not depend on it (dynamic axes;
# every graph is then checked at two other sizes), but the tracer really computes one forward
# pass: torch has no fast fp16 CPU kernels, and the full-size UNet's fp16 pass at 64×64 ran for
# over 20 minutes on 2 cores before it was stopped. fp32 keeps 64×64 (the committed tiny bundle
# is reproduced byte for byte from it).
TRACE_LATENT = {"fp32": (64, 64), "fp16": (16, 16)}


@dataclass
class ValidationResult:
    graph: str
    max_abs: float
    max_rel: float
    ok: bool


def _trace(module: nn.Module, spec: GraphSpec, inputs: dict[str, torch.Tensor], path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow on shapes
        torch.onnx.export(
            module,
            tuple(inputs[t.name] for t in spec.inputs),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes=spec.dynamic_axes(),
            do_constant_folding=True,
        )


def _save(tmp_graph: Path, dst: Path, external_over: int = TWO_GB) -> list[Path]:
    """Move a traced graph into the bundle; weights go to one external data file when the graph
    is over ``external_over`` bytes (protobuf cannot hold more than 2 GB)."""
    model = onnx.load(str(tmp_graph), load_external_data=True)
    data = dst.with_name(dst.name + ".data")
    # The size on disk, not ``model.ByteSize()``: protobuf cannot serialise (or measure) a
    # message over 2 GB, which is exactly the case to detect. The tracer writes such graphs
    # with external data files beside the .onnx.
    on_disk = sum(p.stat().st_size for p in tmp_graph.parent.iterdir())
    if on_disk > external_over or any(p.suffix != ".onnx" for p in tmp_graph.parent.iterdir()):
        onnx.save_model(
            model,
            str(dst),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        return [dst, data]
    onnx.save_model(model, str(dst))
    return [dst]


def _compare(
    spec: GraphSpec, label: str, got: np.ndarray, expected: np.ndarray, precision: str
) -> ValidationResult:
    if got.shape != expected.shape:
        raise ExportError(
            f"{spec.file}: {label}: output shape {got.shape}, torch gives {expected.shape}"
        )
    max_abs = float(np.abs(got - expected).max())
    max_rel = max_abs / max(float(np.abs(expected).max()), 1e-12)
    ok = bool(np.isfinite(got).all()) and max_rel <= TOLERANCE[precision]
    log(
        f"  check {spec.file} {label}: max abs {max_abs:.3e}, max rel {max_rel:.3e} "
        f"(tolerance {TOLERANCE[precision]:.0e}) {'ok' if ok else 'FAILED'}"
    )
    return ValidationResult(spec.name, max_abs, max_rel, ok)


def has_optional_inputs(spec: GraphSpec, session: ort.InferenceSession) -> bool:
    names = {i.name for i in session.get_inputs()}
    return bool(spec.optional_inputs) and all(t.name in names for t in spec.optional_inputs)


def validate_maps(
    spec: GraphSpec, module: nn.Module, session: ort.InferenceSession, dims: Dims, precision: str
) -> list[ValidationResult]:
    """The UNet's attention maps (asked for) against export/attention_maps.py on the module,
    and ``noise_pred`` unchanged by asking."""
    if not isinstance(module, EliteUNet):
        raise ExportError(f"{spec.file}: attention maps need the ELITE UNet module")
    results = []
    for batch, latent, seed in ((2, (32, 32), 303), (1, (40, 24), 404)):
        inputs = sample_inputs(spec, dims, batch, latent, seed, want_maps=True)
        recorder = MapRecorder()
        with torch.no_grad():
            noise = module(*(inputs[t.name] for t in spec.inputs), recorder=recorder)
            maps, gate = aggregate(recorder, latent)
        assert gate is not None  # the exported graph always runs the local branch
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
        label = f"B={batch} latent={latent} maps on"
        for name, want, have in (
            ("noise_pred", noise, got[0]),
            ("attention_maps", maps, got[1]),
            ("placeholder_gate", gate, got[2]),
        ):
            results.append(_compare(spec, f"{label} {name}", have, want.numpy(), precision))
    return results


def validate_graph(
    spec: GraphSpec, module: nn.Module, path: Path, dims: Dims, precision: str
) -> list[ValidationResult]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps = has_optional_inputs(spec, session)
    results = []
    for batch, latent, seed in ((2, (64, 64), 101), (1, (40, 24), 202)):
        inputs = sample_inputs(spec, dims, batch, latent, seed, want_maps=False if maps else None)
        with torch.no_grad():
            expected = module(*(inputs[t.name] for t in spec.inputs)).numpy()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        results.append(_compare(spec, f"B={batch} latent={latent}", got, expected, precision))
    if maps:
        results += validate_maps(spec, module, session, dims, precision)
    return results


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(
    models: EliteModels,
    dims: Dims,
    out: Path,
    files: list[Path],
    name: str,
    precision: str,
    random_weights: bool,
) -> dict[str, object]:
    vae_factor = 2 ** (len(models.vae.config.block_out_channels) - 1)
    unet_down = 2 ** (len(models.unet.config.block_out_channels) - 1)
    source = dict(models.source)
    source.update({"exporter": EXPORTER, "random_weights": random_weights})
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "precision": precision,
        "source": source,
        "dims": {
            "text_hidden": dims.text_hidden,
            "image_hidden": dims.image_hidden,
            "image_size": dims.image_size,
            "patch_grid": int(round(dims.patches**0.5)),
            "latent_channels": dims.latent_channels,
            "vae_scale_factor": vae_factor,
            "size_multiple": vae_factor * unet_down,
            "max_tokens": dims.tokens,
        },
        "clip_layers": list(CLIP_LAYERS),
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "scheduler": {
            "kind": "lms",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
        },
        "vae_scaling_factor": float(models.vae.config.scaling_factor),
        "defaults": {
            "steps": 100,
            "guidance_scale": 5.0,
            "lambda_generate": 0.8,
            "lambda_edit": 0.6,
            "placeholder": "S",
            "height": int(models.unet.config.sample_size) * vae_factor,
            "width": int(models.unet.config.sample_size) * vae_factor,
        },
        "files": {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(files, key=lambda p: p.name)
        },
    }


def export_bundle(
    models: EliteModels,
    out: Path,
    name: str,
    precision: str = "fp32",
    random_weights: bool = False,
    validate: bool = True,
    external_over: int = TWO_GB,
    fuse: bool = True,
    attention_maps: bool = True,
) -> dict[str, object]:
    """Write a complete bundle into ``out`` (created; existing bundle files are replaced).

    ``fuse``: rewrite the UNet's self-attention as fused ONNX Runtime ops (export/fusion.py);
    the check against PyTorch then runs on the fused graph. ``attention_maps``: give the UNet
    its optional attention-map input and outputs (export/maps_graph.py); without, the UNet is
    exactly what bundles exported before them had."""
    if precision not in TOLERANCE:
        raise ExportError(f"precision must be fp32 or fp16, not {precision!r}")
    out.mkdir(parents=True, exist_ok=True)
    dims = Dims.of(models)
    files: list[Path] = []
    failures: list[ValidationResult] = []
    for spec in graph_specs(dims):
        start = time.monotonic()
        log(f"exporting {spec.file} ...")
        module = graph_module(spec.name, models)
        traced = HalfPrecision(module) if precision == "fp16" else module
        with tempfile.TemporaryDirectory(prefix="elite-export-") as tmp:
            tmp_graph = Path(tmp) / spec.file
            _trace(
                traced, spec, sample_inputs(spec, dims, 2, TRACE_LATENT[precision], 0), tmp_graph
            )
            files += _save(tmp_graph, out / spec.file, external_over)
        if fuse and spec.name == "unet":
            report = fuse_unet(out / spec.file)
            log(
                f"  fused {report.self_attention} self-attention blocks into MultiHeadAttention; "
                f"{report.elite_attention} ELITE cross-attention blocks kept; "
                f"{report.nodes_before} → {report.nodes_after} nodes"
            )
        if attention_maps and spec.name == "unet":
            levels = len(models.unet.config.block_out_channels)
            count = add_attention_maps_file(
                out / spec.file, levels, dims.tokens, precision == "fp16"
            )
            log(f"  added attention maps over {count} cross-attention layers")
        if spec.name in LABELLED_GRAPHS:
            labelled = label_shapes_file(out / spec.file, spec, dims)
            log(f"  labelled {labelled} intermediate values with symbolic shapes")
        log(
            f"  wrote {spec.file} ({(out / spec.file).stat().st_size / 1e6:.1f} MB, {time.monotonic() - start:.0f} s)"
        )
        del traced  # the fp16 copy, if any
        if validate:
            # fp16 graphs are checked against the fp32 module: what the user gets vs the model.
            failures += [
                r
                for r in validate_graph(spec, module, out / spec.file, dims, precision)
                if not r.ok
            ]
    tokenizer = out / "tokenizer.json"
    write_tokenizer_json(models.tokenizer_dir, tokenizer)
    files.append(tokenizer)
    doc = manifest(models, dims, out, files, name, precision, random_weights)
    (out / "elite.json").write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out / 'elite.json'}")
    if failures:
        names = ", ".join(sorted({f.graph for f in failures}))
        raise ExportError(f"graphs over tolerance: {names} (see the checks above)")
    return doc
