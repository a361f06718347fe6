"""Cross-attention maps in PyTorch: the reference for the UNet's ``attention_maps`` and
``placeholder_gate`` outputs (DESIGN.md §6).

DAAM's aggregation (Tang et al. 2022, ``daam/trace.py``), per UNet row and call:

1. every ``attn2`` layer's global probabilities ``P_g`` ``[heads, N, T]`` are **averaged over
   the heads** (ELITE's gate ``A / M`` too, ``[heads, N, 1]``);
2. reshaped to the layer's grid ``[T, h_l, w_l]`` (``h_l = ceil(h / 2^level)``) and upsampled
   to the latent size ``[T, h, w]`` with PyTorch's bicubic (``align_corners=False``), then
   **clamped at 0** (the bicubic kernel undershoots);
3. **averaged over the 16 layers** (not summed), so at each latent pixel the 77 token maps sum
   to about 1, as the probabilities they come from.

Differences from DAAM, on purpose: heads are averaged before the upsampling (one resize per
layer instead of one per head; both are linear, only the clamp sees a difference), and the mid
block (DAAM skips the 8×8 layer of SD at 512²) is included: all 16 layers count. Steps are
averaged by the runtime (``src/attention_maps.rs``), as DAAM sums them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

_BLOCK = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.|mid_block\.")


def layer_level(module_name: str, levels: int) -> int:
    """How many times the UNet halved the latent before this ``attn2`` (``2^level`` = the
    downsampling factor of its grid). ``levels`` = the UNet's resolution levels (4 for SD 1.x):
    down block ``i`` runs at level ``i``, the mid block at ``levels - 1``, up block ``i`` at
    ``levels - 1 - i``."""
    match = _BLOCK.search(module_name)
    if match is None:
        raise ValueError(f"{module_name}: not inside a down, mid or up block of the UNet")
    if match.group(1) is None:
        return levels - 1
    index = int(match.group(2))
    return index if match.group(1) == "down_blocks" else levels - 1 - index


def layer_grid(latent: tuple[int, int], level: int) -> tuple[int, int]:
    """The grid of a layer at ``level``: each stride-2 convolution (padding 1) rounds up."""
    f = 2**level
    return math.ceil(latent[0] / f), math.ceil(latent[1] / f)


@dataclass
class LayerRecord:
    level: int
    probs: torch.Tensor  # [B, heads, N, T]: the global branch's softmax
    gate: torch.Tensor | None  # [B, heads, N, 1]: ELITE's A / M (None without the local branch)


@dataclass
class MapRecorder:
    """Collects one UNet call's ``attn2`` probabilities (installed on the processors by
    ``EliteUNet.record_maps``). Recording changes nothing the UNet computes."""

    layers: list[LayerRecord] = field(default_factory=list)

    def add(self, level: int, probs: torch.Tensor, gate: torch.Tensor | None) -> None:
        self.layers.append(LayerRecord(level, probs.detach(), None if gate is None else gate))


def layer_maps(record: LayerRecord, latent: tuple[int, int]) -> torch.Tensor:
    """One layer's maps at the latent size: ``[B, T (+1 with the gate), h, w]``."""
    x = record.probs.mean(dim=1)  # [B, N, T]
    if record.gate is not None:
        x = torch.cat([x, record.gate.mean(dim=1)], dim=2)
    batch, tokens, channels = x.shape
    grid = layer_grid(latent, record.level)
    if tokens != grid[0] * grid[1]:
        raise ValueError(f"{tokens} queries do not form the {grid} grid of level {record.level}")
    x = x.transpose(1, 2).reshape(batch, channels, *grid)
    if grid != latent:
        x = F.interpolate(x, size=latent, mode="bicubic", align_corners=False)
    return x.clamp(min=0)


def aggregate(
    recorder: MapRecorder, latent: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The call's maps ``[B, T, h, w]`` and placeholder gate ``[B, 1, h, w]`` (None when the
    call had no local branch), each the mean over layers of :func:`layer_maps`."""
    if not recorder.layers:
        raise ValueError("no attn2 layer was recorded")
    per_layer = torch.stack([layer_maps(r, latent) for r in recorder.layers]).mean(dim=0)
    if recorder.layers[0].gate is None:
        return per_layer, None
    return per_layer[:, :-1], per_layer[:, -1:]
