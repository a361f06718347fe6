"""The committed tiny bundle: every graph against its PyTorch module, and reproducibility."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.exporter import TOLERANCE, export_bundle, sha256_file
from export.graphs import Dims, graph_module, graph_specs, sample_inputs
from export.models import EliteModels

from export.paths import TINY_BUNDLE

SPECS = graph_specs(Dims(text_hidden=16, image_hidden=32))


def manifest() -> dict:
    return json.loads((TINY_BUNDLE / "elite.json").read_text())


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_graph_matches_pytorch(spec, tiny: EliteModels) -> None:
    dims = Dims.of(tiny)
    module = graph_module(spec.name, tiny)
    session = ort.InferenceSession(str(TINY_BUNDLE / spec.file), providers=["CPUExecutionProvider"])
    for batch, latent, seed in ((2, (64, 64), 7), (3, (24, 40), 8)):
        # Maps off (their parity: test_attention_maps.py).
        inputs = sample_inputs(spec, dims, batch, latent, seed, want_maps=False)
        with torch.no_grad():
            want = module(*(inputs[t.name] for t in spec.inputs)).numpy()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        print(
            f"{spec.file} B={batch} latent={latent}: max abs {np.abs(got - want).max():.2e}, rel {rel:.2e}"
        )
        assert got.shape == want.shape
        assert rel <= TOLERANCE["fp32"]


def test_onnx_lambda_zero_and_per_sample_max(tiny: EliteModels) -> None:
    """In the exported graph: batch rows are independent and λ = 0 rows are global-only."""
    dims = Dims.of(tiny)
    spec = next(s for s in SPECS if s.name == "unet")
    session = ort.InferenceSession(
        str(TINY_BUNDLE / "unet.onnx"), providers=["CPUExecutionProvider"]
    )
    x = {
        k: v.numpy() for k, v in sample_inputs(spec, dims, 2, (32, 32), 9, want_maps=False).items()
    }
    x["local_lambda"] = np.array([0.8, 0.0], dtype=np.float32)
    both = session.run(None, x)[0]
    row = lambda i: {k: v[i : i + 1] for k, v in x.items()}  # noqa: E731
    singles = np.concatenate([session.run(None, row(i))[0] for i in range(2)])
    err = float(np.abs(both - singles).max())
    print(f"onnx batch 2 vs 2× batch 1: max abs {err:.2e}")
    assert err <= 1e-5 * float(np.abs(singles).max())
    module = graph_module("unet", tiny)
    with torch.no_grad():
        global_only = module(
            *(torch.from_numpy(x[k][1:]) for k in ("sample", "timestep", "encoder_hidden_states"))
        ).numpy()
    err = float(np.abs(both[1:] - global_only).max())
    print(f"onnx λ=0 row vs torch global-only: max abs {err:.2e}")
    assert err <= TOLERANCE["fp32"] * float(np.abs(global_only).max())


def test_manifest_lists_every_file_with_its_hash() -> None:
    doc = manifest()
    assert doc["format_version"] == 1 and doc["source"]["random_weights"] is True
    names = {p.name for p in TINY_BUNDLE.iterdir() if p.name != "elite.json"}
    assert set(doc["files"]) == names
    for name, entry in doc["files"].items():
        path = TINY_BUNDLE / name
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path), f"{name} changed after export"


def test_tiny_bundle_is_reproducible(tiny: EliteModels, tmp_path: Path) -> None:
    """Exporting the regenerated tiny model gives the committed bundle byte for byte."""
    export_bundle(tiny, tmp_path, "elite-tiny", "fp32", random_weights=True, validate=False)
    fresh = json.loads((tmp_path / "elite.json").read_text())
    committed = manifest()
    # `source` names the temporary upstream directory's files only; everything else must match.
    assert {k: v for k, v in fresh.items() if k != "source"} == {
        k: v for k, v in committed.items() if k != "source"
    }
    for name, entry in committed["files"].items():
        assert fresh["files"][name]["sha256"] == entry["sha256"], f"{name} differs"


def test_repo_budget() -> None:
    """onnx/tiny + tests/golden stay under 25 MB (the repo must stay small)."""
    root = TINY_BUNDLE.parents[1]
    total = sum(
        p.stat().st_size
        for d in (TINY_BUNDLE, root / "tests" / "golden")
        for p in d.rglob("*")
        if p.is_file()
    )
    print(f"onnx/tiny + tests/golden: {total / 1e6:.1f} MB")
    assert total <= 25 * 1024 * 1024


def test_unet_self_attention_is_fused_and_elite_attention_kept() -> None:
    """export/fusion.py: every attn1 is one MultiHeadAttention; ELITE's attn2 is untouched."""
    model = onnx.load(str(TINY_BUNDLE / "unet.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    print(dict(ops.most_common(8)))
    assert ops["MultiHeadAttention"] == 16  # SD v1's 16 transformer blocks
    assert ops["Attention"] == 0
    # Per attn2: the placeholder column (GatherElements), the per-sample max (ReduceMax), and
    # two softmaxes (global and local branch), as exported; the attention maps' own ReduceMax
    # (export/maps_graph.py) is named `maps/…`.
    elite_max = [n for n in model.graph.node if n.op_type == "ReduceMax" and "maps/" not in n.name]
    assert ops["GatherElements"] == len(elite_max) == 16
    assert ops["Softmax"] == 32


def test_fp16_bundle_with_external_data(tiny: EliteModels, tmp_path: Path) -> None:
    """--fp16 keeps fp32 I/O and passes its own validation; external data (forced here by a
    zero threshold, used for real graphs over 2 GB) is listed in the manifest and loads."""
    doc = export_bundle(tiny, tmp_path, "elite-tiny-fp16", "fp16", external_over=0)
    assert doc["precision"] == "fp16"
    files = doc["files"]
    assert isinstance(files, dict)
    assert "unet.onnx.data" in files and (tmp_path / "unet.onnx.data").is_file()
    session = ort.InferenceSession(str(tmp_path / "unet.onnx"), providers=["CPUExecutionProvider"])
    assert [i.type for i in session.get_inputs()] == [
        "tensor(float)",
        "tensor(float)",
        "tensor(float)",
        "tensor(float)",
        "tensor(int64)",
        "tensor(float)",
        "tensor(int64)",  # want_attention_maps
    ]
    try:
        export_bundle(tiny, tmp_path / "bad", "x", "fp8")
    except Exception as exc:  # noqa: BLE001 - the type is part of what is checked below
        assert "fp32 or fp16" in str(exc)
    else:
        raise AssertionError("fp8 accepted")


def test_fp16_export_leaves_the_fp32_model_untouched(tiny: EliteModels) -> None:
    """The fp16 path works on copies: the session's fp32 weights must be bit-identical after."""
    from export.exporter import HalfPrecision

    before = {k: v.clone() for k, v in tiny.global_mapper.state_dict().items()}
    HalfPrecision(tiny.global_mapper)
    after = tiny.global_mapper.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)
