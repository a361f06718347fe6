"""Random-weight ELITE models: the tiny test model, and a full-size one for benchmarks.

Both have SD v1's and CLIP ViT-L/14's layout (a UNet with SD's four levels and its 16 ``attn2``
layers, a 24-layer CLIP vision tower so ELITE's layers 4/8/12/16/24 exist, a CLIP text model over
the real 49,408-token vocabulary, a VAE with 8× upsampling, the two mappers) with fixed-seed
random weights; ``ModelConfig`` sets the widths. ``TINY`` is the committed test model;
``FULL`` has exactly SD v1-4's, CLIP ViT-L/14's and ELITE's dimensions (for speed and memory
measurements: its images are noise). Each is written in the upstream formats first and then
exported through the very loaders and exporter used for real weights.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, LMSDiscreteScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPConfig, CLIPModel

from .attention import checkpoint_prefix, cross_attention_names
from .mappers import GlobalMapper, LocalMapper
from .tokenizer import write_clip_vocab

VOCAB_SIZE = 49408  # CLIP BPE: 256 bytes ×2, 48,894 merges, <|startoftext|>, <|endoftext|>


@dataclass(frozen=True)
class ModelConfig:
    """Widths of a random-weight model; everything not listed is SD v1-4 / CLIP ViT-L/14's
    layout. The defaults are the tiny test model's (changing them changes ``onnx/tiny``)."""

    seed: int = 0
    text_hidden: int = 16
    text_layers: int = 2
    text_heads: int = 2
    image_hidden: int = 32
    image_layers: int = 24
    image_heads: int = 4
    mapper_hidden: int = 64
    unet_channels: tuple[int, ...] = (16, 32, 32, 32)
    unet_heads: int = 8
    # Native latent size: the tiny model's is 32² (256² images): SD's 64² latents make the
    # 4096-token self-attention dominate CPU test time without testing anything more.
    unet_sample_size: int = 32
    vae_channels: tuple[int, ...] = (16, 16, 32, 32)
    vae_layers_per_block: int = 1
    # None keeps diffusers' default (the tiny model's config predates this field).
    vae_sample_size: int | None = None
    norm_groups: int = 8


TINY = ModelConfig()

# SD v1-4 (UNet, VAE), CLIP ViT-L/14 (text 768 × 12 layers × 12 heads, vision 1024 × 24 × 16,
# patch 14, projection 768) and ELITE's mappers (hidden 1024).
FULL = ModelConfig(
    text_hidden=768,
    text_layers=12,
    text_heads=12,
    image_hidden=1024,
    image_layers=24,
    image_heads=16,
    mapper_hidden=1024,
    unet_channels=(320, 640, 1280, 1280),
    unet_heads=8,
    unet_sample_size=64,
    vae_channels=(128, 256, 512, 512),
    vae_layers_per_block=2,
    vae_sample_size=512,
    norm_groups=32,
)

CONFIGS = {"tiny": TINY, "full": FULL}


def clip_config(cfg: ModelConfig) -> CLIPConfig:
    text = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    vision = dict(
        hidden_size=cfg.image_hidden,
        intermediate_size=cfg.image_hidden * 4,
        num_hidden_layers=cfg.image_layers,
        num_attention_heads=cfg.image_heads,
        image_size=224,
        patch_size=14,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.text_hidden)


def build_unet(cfg: ModelConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=cfg.unet_sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=cfg.unet_channels,
        layers_per_block=2,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers' legacy name: the number of heads in SD 1.x
        norm_num_groups=cfg.norm_groups,
    )


def build_vae(cfg: ModelConfig) -> AutoencoderKL:
    extra = {} if cfg.vae_sample_size is None else {"sample_size": cfg.vae_sample_size}
    return AutoencoderKL(
        **extra,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=cfg.norm_groups,
        scaling_factor=0.18215,
    )


def mapper_state(
    mapper: nn.Module, unet: UNet2DConditionModel, cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Mapper weights plus fresh attn2 K/V projections, under ELITE's checkpoint key names."""
    state = dict(mapper.state_dict())
    for name in cross_attention_names(unet):
        out = unet.get_submodule(name).to_k.out_features
        prefix = checkpoint_prefix(name)
        for proj in ("to_k", "to_v"):
            state[f"{prefix}_{proj}.weight"] = nn.Linear(cfg.text_hidden, out, bias=False).weight
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def write_upstream(dst: Path, cfg: ModelConfig, weights: str = "safetensors") -> dict[str, Path]:
    """Write a random-weight model in upstream formats; returns the paths ``load_elite`` takes.

    ``weights="bin"`` writes PyTorch ``.bin`` weights instead of safetensors for the UNet, the
    VAE and CLIP, as older SD v1-4 downloads have them (to test that path's messages)."""
    if weights not in ("safetensors", "bin"):
        raise ValueError(f"weights must be 'safetensors' or 'bin', not {weights!r}")
    torch.manual_seed(cfg.seed)
    sd_dir, clip_dir = dst / "stable-diffusion", dst / "clip"
    unet = build_unet(cfg)
    vae = build_vae(cfg)
    clip = CLIPModel(clip_config(cfg))
    gmap = GlobalMapper(cfg.image_hidden, cfg.mapper_hidden, cfg.text_hidden)
    lmap = LocalMapper(cfg.image_hidden, cfg.mapper_hidden, cfg.text_hidden)
    global_state = mapper_state(gmap, unet, cfg)
    local_state = mapper_state(lmap, unet, cfg)

    safe = weights == "safetensors"
    unet.save_pretrained(sd_dir / "unet", safe_serialization=safe)
    vae.save_pretrained(sd_dir / "vae", safe_serialization=safe)
    LMSDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    ).save_pretrained(sd_dir / "scheduler")
    clip.save_pretrained(clip_dir)
    if not safe:  # transformers 5 writes safetensors only
        (clip_dir / "model.safetensors").unlink()
        torch.save(clip.state_dict(), clip_dir / "pytorch_model.bin")
    write_clip_vocab(clip_dir)
    torch.save(global_state, dst / "global_mapper.pt")
    torch.save(local_state, dst / "local_mapper.pt")
    (dst / "model_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return {
        "sd": sd_dir,
        "clip": clip_dir,
        "global_mapper": dst / "global_mapper.pt",
        "local_mapper": dst / "local_mapper.pt",
    }


def write_tiny_upstream(dst: Path) -> dict[str, Path]:
    """The tiny test model in upstream formats (see ``write_upstream``)."""
    return write_upstream(dst, TINY)
