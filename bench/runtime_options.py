"""The runtime's CPU session options (``src/runtime.rs``, ``build_session``), for the bench
scripts that run a bundle's graphs from Python as the runtime runs them.

- memory pattern off (the runtime's default: same speed, lower peak);
- weights pre-packed or not, as ``src/sessions.rs``'s ``prepacks`` decides per graph (the CLI
  packs the UNet only);
- Level3 for a graph of the bundle (what a first start does), Level1 for an entry of the
  runtime's graph cache (already optimised; what a later start does, weights memory mapped).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort


def cpu_options(prepack: bool, cached: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if cached
        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    options.enable_mem_pattern = False
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def cached_graph(cache: Path, name: str) -> Path:
    """The one entry for graph file ``name`` in a graph cache the runtime filled (``cache`` is
    the runtime's cache directory, e.g. scratch/bench/cache, which ``bench/run.py`` leaves)."""
    found = sorted((cache / "graphs").glob(f"*/{name}"))
    if len(found) != 1:
        raise SystemExit(f"{cache}: expected one cached {name}, found {len(found)}")
    return found[0]
