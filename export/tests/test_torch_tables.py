"""Constants the Rust runtime carries from torch's behaviour still match torch."""

from __future__ import annotations

import re

from export.paths import REPO
from export.torch_sqrt_table import ulp_corrections


def test_rust_sqrt_rounding_table_matches_torch() -> None:
    source = (REPO / "src" / "scheduler.rs").read_text()
    block = re.search(r"const TORCH_SQRT_ULPS: \[\(u16, i8\); (\d+)\] = \[(.*?)\];", source, re.S)
    assert block, "TORCH_SQRT_ULPS not found in src/scheduler.rs"
    pairs = [(int(i), int(d)) for i, d in re.findall(r"\((\d+),\s*(-?\d+)\)", block.group(2))]
    assert int(block.group(1)) == len(pairs)
    expected = ulp_corrections()
    print(f"torch's float32 sqrt differs from IEEE on {len(expected)} of SD v1's 1000 σ")
    assert pairs == expected
