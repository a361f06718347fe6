"""One IO descriptor per ONNX graph (DESIGN.md §2), and the module each graph is exported from.

Export, validation and the manifest all derive from ``graph_specs``; the Rust side keeps the
same table in ``src/graphs.rs``. Symbolic dimensions: ``B`` (batch), ``h``/``w`` (latent size),
``H``/``W`` (image size) are dynamic; the others are fixed by the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import EliteUNet
from .clip import CLIP_LAYERS, ImageEncoder, TextEncoder
from .models import EliteModels

DYNAMIC = ("B", "h", "w", "H", "W")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float32" | "int64"
    shape: tuple[str | int, ...]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]  # traced from the PyTorch module
    outputs: tuple[TensorSpec, ...]
    # Added after tracing (the UNet's attention maps, export/maps_graph.py): all present or all
    # absent; bundles exported before them lack them, and the runtime accepts both.
    optional_inputs: tuple[TensorSpec, ...] = ()
    optional_outputs: tuple[TensorSpec, ...] = ()

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes: dict[str, dict[int, str]] = {}
        for t in self.inputs + self.outputs:
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str) and d in DYNAMIC}
            if dyn:
                axes[t.name] = dyn
        return axes


@dataclass(frozen=True)
class Dims:
    text_hidden: int
    image_hidden: int
    tokens: int = 77
    patches: int = 256
    image_size: int = 224
    layers: int = len(CLIP_LAYERS)
    latent_channels: int = 4

    @staticmethod
    def of(models: EliteModels) -> "Dims":
        grid = models.vision.config.image_size // models.vision.config.patch_size
        return Dims(
            text_hidden=models.text_hidden,
            image_hidden=models.image_hidden,
            patches=grid * grid,
            image_size=models.vision.config.image_size,
            latent_channels=models.unet.config.in_channels,
        )


def graph_specs(d: Dims) -> list[GraphSpec]:
    f, i = "float32", "int64"
    feats = TensorSpec("image_features", f, ("B", d.layers, d.patches + 1, d.image_hidden))
    lat = ("B", d.latent_channels, "h", "w")
    return [
        GraphSpec(
            "image_encoder",
            (TensorSpec("pixel_values", f, ("B", 3, d.image_size, d.image_size)),),
            (feats,),
        ),
        GraphSpec(
            "global_mapper",
            (feats,),
            (TensorSpec("word_embeddings", f, ("B", d.layers, d.text_hidden)),),
        ),
        GraphSpec(
            "local_mapper",
            (feats, TensorSpec("mask", f, ("B", d.patches))),
            (TensorSpec("local_embeddings", f, ("B", d.patches, d.text_hidden)),),
        ),
        GraphSpec(
            "text_encoder",
            (
                TensorSpec("input_ids", i, ("B", d.tokens)),
                TensorSpec("inj_embedding", f, ("B", d.text_hidden)),
                TensorSpec("inj_index", i, ("B",)),
            ),
            (TensorSpec("last_hidden_state", f, ("B", d.tokens, d.text_hidden)),),
        ),
        GraphSpec(
            "unet",
            (
                TensorSpec("sample", f, lat),
                TensorSpec("timestep", f, ("B",)),
                TensorSpec("encoder_hidden_states", f, ("B", d.tokens, d.text_hidden)),
                TensorSpec("local_embeddings", f, ("B", d.patches, d.text_hidden)),
                TensorSpec("local_index", i, ("B",)),
                TensorSpec("local_lambda", f, ("B",)),
            ),
            (TensorSpec("noise_pred", f, lat),),
            (TensorSpec("want_attention_maps", i, ("B",)),),
            (
                TensorSpec("attention_maps", f, ("B", d.tokens, "h", "w")),
                TensorSpec("placeholder_gate", f, ("B", 1, "h", "w")),
            ),
        ),
        GraphSpec(
            "vae_decoder",
            (TensorSpec("latent_sample", f, lat),),
            (TensorSpec("sample", f, ("B", 3, "H", "W")),),
        ),
    ]


class VaeDecoder(nn.Module):
    def __init__(self, vae: Any) -> None:  # diffusers' AutoencoderKL
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def graph_module(name: str, models: EliteModels) -> nn.Module:
    modules: dict[str, nn.Module] = {
        "image_encoder": ImageEncoder(models.vision),
        "global_mapper": models.global_mapper,
        "local_mapper": models.local_mapper,
        "text_encoder": TextEncoder(models.text),
        "unet": EliteUNet(models.unet),
        "vae_decoder": VaeDecoder(models.vae),
    }
    return modules[name].eval()


def sample_inputs(
    spec: GraphSpec,
    d: Dims,
    batch: int,
    latent: tuple[int, int],
    seed: int,
    want_maps: bool | None = None,
) -> dict[str, torch.Tensor]:
    """Plausible random inputs: ids in vocabulary, indices in range, a 0/1 mask, varied λ.
    ``want_maps`` (graphs with optional inputs only): also ``want_attention_maps``, all 1 or
    all 0; None leaves it out (the traced module's inputs)."""
    g = torch.Generator().manual_seed(seed)
    h, w = latent
    sizes = {"B": batch, "h": h, "w": w}
    out: dict[str, torch.Tensor] = {}
    for t in spec.inputs:
        shape = [sizes[s] if isinstance(s, str) else s for s in t.shape]
        if t.name == "input_ids":
            out[t.name] = torch.randint(0, 49408, shape, generator=g)
        elif t.name in ("inj_index", "local_index"):
            out[t.name] = torch.randint(1, d.tokens - 1, shape, generator=g)
        elif t.name == "mask":
            out[t.name] = (torch.rand(shape, generator=g) > 0.3).float()
        elif t.name == "local_lambda":
            out[t.name] = torch.linspace(0.0, 1.0, batch)
        elif t.name == "timestep":
            out[t.name] = torch.rand(shape, generator=g) * 999.0
        elif t.name == "pixel_values":
            out[t.name] = torch.randn(shape, generator=g) * 1.5
        else:
            out[t.name] = torch.randn(shape, generator=g)
    if want_maps is not None:
        for t in spec.optional_inputs:
            out[t.name] = torch.full((batch,), int(want_maps), dtype=torch.int64)
    if "inj_index" in out and batch > 1:
        out["inj_index"][-1] = -1  # exercise "no injection" in the same batch
    return out
