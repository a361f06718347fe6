"""bench/flops.py counts what it claims: single nodes and tiny-bundle layers against counts by
hand, whole tiny graphs against torch's FlopCounterMode on the same modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _flops() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_flops"] = module
    spec.loader.exec_module(module)
    return module


def test_counts_match_hand_counts() -> None:
    failures = _flops().check(ROOT / "onnx" / "tiny")
    assert failures == []


def test_uncounted_gemm_like_op_is_an_error() -> None:
    flops = _flops()
    with pytest.raises(ValueError, match="not counted"):
        flops._single_node("Einsum", {"a": [2, 3], "b": [3, 4]}, equation="ij,jk->ik")


def test_local_branch_by_hand_sd_sizes() -> None:
    """SD v1-4 at 256²: the 16 attn2 layers' local K/V projections and attention products."""
    from export.tiny import FULL

    flops = _flops()
    # (queries, channels) at a 32² latent: down levels 0-2, the mid block (4²), up levels 1-3.
    layers = [(1024, 320)] * 2 + [(256, 640)] * 2 + [(64, 1280)] * 2 + [(16, 1280)]
    layers += [(64, 1280)] * 3 + [(256, 640)] * 3 + [(1024, 320)] * 3
    want = sum(2 * (2 * 256 * 768 * c + 2 * n * 256 * c) for n, c in layers)
    assert flops.local_branch_flops(FULL, flops.Run(256, 256)) == want
