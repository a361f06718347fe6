"""Reference fixtures for the native numerics: LMS scheduler, torch noise, Pillow preprocessing.

Every value written here comes from the libraries the Rust side must match (diffusers, torch,
Pillow, numpy), never from the Rust code. Run from the repository root:

    /work/main/.venv/bin/python export/fixtures_numerics.py

and commit the files it writes under tests/fixtures/numerics/. Output is deterministic.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from diffusers import LMSDiscreteScheduler
from PIL import Image, ImageOps

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "numerics"

# Step counts whose sigmas, timesteps and coefficients are stored in full.
LMS_COUNTS = [1, 2, 3, 4, 5, 10, 25, 50, 100, 250, 999, 1000]
LMS_MAX_ORDER = 4

# Seeds and sizes of the torch.randn references.
RANDN_SEEDS = [0, 7, 42, 123, 2**32 + 5]
RANDN_SIZES = [1, 2, 3, 15, 16, 17, 100, 16384, 32768, 4 * 4 * 48 * 32 + 3]
RANDN_HEAD_TAIL = 64
RANDN_STRIDE = 61

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def sd_scheduler() -> LMSDiscreteScheduler:
    """The scheduler configuration of SD v1 / ELITE."""
    return LMSDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
    )


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash: a compact, exact fingerprint of a float32 array's bits."""
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def f32_bytes(values: npt.ArrayLike) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def save(name: str, array: np.ndarray) -> None:
    np.save(OUT / name, array)


def coefficient_steps(steps: int) -> list[int]:
    """Step indices whose coefficients are stored: all of them up to 100 steps, else a sample
    (the first and last 16 and every 25th) to keep the fixture small."""
    if steps <= 100:
        return list(range(steps))
    return [k for k in range(steps) if k < 16 or k >= steps - 16 or k % 25 == 0]


def exact_lms_coefficient(sigmas: np.ndarray, order: int, t: int, j: int) -> float:
    """The exact integral of the Lagrange basis polynomial, in rational arithmetic on
    diffusers' float32 sigmas (diffusers itself integrates a float32 integrand numerically)."""
    nodes = [Fraction(float(sigmas[t - k])) for k in range(order)]
    others = [nodes[m] for m in range(order) if m != j]
    # Coefficients of prod(tau - r) in increasing powers.
    poly = [Fraction(1)]
    for root in others:
        shifted = [Fraction(0)] + poly
        scaled = [-root * c for c in poly] + [Fraction(0)]
        poly = [a + b for a, b in zip(shifted, scaled)]
    denominator = Fraction(1)
    for root in others:
        denominator *= nodes[j] - root

    def antiderivative(x: Fraction) -> Fraction:
        return sum((c * x ** (p + 1) / (p + 1) for p, c in enumerate(poly)), Fraction(0))

    a, b = Fraction(float(sigmas[t])), Fraction(float(sigmas[t + 1]))
    return float((antiderivative(b) - antiderivative(a)) / denominator)


def lms_coefficient_rows(sched: LMSDiscreteScheduler, steps: int) -> list[list[float]]:
    """Rows [steps, step index, j, diffusers' get_lms_coefficient, exact integral]."""
    sigmas = sched.sigmas.numpy()
    rows = []
    for t in coefficient_steps(steps):
        order = min(t + 1, LMS_MAX_ORDER)
        for j in range(order):
            diffusers_value = sched.get_lms_coefficient(order, t, j)
            exact = exact_lms_coefficient(sigmas, order, t, j)
            rows.append([float(steps), float(t), float(j), diffusers_value, exact])
    return rows


