"""The committed scheduler parity fixtures are what diffusers produces (regenerated from scratch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.fixtures_schedulers import OUT, write_all


def test_scheduler_fixtures_are_reproducible(tmp_path: Path) -> None:
    """Same diffusers, torch and numpy: the schedules and steps come out bit for bit, except the
    σ table's square roots, which are MKL's and CPU-dependent (see src/scheduler/parity.rs); the
    fixtures record the table they were made with, so a regeneration elsewhere may move σ and
    the step outputs by float32 rounding, bounded here by the Rust tests' own tolerances."""
    write_all(tmp_path)
    committed = json.loads((OUT / "runs.json").read_text())
    fresh = json.loads((tmp_path / "runs.json").read_text())
    assert fresh.keys() == committed.keys()
    for section in ("runs", "schedules"):
        assert len(fresh[section]) == len(committed[section])
        for a, b in zip(fresh[section], committed[section]):
            assert (a["kind"], a["steps"], a["overrides"]) == (
                b["kind"],
                b["steps"],
                b["overrides"],
            )
            assert a["timesteps"] == b["timesteps"] or a["overrides"].get("use_karras_sigmas")
            for key in ("sigmas", "init_noise_sigma", "scale_divisors"):
                if key in b:
                    x, y = np.asarray(a[key], np.float32), np.asarray(b[key], np.float32)
                    assert np.abs(x - y).max() <= 2e-7 * np.abs(y).max(), (a["kind"], key)
    table = np.load(tmp_path / "train_sigmas.npy")
    same_table = bool((table == np.load(OUT / "train_sigmas.npy")).all())
    print(f"σ table {'identical to' if same_table else 'one ulp apart from'} the committed one")
    for name in ("inputs.npy", "fingerprints.npy", "train_log_sigmas.npy", "train_sigmas.npy"):
        if same_table or name == "inputs.npy":
            assert (np.load(tmp_path / name) == np.load(OUT / name)).all(), name
    a, b = np.load(tmp_path / "outputs.npy"), np.load(OUT / "outputs.npy")
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    print(f"step outputs: max rel {rel:.1e} ({'bit-exact' if rel == 0 else 'rounding'})")
    assert rel == 0.0 if same_table else rel <= 1e-5
