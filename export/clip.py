"""CLIP towers as ELITE uses them: five vision features, and the text model with word injection."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPVisionModel

# Which hidden states ELITE feeds its mappers, in order (DESIGN.md §1.1). Index k = output of
# layer k; the first entry is the last layer (``last_hidden_state``, no post-layernorm).
CLIP_LAYERS = (24, 4, 8, 12, 16)


class ImageEncoder(nn.Module):
    """``pixel_values [B,3,224,224]`` → ``image_features [B,5,257,C_img]``."""

    def __init__(self, vision: CLIPVisionModel, layers: tuple[int, ...] = CLIP_LAYERS) -> None:
        super().__init__()
        if max(layers) > len(vision.encoder.layers):
            raise ValueError(
                f"CLIP vision tower has {len(vision.encoder.layers)} layers; ELITE reads {layers}"
            )
        self.vision = vision
        self.layers = layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision.embeddings(pixel_values)
        hidden = self.vision.pre_layrnorm(hidden)
        outputs = {0: hidden}
        # Run only as deep as the deepest layer ELITE reads (24 = all of ViT-L/14).
        for k, layer in enumerate(self.vision.encoder.layers[: max(self.layers)], start=1):
            hidden = layer(hidden, None)
            outputs[k] = hidden
        return torch.stack([outputs[k] for k in self.layers], dim=1)


def causal_mask(tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask ``[1, 1, T, T]``, as CLIP's text transformer uses."""
    mask = torch.full((tokens, tokens), torch.finfo(dtype).min, dtype=dtype)
    return mask.triu(1)[None, None]


class TextEncoder(nn.Module):
    """CLIP text model whose token embedding at ``inj_index`` is replaced by ``inj_embedding``.

    The replacement happens before position embeddings are added, as in ELITE's
    ``inj_forward_text``. ``inj_index = -1`` matches no position: the plain text encoder.
    """

    def __init__(self, text: CLIPTextModel) -> None:
        super().__init__()
        self.text = text

    def forward(
        self,
        input_ids: torch.Tensor,
        inj_embedding: torch.Tensor | None = None,
        inj_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.text.embeddings.token_embedding(input_ids)
        if inj_embedding is not None and inj_index is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            hit = (positions[None, :] == inj_index[:, None]).unsqueeze(-1)
            embeds = torch.where(hit, inj_embedding[:, None, :].to(embeds.dtype), embeds)
        hidden = self.text.embeddings(inputs_embeds=embeds)
        mask = causal_mask(input_ids.shape[1], hidden.dtype).to(hidden.device)
        for layer in self.text.encoder.layers:
            hidden = layer(hidden, mask)
        return self.text.final_layer_norm(hidden)
