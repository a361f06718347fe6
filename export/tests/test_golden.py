"""The committed golden data is what the reference pipeline produces (regenerated from scratch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from export.golden import CASES, SHARED_STAGES, write_golden
from export.models import EliteModels

from export.paths import GOLDEN

# Same code, same weights, same machine class: fp32 results agree to the last bits except where
# thread scheduling changes summation order (1e-6 relative covers that); the uint8 image may
# flip one level where a value sits on a rounding boundary.
RTOL = 1e-5


def test_cases_cover_the_required_situations() -> None:
    doc = json.loads((GOLDEN / "cases.json").read_text())
    cases = doc["cases"]
    assert len(cases) >= 4
    assert any(c["mask"] is None for c in cases)
    assert any(c["lam"] == 0.6 for c in cases)
    assert any(c["steps"] == 100 for c in cases) and any(c["steps"] < 20 for c in cases)
    assert any((c["height"], c["width"]) == (512, 512) for c in cases)
    assert any((c["height"], c["width"]) != (512, 512) for c in cases)
    assert any(c["placeholder_index"] != c["official_word_index"] for c in cases)
    assert any(c["image"].endswith(".jpg") for c in cases)
    schedulers = {(c.get("scheduler", "lms"), c["steps"]) for c in cases}
    assert ("dpmpp-2m-karras", 20) in schedulers and ("euler-a", 15) in schedulers
    for c in cases:
        if c.get("reuses"):
            # Shared stages point at the reused case's files; the rest are the case's own.
            assert all(c["files"][k] == f"{c['reuses']}/{k}.npy" for k in SHARED_STAGES)
            own = set(c["files"]) - set(SHARED_STAGES)
            assert all(c["files"][k].startswith(f"{c['name']}/") for k in own)


def test_golden_is_reproducible(tiny: EliteModels, tmp_path: Path) -> None:
    shutil.copytree(GOLDEN / "images", tmp_path / "images")
    write_golden(tiny, tmp_path)
    committed = json.loads((GOLDEN / "cases.json").read_text())
    fresh = json.loads((tmp_path / "cases.json").read_text())
    assert fresh == committed
    for case in committed["cases"]:
        for key, rel in case["files"].items():
            a, b = np.load(GOLDEN / rel), np.load(tmp_path / rel)
            assert a.shape == b.shape and a.dtype == b.dtype, rel
            if a.dtype == np.uint8:
                diff = np.abs(a.astype(int) - b.astype(int))
                print(
                    f"{rel}: {int((diff > 0).sum())} of {diff.size} values differ (max {diff.max()})"
                )
                assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3
            else:
                err = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
                print(f"{rel}: max rel {err:.1e}")
                assert err <= RTOL, rel
    assert len(committed["cases"]) == len(CASES)


def test_reference_runs_in_another_dtype(tiny: EliteModels, tiny_upstream: Path) -> None:
    """The device/dtype path of ReferencePipeline (used fp16 on CUDA by bench/gpu.sh), exercised
    on the CPU in float64: same numbers as fp32 up to fp32 rounding, and the golden fp32 path
    unchanged. A fresh copy of the model is loaded: the pipeline moves its modules in place."""
    import torch

    from export.__main__ import load_upstream
    from export.reference import ReferencePipeline

    image = GOLDEN / "images" / "chelsea.png"
    mask = GOLDEN / "images" / "chelsea_mask.png"
    settings = dict(steps=4, height=256, width=256, record=())

    def run(pipe: ReferencePipeline) -> tuple[np.ndarray, np.ndarray]:
        timings: dict[str, list[float]] = {}
        gen = pipe.generate(pipe.encode_concept(image, mask), "a photo of S", timings=timings, **settings)  # type: ignore[arg-type]
        assert len(timings["denoise step"]) == 4 and gen.image is not None
        return gen.latents[4].double().cpu().numpy(), gen.image

    want_latents, want_image = run(ReferencePipeline(tiny))
    fresh = load_upstream(tiny_upstream, "tiny")
    got_latents, got_image = run(ReferencePipeline(fresh, "cpu", torch.float64))
    assert next(fresh.unet.parameters()).dtype == torch.float64
    rel = float(np.abs(got_latents - want_latents).max() / np.abs(want_latents).max())
    levels = np.abs(got_image.astype(int) - want_image.astype(int))
    print(f"float64 vs float32 reference: latents rel {rel:.2e}, image max {levels.max()} levels")
    assert rel <= 1e-4
    assert levels.max() <= 3 and (levels <= 1).mean() >= 0.999
