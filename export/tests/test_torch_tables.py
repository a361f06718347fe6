"""Constants the Rust runtime carries from torch's behaviour still match torch."""

from __future__ import annotations

import re

import numpy as np

from export.paths import REPO
from export.torch_sqrt_table import sd_v1_ratio, ulp_corrections

# torch's float32 SD v1 σ table on the machine that wrote the LMS fixtures (and the golden data).
REFERENCE_TABLE = REPO / "tests" / "fixtures" / "numerics" / "lms_train_sigmas.npy"


def rust_table() -> list[tuple[int, int]]:
    source = (REPO / "src" / "scheduler" / "numerics.rs").read_text()
    block = re.search(r"const TORCH_SQRT_ULPS: \[\(u16, i8\); (\d+)\] = \[(.*?)\];", source, re.S)
    assert block, "TORCH_SQRT_ULPS not found in src/scheduler/numerics.rs"
    pairs = [(int(i), int(d)) for i, d in re.findall(r"\((\d+),\s*(-?\d+)\)", block.group(2))]
    assert int(block.group(1)) == len(pairs)
    return pairs


def ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64)


def test_rust_sqrt_rounding_table_matches_the_reference_torch() -> None:
    """The Rust table turns IEEE roots into the reference machine's torch roots, and this
    machine's torch is within one ulp of them. torch's float32 root is MKL's, whose rounding
    depends on the CPU (on the reference machine 190 of the 1000 σ differ from IEEE ``sqrt``, on
    another x86 CPU with AVX512-FP16 6), so the committed reference, not this machine, defines
    the table."""
    reference = np.load(REFERENCE_TABLE)
    ieee = np.sqrt(sd_v1_ratio().numpy())
    delta = ulps(reference, ieee)
    expected = [(int(i), int(delta[i])) for i in np.nonzero(delta)[0]]
    assert rust_table() == expected
    live = (sd_v1_ratio() ** 0.5).numpy()
    apart = ulps(live, reference)
    print(
        f"torch's float32 sqrt differs from IEEE on {len(ulp_corrections())} of SD v1's 1000 σ "
        f"here and on {len(expected)} on the reference machine; the two tables differ by one ulp "
        f"in {int((apart != 0).sum())} places"
    )
    assert np.abs(apart).max() <= 1
