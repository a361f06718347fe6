"""The PyTorch reference pipeline: ELITE inference exactly as the official scripts do it.

DESIGN.md §1 in code: Pillow preprocessing, five CLIP features, the two mappers,
word injection, LMS from diffusers, **two separate batch-1 UNet calls per step** (conditional with
the local branch and λ, unconditional with the global K/V only), torch CPU noise, VAE decode and
uint8 rounding. ``scheduler`` swaps LMS for another of the runtime's schedulers, as diffusers' own
scheduler object (``export/schedulers.py``); its noise comes from one CPU ``torch.Generator``
seeded with ``seed``, which draws the initial latents and then euler-a's per-step noise, as
diffusers' pipeline does with ``generator=torch.Generator("cpu").manual_seed(seed)``. It runs in fp32 on the CPU by default (the golden data); ``device`` and ``dtype``
run it as upstream does, fp16 on CUDA, for the GPU benchmark. The batched Rust runtime is checked
against these unbatched semantics through the golden data this produces.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPTokenizer

from .attention import EliteUNet
from .attention_maps import MapRecorder, aggregate
from .clip import ImageEncoder, TextEncoder
from .models import EliteModels
from .schedulers import STOCHASTIC, make_scheduler

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_rgb(path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8, as the official dataset reads images (mode conversion only)."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))


def load_mask01(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W, 3]`` 0/1 uint8. A one-channel mask counts as three channels; no mask = all ones."""
    if path is None:
        return np.ones((*shape, 3), dtype=np.uint8)
    with Image.open(path) as img:
        mask = np.array(img.convert("RGB"))
    if mask.shape[:2] != shape:
        raise ValueError(
            f"{path}: mask is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}"
        )
    return (mask > 0).astype(np.uint8)


def clip_pixels(rgb: np.ndarray, size: int = 224) -> torch.Tensor:
    """Squash to ``size``² with Pillow bicubic, ToTensor (/255), Normalize: ``[3, size, size]``."""
    resized = Image.fromarray(rgb.astype(np.uint8)).resize(
        (size, size), resample=Image.Resampling.BICUBIC
    )
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return x.sub(mean).div(std)


def mask_grid(mask01: np.ndarray, grid: int = 16) -> torch.Tensor:
    """The official two-step nearest resize (→128² → 16²) of mask channel 0, flattened: ``[grid²]``."""
    seg = torch.from_numpy(mask01.astype(np.float32)).permute(2, 0, 1)[None]
    seg = F.interpolate(seg, size=(128, 128), mode="nearest")
    seg = F.interpolate(seg, size=(grid, grid), mode="nearest")
    return seg[0, 0].reshape(-1)


def word_index(prompt: str, placeholder: str) -> int:
    """The official rule: last whitespace word equal to the placeholder, +1 for BOS; else 0."""
    index = 0
    for i, word in enumerate(prompt.split(" ")):
        if word == placeholder:
            index = i + 1
    return index


def token_index(ids: list[int], placeholder_id: int) -> int:
    """DESIGN.md's rule: last position of the placeholder token; absent is an error."""
    hits = [i for i, t in enumerate(ids) if t == placeholder_id]
    if not hits:
        raise ValueError("prompt does not contain the placeholder")
    return hits[-1]


Timings = dict[str, list[float]]


@contextmanager
def _timed(
    timings: Timings | None, stage: str, sync: Callable[[], None] | None = None
) -> Iterator[None]:
    """Adds the block's wall-clock seconds to ``timings[stage]`` (benchmarks; None = off).
    ``sync`` waits for queued device work (CUDA runs asynchronously) before each clock read."""
    if timings is not None and sync is not None:
        sync()
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            if sync is not None:
                sync()
            timings.setdefault(stage, []).append(time.perf_counter() - start)


@dataclass
class Concept:
    pixels_global: torch.Tensor  # [1, 3, 224, 224]
    pixels_local: torch.Tensor  # [1, 3, 224, 224]
    mask_grid: torch.Tensor  # [1, 256]
    word_embeddings: torch.Tensor  # [1, 5, C_txt]
    local_embeddings: torch.Tensor  # [1, 256, C_txt], already × mask grid


@dataclass
class Generation:
    input_ids: torch.Tensor
    placeholder_index: int
    text_cond: torch.Tensor
    text_uncond: torch.Tensor
    init_latents: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    latents: dict[int, torch.Tensor] = field(default_factory=dict)  # after step k (1-based)
    image: np.ndarray | None = None  # [H, W, 3] uint8
    # With ``attention_maps``: the conditional call's maps [1, T, h, w] and placeholder gate
    # [1, 1, h, w] of every step, in step order (export/attention_maps.py).
    attention_maps: list[torch.Tensor] = field(default_factory=list)
    placeholder_gates: list[torch.Tensor] = field(default_factory=list)


