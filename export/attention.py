"""ELITE's dual cross-attention as a diffusers attention processor.

In every ``attn2`` of the UNet: ``K_g, V_g`` are ELITE's global projections (loaded into the
module's own ``to_k`` / ``to_v``, which they replace — also for the unconditional pass), and
``K_l, V_l`` are new bias-free projections of the local embeddings, held by this processor.
Per sample and head::

    P_g = softmax(Q K_gᵀ s)          P_l = softmax(Q K_lᵀ s)
    A   = P_g[:, idx]                M   = max(A) over heads × queries of that sample
    out = P_g V_g + λ · (P_l ⊙ A / M) V_l

The official code takes one max over the whole batch; per sample is identical at batch 1 and is
what makes our batched classifier-free guidance exact (DESIGN.md §1.5). Masked-out local tokens
are zero vectors that stay in the softmax with logit 0, as upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention_maps import MapRecorder, layer_level


@dataclass
class LocalContext:
    """Per-call inputs of the local branch; ``None`` on the processor means global-only."""

    embeddings: torch.Tensor  # [B, 256, C_txt], already multiplied by the mask grid
    index: torch.Tensor  # [B] int64: placeholder token index (column of P_g)
    lam: torch.Tensor  # [B] float: λ per sample (0 = global-only)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, channels = x.shape
    return x.view(batch, tokens, heads, channels // heads).transpose(1, 2)


class EliteAttnProcessor(nn.Module):
    """Processor for one ``attn2`` module; owns that module's local K/V projections."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, level: int = 0) -> None:
        super().__init__()
        self.to_k_local = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_local = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.context: LocalContext | None = None
        # Resolution level of this layer's grid (export/attention_maps.py), and where its
        # probabilities go when a caller records attention maps (None: not recorded).
        self.level = level
        self.recorder: MapRecorder | None = None

    def __call__(  # type: ignore[override]
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **unused: object,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            raise ValueError("EliteAttnProcessor serves cross-attention on [B, N, C] inputs only")
        heads = attn.heads
        query = _heads(attn.to_q(hidden_states), heads)
        key = _heads(attn.to_k(encoder_hidden_states), heads)
        value = _heads(attn.to_v(encoder_hidden_states), heads)
        probs = (torch.matmul(query, key.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        out = torch.matmul(probs, value)
        gate = None
        if self.context is not None:
            local, gate = self._local_term(attn, query, probs, self.context)
            out = out + local
        if self.recorder is not None:
            self.recorder.add(self.level, probs, gate)
        batch, _, tokens, head_dim = out.shape
        out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _local_term(
        self, attn: Attention, query: torch.Tensor, probs: torch.Tensor, ctx: LocalContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The local branch's contribution, and its gate ``A / M`` ``[B, heads, N, 1]``."""
        heads = attn.heads
        key_l = _heads(self.to_k_local(ctx.embeddings), heads)
        value_l = _heads(self.to_v_local(ctx.embeddings), heads)
        probs_l = (torch.matmul(query, key_l.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
        batch, _, queries, _ = probs.shape
        index = ctx.index.to(torch.int64).view(batch, 1, 1, 1).expand(batch, heads, queries, 1)
        column = torch.gather(probs, 3, index)  # [B, heads, N, 1]
        # Softmax outputs are > 0, so the max is too; the clamp only guards against underflow.
        peak = column.amax(dim=(1, 2, 3), keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
        lam = ctx.lam.to(probs.dtype).view(batch, 1, 1, 1)
        gate = column / peak
        return torch.matmul(probs_l * gate * lam, value_l), gate


def cross_attention_names(unet: UNet2DConditionModel) -> list[str]:
    """Module paths of the ``attn2`` layers, in the UNet's own order (16 for SD 1.x)."""
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, Attention) and name.endswith("attn2")
    ]


def checkpoint_prefix(module_name: str) -> str:
    """Upstream key prefix: the module path with '.' replaced by '_' (DESIGN.md §1.7)."""
    return module_name.replace(".", "_")


def install_elite_attention(unet: UNet2DConditionModel) -> dict[str, EliteAttnProcessor]:
    """Give every ``attn2`` an ``EliteAttnProcessor``; ``attn1`` keeps ordinary attention."""
    processors: dict[str, EliteAttnProcessor] = {}
    levels = len(unet.config.block_out_channels)
    for name in cross_attention_names(unet):
        attn = unet.get_submodule(name)
        assert isinstance(attn, Attention)
        proc = EliteAttnProcessor(
            attn.to_k.out_features, attn.to_k.in_features, layer_level(name, levels)
        )
        attn.set_processor(proc)
        processors[name] = proc
    return processors


class EliteUNet(nn.Module):
    """The UNet with ELITE attention installed, called with the local branch as explicit inputs.

    This is what gets exported as ``unet.onnx``: every input of DESIGN.md's table is an argument.
    """

    def __init__(self, unet: UNet2DConditionModel) -> None:
        super().__init__()
        self.unet = unet
        self.processors = [unet.get_submodule(n).processor for n in cross_attention_names(unet)]
        if not self.processors or not all(
            isinstance(p, EliteAttnProcessor) for p in self.processors
        ):
            raise ValueError("install_elite_attention() must run before wrapping the UNet")

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        local_embeddings: torch.Tensor | None = None,
        local_index: torch.Tensor | None = None,
        local_lambda: torch.Tensor | None = None,
        recorder: MapRecorder | None = None,
    ) -> torch.Tensor:
        """``recorder`` (not a graph input) collects every ``attn2``'s probabilities of this
        call, for the attention-map reference (export/attention_maps.py)."""
        context = None
        if local_embeddings is not None:
            if local_index is None or local_lambda is None:
                raise ValueError("local_embeddings needs local_index and local_lambda")
            context = LocalContext(local_embeddings, local_index, local_lambda)
        for proc in self.processors:
            proc.context = context
            proc.recorder = recorder
        try:
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]
        finally:
            for proc in self.processors:
                proc.context = None
                proc.recorder = None
