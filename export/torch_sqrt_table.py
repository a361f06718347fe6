"""Where torch's float32 square root differs from the correctly rounded one on SD's σ table.

diffusers builds the LMS training σ as ``((1 - ᾱ) / ᾱ) ** 0.5`` in float32 torch. On x86 builds
torch's float32 square root is MKL's, which is not correctly rounded: 190 of SD v1's 1000 σ
come out one ulp away from ``sqrt`` in IEEE arithmetic. The Rust scheduler computes the ratio
exactly as torch does and then applies this table, so its σ — and the LMS coefficients, which
divide by σ differences — equal diffusers' bit for bit. ``python -m export.torch_sqrt_table``
prints the Rust constant for the machine it runs on.

MKL's rounding depends on the CPU it dispatches for: the committed constant (in
``src/scheduler/numerics.rs``) is the one of the machine that wrote the LMS fixtures and golden
data; on another x86 CPU (with AVX512-FP16) torch differs from IEEE in only 6 places. export/tests checks the
constant against that machine's table (``tests/fixtures/numerics/lms_train_sigmas.npy``) and that
the local torch is within one ulp of it.
"""

from __future__ import annotations

import numpy as np
import torch


def sd_v1_ratio() -> torch.Tensor:
    """``(1 - ᾱ) / ᾱ`` in float32 exactly as diffusers' LMSDiscreteScheduler computes it."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (1 - alphas_cumprod) / alphas_cumprod


def ulp_corrections() -> list[tuple[int, int]]:
    """``(index, ±1)``: torch's root is the correctly rounded one moved by that many ulps."""
    ratio = sd_v1_ratio()
    torch_root = (ratio**0.5).numpy()
    ieee_root = np.sqrt(ratio.numpy())
    delta = torch_root.view(np.int32).astype(np.int64) - ieee_root.view(np.int32).astype(np.int64)
    return [(int(i), int(delta[i])) for i in np.nonzero(delta)[0]]


def rust_constant() -> str:
    pairs = ulp_corrections()
    body = ", ".join(f"({i}, {d})" for i, d in pairs)
    return f"const TORCH_SQRT_ULPS: [(u16, i8); {len(pairs)}] = [{body}];"


if __name__ == "__main__":
    print(rust_constant())