class ReferencePipeline:
    """``device``/``dtype``: where and in what precision the modules run (default: CPU fp32, as
    the golden data). The modules of ``models`` are moved in place. Noise is always drawn on the
    CPU in fp32, as the official scripts do, then moved."""

    def __init__(
        self,
        models: EliteModels,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.models = models
        self.device = torch.device(device)
        self.dtype = dtype
        for module in (models.vision, models.text, models.unet, models.vae):
            # Cast only when needed: diffusers' ModelMixin.to(dtype) warns about fp32-only
            # modules even when it has none (SD's UNet and VAE have none).
            if next(module.parameters()).dtype != dtype:
                module.to(dtype=dtype)
            module.to(self.device)
        for mapper in (models.global_mapper, models.local_mapper):
            mapper.to(self.device, dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(models.tokenizer_dir)
        self.image_encoder = ImageEncoder(models.vision).eval()
        self.text_encoder = TextEncoder(models.text).eval()
        self.unet = EliteUNet(models.unet).eval()
        self._sync = torch.cuda.synchronize if self.device.type == "cuda" else None

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        """A float input on the pipeline's device and dtype (integers keep their type)."""
        if x.is_floating_point():
            return x.to(self.device, self.dtype)
        return x.to(self.device)

    @torch.no_grad()
    def encode_concept(
        self, image: Path, mask: Path | None, timings: Timings | None = None
    ) -> Concept:
        with _timed(timings, "preprocess"):
            rgb = load_rgb(image)
            mask01 = load_mask01(mask, rgb.shape[:2])
            pixels_global = clip_pixels(rgb)[None]
            pixels_local = clip_pixels(rgb * mask01)[None]
            grid = mask_grid(mask01)[None]
        with _timed(timings, "encode concept", self._sync):
            encode = self.image_encoder
            words = self.models.global_mapper(encode(self._to(pixels_global)))
            local = self.models.local_mapper(encode(self._to(pixels_local)), self._to(grid))
        return Concept(pixels_global, pixels_local, grid, words, local)

    def tokenize(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(
            prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids

    def placeholder_index(self, prompt: str, placeholder: str, rule: str = "token") -> int:
        if rule == "word":
            return word_index(prompt, placeholder)
        ids = self.tokenizer(placeholder, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"placeholder {placeholder!r} is {len(ids)} tokens, must be one")
        return token_index(self.tokenize(prompt)[0].tolist(), ids[0])

    @torch.no_grad()
    def generate(
        self,
        concept: Concept,
        prompt: str,
        placeholder: str = "S",
        seed: int = 42,
        steps: int = 100,
        guidance: float = 5.0,
        lam: float = 0.8,
        height: int = 512,
        width: int = 512,
        index_rule: str = "token",
        record: tuple[int, ...] = (1, 2),
        timings: Timings | None = None,
        scheduler: str = "lms",
        attention_maps: bool = False,
    ) -> Generation:
        """``timings`` (optional) receives seconds per stage: "encode text", "denoise step" (one
        entry per step: both UNet calls and the scheduler), "denoise", "decode". ``scheduler``
        is a runtime scheduler name (``export/schedulers.py``). ``attention_maps``: record the
        conditional call's maps at every step (recording does not change what the UNet
        computes)."""
        with _timed(timings, "encode text", self._sync):
            ids = self.tokenize(prompt)
            index = self.placeholder_index(prompt, placeholder, index_rule)
            idx = self._to(torch.tensor([index]))
            cond = self.text_encoder(self._to(ids), concept.word_embeddings[:, 0], idx)
            uncond = self.text_encoder(self._to(self.tokenize("")))
        sampler = make_scheduler(scheduler)
        sampler.set_timesteps(steps)
        factor = 2 ** (len(self.models.vae.config.block_out_channels) - 1)
        shape = (1, self.models.unet.config.in_channels, height // factor, width // factor)
        # Equal to torch.manual_seed(seed); torch.randn(shape), the official scripts' noise.
        generator = torch.Generator("cpu").manual_seed(seed)
        noise = torch.randn(shape, generator=generator)
        latents = self._to(noise * sampler.init_noise_sigma)
        step_kwargs = {"generator": generator} if scheduler in STOCHASTIC else {}
        out = Generation(
            ids,
            index,
            cond,
            uncond,
            latents.clone(),
            sampler.timesteps.clone(),
            getattr(sampler, "sigmas", torch.zeros(0)).clone(),
        )
        lam_t = self._to(torch.tensor([lam]))
        with _timed(timings, "denoise", self._sync):
            last = len(sampler.timesteps)
            for k, t in enumerate(sampler.timesteps, start=1):
                with _timed(timings, "denoise step", self._sync):
                    x_in = sampler.scale_model_input(latents, t)
                    recorder = MapRecorder() if attention_maps else None
                    eps_cond = self.unet(
                        x_in, t, cond, concept.local_embeddings, idx, lam_t, recorder=recorder
                    )
                    if recorder is not None:
                        maps, gate = aggregate(recorder, (shape[2], shape[3]))
                        assert gate is not None  # the conditional call has the local branch
                        out.attention_maps.append(maps.float().cpu())
                        out.placeholder_gates.append(gate.float().cpu())
                    x_in = sampler.scale_model_input(latents, t)
                    eps_uncond = self.unet(x_in, t, uncond)
                    eps = eps_uncond + guidance * (eps_cond - eps_uncond)
                    latents = sampler.step(eps, t, latents, **step_kwargs).prev_sample
                if k in record or k == last:
                    out.latents[k] = latents.clone()
        with _timed(timings, "decode", self._sync):
            vae = self.models.vae
            decoded = vae.decode(latents / vae.config.scaling_factor).sample
            pixels = (decoded.float().cpu() / 2 + 0.5).clamp(0, 1)
            out.image = (pixels[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return out
