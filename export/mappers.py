"""ELITE's global and local mapping networks, with the upstream checkpoint key layout.

The official code (``train_global.py`` / ``train_local.py``) builds ten MLPs per mapper,
``mapping_{i}`` (applied to the CLS token of CLIP layer i) and ``mapping_patch_{i}`` (applied
to the 256 patch tokens), each ``Linear-LayerNorm-LeakyReLU-Linear-LayerNorm-LeakyReLU-Linear``.
Sequential indices 0, 1, 3, 4, 6 hold the parameters, which is why the checkpoint keys look like
``mapping_0.3.weight``. The width of the hidden layers is 1024 upstream; the tiny bundle uses a
smaller one, so it is a parameter here.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_LAYERS = 5  # CLIP layers 24, 4, 8, 12, 16 (DESIGN.md §1)


def mapping_mlp(input_dim: int, hidden_dim: int, output_dim: int) -> nn.Sequential:
    """One ELITE MLP; layer order and defaults (LayerNorm eps 1e-5, LeakyReLU 0.01) as upstream."""
    return nn.Sequential(
        nn.Linear(input_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.LeakyReLU(),
        nn.Linear(hidden_dim, output_dim),
    )


class _MapperBase(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        for i in range(NUM_LAYERS):
            setattr(self, f"mapping_{i}", mapping_mlp(input_dim, hidden_dim, output_dim))
            setattr(self, f"mapping_patch_{i}", mapping_mlp(input_dim, hidden_dim, output_dim))

    def cls_mlp(self, i: int) -> nn.Module:
        return getattr(self, f"mapping_{i}")

    def patch_mlp(self, i: int) -> nn.Module:
        return getattr(self, f"mapping_patch_{i}")


class GlobalMapper(_MapperBase):
    """``w_i = mapping_i(CLS_i) + mean_256(mapping_patch_i(patch_i))`` → ``[B, 5, C_txt]``."""

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        # image_features: [B, 5, 1 + P, C_img], layer order 24, 4, 8, 12, 16.
        words = []
        for i in range(NUM_LAYERS):
            layer = image_features[:, i]
            cls_part = self.cls_mlp(i)(layer[:, 0])
            patch_part = self.patch_mlp(i)(layer[:, 1:]).mean(dim=1)
            words.append(cls_part + patch_part)
        return torch.stack(words, dim=1)


class LocalMapper(_MapperBase):
    """``e = mean_i(mapping_i(CLS_i) + mapping_patch_i(patch_i))``, times the 16×16 mask grid."""

    def forward(self, image_features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # image_features: [B, 5, 1 + P, C_img]; mask: [B, P] (0/1), P = 256 patches.
        per_layer = []
        for i in range(NUM_LAYERS):
            layer = image_features[:, i]
            per_layer.append(self.cls_mlp(i)(layer[:, :1]) + self.patch_mlp(i)(layer[:, 1:]))
        # Upstream stacks on a new leading axis and takes .mean(dim=0): same summation order.
        local = torch.stack(per_layer, dim=0).mean(dim=0)
        return local * mask.unsqueeze(-1)
