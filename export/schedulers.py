"""The diffusers scheduler behind each of the runtime's scheduler names, configured as it uses them.

Every scheduler is built the way a diffusers user swaps one into Stable Diffusion v1-4:
``Class.from_config(<SD v1-4's scheduler_config.json>, **overrides)``. Keys that file sets
(betas, ``steps_offset`` 1, ``set_alpha_to_one`` false, ``clip_sample`` false) apply to every
class; everything else keeps the class's own default (``timestep_spacing`` is "leading" for DDIM,
"linspace" for the rest; ``final_sigmas_type`` "zero"; ``solver_order`` 2; UniPC's "bh2").
``src/scheduler/mod.rs`` documents the same defaults for the Rust side, and the parity fixtures
(``export/fixtures_schedulers.py``) and the golden cases (``export/golden.py``) are written with
these objects.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    UniPCMultistepScheduler,
)

# CompVis/stable-diffusion-v1-4, scheduler/scheduler_config.json (a PNDMScheduler config), with
# the keys every scheduler class reads. ``skip_prk_steps`` is PNDM's own and ignored by the others.
SD14_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

# Runtime name -> (diffusers class, overrides of the class defaults).
KINDS: dict[str, tuple[Any, dict[str, Any]]] = {
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}

# Schedulers whose ``step`` draws noise (from the ``generator`` passed to it).
STOCHASTIC = frozenset({"euler-a"})


def make_scheduler(kind: str, **overrides: Any) -> Any:
    """A fresh diffusers scheduler for a runtime scheduler name (see the module docs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown scheduler {kind!r}; valid: {', '.join(KINDS)}")
    cls, defaults = KINDS[kind]
    return cls.from_config(SD14_SCHEDULER_CONFIG, **{**defaults, **overrides})


def scales_model_input(kind: str) -> bool:
    """Whether ``scale_model_input`` divides by ``sqrt(σ² + 1)`` (σ-parameterised schedulers)."""
    return kind in ("lms", "euler", "euler-a")
