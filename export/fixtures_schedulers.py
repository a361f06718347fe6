"""Parity fixtures for every scheduler of the runtime, from diffusers' own scheduler objects.

For each scheduler name (``export/schedulers.py``) and step count in ``COUNTS`` this records what
diffusers 0.42.1 computes on its float32 path: the timesteps, σ, ``init_noise_sigma``, the divisor
``scale_model_input`` applies at each step, and a whole denoising run through ``step`` on fixed
random model outputs (multistep state and, for euler-a, a seeded CPU ``torch.Generator``
included). A few runs and schedules with other config values (timestep spacings, solver order 1,
``final_sigmas_type="sigma_min"``, Karras σ) cover the keys the runtime exposes, and SHA-256
fingerprints cover the timesteps and σ of every step count 1..1000. Nothing here is computed by
the Rust code under test. Run from the repository root:

    .venv/bin/python -m export.fixtures_schedulers

and commit ``tests/fixtures/schedulers/``. Output is deterministic (``export/tests`` checks that
regenerating it reproduces the committed files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .paths import REPO
from .schedulers import KINDS, STOCHASTIC, make_scheduler, scales_model_input

OUT = REPO / "tests" / "fixtures" / "schedulers"

COUNTS = (1, 2, 10, 20, 25, 50, 100)
# Model outputs and samples are [1, 4, 3, 3]: 36 values, at least 16 and not a multiple of 16, so
# euler-a's per-step torch.randn takes torch's vectorised path including its tail block.
SHAPE = (1, 4, 3, 3)
INPUT_SEED = 20231001  # numpy Generator for the initial noise and the model outputs
GENERATOR_SEED = 1234  # torch.Generator("cpu").manual_seed for euler-a's per-step noise
HASH_COUNTS = range(1, 1001)

# (name, scheduler, overrides, step counts with a full run) beyond each scheduler's defaults.
VARIANT_RUNS: tuple[tuple[str, str, dict[str, Any], tuple[int, ...]], ...] = (
    ("dpmpp-2m order 1", "dpmpp-2m", {"solver_order": 1}, (10,)),
    ("dpmpp-2m sigma_min", "dpmpp-2m", {"final_sigmas_type": "sigma_min"}, (10, 20)),
    ("dpmpp-2m-karras sigma_min", "dpmpp-2m-karras", {"final_sigmas_type": "sigma_min"}, (20,)),
    ("unipc order 1", "unipc", {"solver_order": 1}, (10,)),
    ("unipc sigma_min", "unipc", {"final_sigmas_type": "sigma_min"}, (10, 20)),
    ("unipc karras", "unipc", {"use_karras_sigmas": True}, (20,)),
    ("euler karras", "euler", {"use_karras_sigmas": True}, (20,)),
    ("euler sigma_min", "euler", {"final_sigmas_type": "sigma_min"}, (10,)),
)
SPACINGS = ("linspace", "leading", "trailing")
# Schedulers whose schedule depends on timestep_spacing (LMS is linspace-only in the runtime).
SPACED = ("dpmpp-2m", "euler", "euler-a", "ddim", "unipc")


def digest32(data: bytes) -> int:
    """The first four bytes of SHA-256 (little-endian): a compact, exact fingerprint."""
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "little")


def f32_bytes(values: torch.Tensor) -> bytes:
    return np.ascontiguousarray(values.numpy(), dtype="<f4").tobytes()


def floats(values: torch.Tensor | np.ndarray) -> list[float]:
    """float32 values as JSON numbers (repr of the exact double: round-trips the float32)."""
    array = values.numpy() if isinstance(values, torch.Tensor) else values
    return [float(v) for v in np.asarray(array, dtype=np.float32)]


def has_sigmas(kind: str) -> bool:
    return kind != "ddim"


def schedule(kind: str, steps: int, overrides: dict[str, Any]) -> dict[str, Any]:
    """Timesteps, σ and ``init_noise_sigma`` after ``set_timesteps(steps)``."""
    sched = make_scheduler(kind, **overrides)
    sched.set_timesteps(steps)
    entry: dict[str, Any] = {
        "kind": kind,
        "overrides": overrides,
        "steps": steps,
        "timesteps": floats(sched.timesteps.to(torch.float32)),
        "init_noise_sigma": float(sched.init_noise_sigma),
    }
    if has_sigmas(kind):
        entry["sigmas"] = floats(sched.sigmas)
    return entry


@dataclass
class Inputs:
    """The initial noise (unscaled) and one model output per step, shared by every scheduler."""

    noise: dict[int, np.ndarray] = field(default_factory=dict)
    eps: dict[int, np.ndarray] = field(default_factory=dict)

    def get(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        if steps not in self.noise:
            rng = np.random.default_rng(INPUT_SEED + steps)
            self.noise[steps] = rng.standard_normal(SHAPE).astype(np.float32)
            self.eps[steps] = rng.standard_normal((steps, *SHAPE)).astype(np.float32)
        return self.noise[steps], self.eps[steps]


def scale_divisor(sched: Any, kind: str, sample: torch.Tensor, t: torch.Tensor) -> float:
    """The divisor ``scale_model_input`` applies at this step, checked against the call itself."""
    scaled = sched.scale_model_input(sample, t)
    if not scales_model_input(kind):
        assert torch.equal(scaled, sample), kind
        return 1.0
    sigma = sched.sigmas[sched.step_index]
    divisor = (sigma**2 + 1) ** 0.5
    assert torch.equal(scaled, sample / divisor), kind
    return float(divisor)


def run(
    kind: str, steps: int, overrides: dict[str, Any], inputs: Inputs
) -> tuple[dict, np.ndarray]:
    """A whole denoising loop as diffusers' Stable Diffusion pipeline drives the scheduler."""
    entry = schedule(kind, steps, overrides)
    sched = make_scheduler(kind, **overrides)
    sched.set_timesteps(steps)
    noise, eps = inputs.get(steps)
    sample = torch.from_numpy(noise) * sched.init_noise_sigma
    kwargs: dict[str, Any] = {}
    if kind in STOCHASTIC:
        kwargs["generator"] = torch.Generator("cpu").manual_seed(GENERATOR_SEED)
        entry["generator_seed"] = GENERATOR_SEED
    divisors: list[float] = []
    outputs: list[np.ndarray] = []
    for k, t in enumerate(sched.timesteps):
        divisors.append(scale_divisor(sched, kind, sample, t))
        sample = sched.step(torch.from_numpy(eps[k]), t, sample, **kwargs).prev_sample
        outputs.append(sample.numpy().copy())
    entry["scale_divisors"] = divisors
    return entry, np.stack(outputs).reshape(steps, -1).astype(np.float32)


