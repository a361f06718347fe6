"""Where the repository keeps the committed artefacts that export/ produces."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_BUNDLE = REPO / "onnx" / "tiny"
GOLDEN = REPO / "tests" / "golden"
