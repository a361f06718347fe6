"""The committed JPEG matrix (tests/fixtures/jpeg/) is what export/jpeg_matrix.py writes."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

from export.jpeg_matrix import DEFAULT_OUT, write_matrix


def test_matrix_is_reproducible(tmp_path: Path) -> None:
    fresh = write_matrix(tmp_path)
    differ = [p.name for p in fresh if not filecmp.cmp(p, DEFAULT_OUT / p.name, shallow=False)]
    assert not differ, f"rerun `python -m export.jpeg_matrix`: {differ} changed"
    committed = {p.name for p in DEFAULT_OUT.iterdir()}
    assert committed == {p.name for p in fresh}, "files that the script no longer writes"


def test_matrix_covers_the_jpegs_people_have() -> None:
    files = json.loads((DEFAULT_OUT / "matrix.json").read_text())["files"]
    decoded = [f for f in files if "rgb_sha256" in f]
    samplings = {tuple(map(tuple, f["sampling"])) for f in decoded if f["pillow_mode"] == "RGB"}
    for luma in [(1, 1), (2, 1), (2, 2), (1, 2), (4, 1)]:  # 4:4:4 4:2:2 4:2:0 4:4:0 4:1:1
        assert (luma, (1, 1), (1, 1)) in samplings, luma
    modes = {(f["pillow_mode"], f["progressive"]) for f in decoded}
    assert {("RGB", True), ("L", False), ("L", True), ("CMYK", False), ("CMYK", True)} <= modes
    assert {f["orientation"] for f in decoded} >= {1, 3, 5, 6, 8}
    assert {tuple(f["stored_size"]) for f in decoded} >= {(451, 300), (1, 1)}
    names = " ".join(f["file"] for f in files)
    for needle in ["restart", "ycck", "truncated", "corrupt", "icc"]:
        assert needle in names, needle
    total = sum(p.stat().st_size for p in DEFAULT_OUT.iterdir())
    assert total < 256 * 1024, f"the matrix is {total} bytes: keep the fixtures small"