def write_lms() -> None:
    sched = sd_scheduler()
    sigmas: list[np.ndarray] = []
    timesteps: list[np.ndarray] = []
    coeff_rows: list[list[float]] = []
    init_sigma: list[float] = []
    for steps in LMS_COUNTS:
        sched.set_timesteps(steps)
        sigmas.append(sched.sigmas.numpy().astype(np.float32))
        timesteps.append(sched.timesteps.numpy().astype(np.float32))
        init_sigma.append(float(sched.init_noise_sigma))
        coeff_rows.extend(lms_coefficient_rows(sched, steps))
    save("lms_counts.npy", np.array(LMS_COUNTS, dtype=np.int64))
    save("lms_sigmas.npy", np.concatenate(sigmas))
    save("lms_timesteps.npy", np.concatenate(timesteps))
    save("lms_coefficients.npy", np.array(coeff_rows, dtype=np.float64))
    save("lms_init_noise_sigma.npy", np.array(init_sigma, dtype=np.float32))

    # Every step count 1..=1000, as FNV-1a fingerprints of the float32 bits: a bit-exact check
    # of the whole family in 16 KB instead of 2 MB of values.
    hashes = np.zeros((1000, 2), dtype=np.uint64)
    for steps in range(1, 1001):
        sched.set_timesteps(steps)
        hashes[steps - 1, 0] = fnv1a64(f32_bytes(sched.sigmas.numpy()))
        hashes[steps - 1, 1] = fnv1a64(f32_bytes(sched.timesteps.numpy()))
    save("lms_hashes.npy", hashes)

    # The training sigma table (what set_timesteps interpolates), float32 as torch computes it.
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    save("lms_train_sigmas.npy", table.numpy().astype(np.float32))

    write_lms_steps(sched)


def write_lms_steps(sched: LMSDiscreteScheduler) -> None:
    """A few full denoising runs through diffusers' step() on fixed random inputs."""
    rng = np.random.default_rng(20230817)
    for steps, run in [(10, 10), (100, 6)]:
        sched.set_timesteps(steps)
        numel = 64
        sample0 = (rng.standard_normal(numel) * float(sched.init_noise_sigma)).astype(np.float32)
        eps = rng.standard_normal((run, numel)).astype(np.float32)
        x = torch.from_numpy(sample0.copy())
        outputs = []
        for i in range(run):
            t = sched.timesteps[i]
            sched.scale_model_input(x, t)
            x = sched.step(torch.from_numpy(eps[i]), t, x).prev_sample
            outputs.append(x.numpy().copy())
        save(f"lms_step{steps}_sample0.npy", sample0)
        save(f"lms_step{steps}_noise_pred.npy", eps)
        save(f"lms_step{steps}_samples.npy", np.stack(outputs).astype(np.float32))


def kept_indices(numel: int) -> np.ndarray:
    """Which elements of a randn draw are stored: the first and last 64 (the last 16 are the
    redrawn tail block) and every 61st, enough to pin the layout without storing 100 KB."""
    i = np.arange(numel)
    return i[(i < RANDN_HEAD_TAIL) | (i + RANDN_HEAD_TAIL >= numel) | (i % RANDN_STRIDE == 0)]


def randn_reference(seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(cases [seed, size, kept count], kept values) for torch.randn in this process."""
    cases: list[list[int]] = []
    values: list[np.ndarray] = []
    for seed in seeds:
        for numel in RANDN_SIZES:
            torch.manual_seed(seed)
            draw = torch.randn(numel, dtype=torch.float32).numpy()
            kept = kept_indices(numel)
            cases.append([seed, numel, len(kept)])
            values.append(draw[kept])
    return np.array(cases, dtype=np.int64), np.concatenate(values).astype(np.float32)


def write_randn() -> None:
    cases, values = randn_reference(RANDN_SEEDS)
    save("randn_cases.npy", cases)
    save("randn_values.npy", values)
    # x86 torch (AVX2 and AVX512 alike) draws with its vectorised kernel; builds without it use
    # a scalar one. Record that from a child process pinned to the generic kernel (the
    # capability is fixed when torch loads).
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import fixtures_numerics as f; "
        "import torch; "
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'; "
        "c, v = f.randn_reference([0, 42]); "
        "f.save('randn_cases_generic.npy', c); f.save('randn_values_generic.npy', v)"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    here = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-c", script, here], env=env, check=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    sections = sys.argv[1:] or ["lms", "randn", "preprocess"]
    if "lms" in sections:
        write_lms()
    if "randn" in sections:
        write_randn()


if __name__ == "__main__":
    main()
