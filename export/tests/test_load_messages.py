"""Loading upstream weights says nothing alarming on success, and the manifest records every
input the same way (issue 13, point 4)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from export.models import EliteModels, load_elite
from export.tiny import CONFIGS, write_upstream

# What diffusers and transformers print on a successful load when left to guess the weight
# format, or when `accelerate` is absent: each reads like a failure.
ALARMING = [
    "An error occurred",
    "no file named",
    "Defaulting to unsafe serialization",
    "accelerate",
    "should be kept in float32",
]


@pytest.mark.parametrize("weights", ["bin", "safetensors"])
def test_loading_is_quiet_and_sources_are_uniform(
    weights: str,
    tmp_path: Path,
    tiny: EliteModels,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    paths = write_upstream(tmp_path, CONFIGS["tiny"], weights=weights)
    unet_files = {p.suffix for p in (paths["sd"] / "unet").iterdir()}
    assert (".bin" in unet_files) == (weights == "bin"), unet_files
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        models = load_elite(
            str(paths["sd"]), str(paths["clip"]), paths["global_mapper"], paths["local_mapper"]
        )
    captured = capfd.readouterr()
    said = "\n".join([caplog.text, captured.out, captured.err])
    print(f"{weights}: the load said:\n{said}")
    for text in ALARMING:
        assert text not in said, f"{weights}: {text!r} in:\n{said}"
    # The .bin path really loaded the weights: the same fixed-seed model as the fixture's.
    for mine, theirs in [(models.unet, tiny.unet), (models.text, tiny.text)]:
        a, b = next(iter(mine.state_dict().values())), next(iter(theirs.state_dict().values()))
        assert torch.equal(a, b)
    assert models.source == {
        "unet": str(paths["sd"]),
        "clip": str(paths["clip"]),
        "global_mapper": str(paths["global_mapper"]),
        "local_mapper": str(paths["local_mapper"]),
    }