def fingerprints() -> np.ndarray:
    """``[scheduler (KINDS order), step count 1..1000, 3]`` uint32: the number of timesteps and
    the digests of the float32 timesteps and σ (0 for DDIM, which has no σ)."""
    out = np.zeros((len(KINDS), len(HASH_COUNTS), 3), dtype=np.uint32)
    for i, kind in enumerate(KINDS):
        sched = make_scheduler(kind)
        for j, steps in enumerate(HASH_COUNTS):
            sched.set_timesteps(steps)
            out[i, j, 0] = len(sched.timesteps)
            out[i, j, 1] = digest32(f32_bytes(sched.timesteps.to(torch.float32)))
            if has_sigmas(kind):
                out[i, j, 2] = digest32(f32_bytes(sched.sigmas))
    return out


def train_sigmas() -> np.ndarray:
    """The training σ table every σ-parameterised scheduler interpolates, float32 as torch
    computes it on this machine: its square roots are MKL's, whose rounding depends on the CPU,
    so the Rust tests also build on this exact table to check everything else bit for bit."""
    sched = make_scheduler("dpmpp-2m-karras")
    table = (((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5).numpy()
    assert table.dtype == np.float32
    return table


def write_all(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    inputs = Inputs()
    runs: list[dict[str, Any]] = []
    blocks: list[np.ndarray] = []
    row = 0

    def add_run(name: str, kind: str, steps: int, overrides: dict[str, Any]) -> None:
        nonlocal row
        entry, outputs = run(kind, steps, overrides, inputs)
        entry["name"] = name
        entry["output_row"] = row
        runs.append(entry)
        blocks.append(outputs)
        row += steps

    for kind in KINDS:
        for steps in COUNTS:
            print(f"[fixtures] {kind}: {steps} steps", file=sys.stderr, flush=True)
            add_run(kind, kind, steps, {})
    for name, kind, overrides, counts in VARIANT_RUNS:
        for steps in counts:
            add_run(name, kind, steps, overrides)

    schedules = [
        schedule(kind, steps, {"timestep_spacing": spacing})
        for kind in SPACED
        for spacing in SPACINGS
        for steps in COUNTS
    ]
    schedules += [schedule("ddim", steps, {"steps_offset": 0}) for steps in COUNTS]
    # numpy's arange length rule gives `trailing` one timestep more at some counts (61 is the
    # first); diffusers runs them all.
    schedules += [schedule(kind, 61, {"timestep_spacing": "trailing"}) for kind in SPACED]

    input_rows = [np.concatenate([inputs.get(n)[0][None], inputs.get(n)[1]]) for n in COUNTS]
    used_counts = sorted({entry["steps"] for entry in runs})
    assert used_counts == sorted(COUNTS), "every run uses one of the shared input blocks"
    np.save(out / "inputs.npy", np.concatenate(input_rows).reshape(-1, int(np.prod(SHAPE))))
    np.save(out / "outputs.npy", np.concatenate(blocks))
    doc = {
        "generator": "python -m export.fixtures_schedulers (diffusers' scheduler objects)",
        "versions": {"diffusers": _version("diffusers"), "torch": torch.__version__},
        "shape": list(SHAPE),
        "counts": list(COUNTS),
        "inputs": "inputs.npy: per count in `counts`, the unscaled initial noise then one model "
        "output per step, each row flattened",
        "outputs": "outputs.npy: per run, the sample after each step, from row `output_row`",
        "input_seed": INPUT_SEED,
        "fingerprints": "fingerprints.npy: [scheduler in `kinds` order, step count 1..1000, 3] "
        "uint32: number of timesteps, SHA-256[:4] (little-endian) of the float32 timesteps, of "
        "the float32 sigmas (0 without sigmas)",
        "kinds": list(KINDS),
        "train_sigmas": "train_sigmas.npy: torch's float32 training σ table on this machine",
        "train_log_sigmas": "train_log_sigmas.npy: numpy's float32 log of it",
        "runs": runs,
        "schedules": schedules,
    }
    (out / "runs.json").write_text(json.dumps(doc, indent=1) + "\n")
    np.save(out / "fingerprints.npy", fingerprints())
    table = train_sigmas()
    np.save(out / "train_sigmas.npy", table)
    # numpy's float32 log of it, as ``_sigma_to_t`` interpolates (Karras timesteps): numpy's own
    # SIMD logarithm, not a correctly rounded one.
    np.save(out / "train_log_sigmas.npy", np.log(table))


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    write_all(args.out)


if __name__ == "__main__":
    main()
