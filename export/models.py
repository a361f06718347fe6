"""Loading ELITE from the upstream artifacts, strictly.

Upstream artifacts: a Stable Diffusion v1.x diffusers directory (``unet/``, ``vae/``), a CLIP
ViT-L/14 transformers directory (text model, vision model, tokenizer), and ELITE's
``global_mapper.pt`` / ``local_mapper.pt`` — flat state-dict pickles whose keys are the ten
mapper MLPs plus, for each of the UNet's ``attn2`` modules, ``<path with '_'>_to_k.weight`` and
``_to_v.weight`` (global K/V in the global file, local K/V in the local file). Directories and
hub ids are both accepted for SD and CLIP; hub ids need network and are never used by tests.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

from .attention import (
    EliteAttnProcessor,
    checkpoint_prefix,
    cross_attention_names,
    install_elite_attention,
)
from .mappers import GlobalMapper, LocalMapper


class CheckpointError(ValueError):
    """A mapper checkpoint does not match the model it is loaded into."""


@dataclass
class EliteModels:
    """Every PyTorch module ELITE inference needs, in fp32 eval mode, ELITE attention installed."""

    vision: CLIPVisionModel
    text: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    global_mapper: GlobalMapper
    local_mapper: LocalMapper
    tokenizer_dir: Path  # transformers-format CLIP tokenizer (vocab.json, merges.txt)
    source: dict[str, object] = field(default_factory=dict)

    @property
    def text_hidden(self) -> int:
        return int(self.text.config.hidden_size)

    @property
    def image_hidden(self) -> int:
        return int(self.vision.config.hidden_size)

    @property
    def processors(self) -> list[EliteAttnProcessor]:
        procs = [self.unet.get_submodule(n).processor for n in cross_attention_names(self.unet)]
        return [p for p in procs if isinstance(p, EliteAttnProcessor)]


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: mapper checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path}: expected a flat state_dict of tensors")
    return state


def _expected_kv_shapes(unet: UNet2DConditionModel) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name in cross_attention_names(unet):
        attn = unet.get_submodule(name)
        prefix = checkpoint_prefix(name)
        shapes[f"{prefix}_to_k.weight"] = tuple(attn.to_k.weight.shape)
        shapes[f"{prefix}_to_v.weight"] = tuple(attn.to_v.weight.shape)
    return shapes


def _check_keys(
    path: Path, state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]
) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != expected[key]:
            problems.append(
                f"key {key}: expected shape {list(expected[key])}, found {list(state[key].shape)}"
            )
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def load_mapper_checkpoint(
    path: Path,
    kind: str,
    unet: UNet2DConditionModel,
    image_hidden: int,
    text_hidden: int,
) -> tuple[GlobalMapper | LocalMapper, dict[str, torch.Tensor]]:
    """Strictly load ``global_mapper.pt`` (kind="global") or ``local_mapper.pt`` (kind="local").

    Returns the mapper and the attn2 K/V weights keyed by checkpoint name. The MLP hidden width
    (1024 upstream) is read from ``mapping_0.0.weight``; every other shape is checked.
    """
    state = _read_state_dict(path)
    first = state.get("mapping_0.0.weight")
    if first is None or first.ndim != 2:
        raise CheckpointError(f"{path}: missing key mapping_0.0.weight (is this an ELITE mapper?)")
    cls = GlobalMapper if kind == "global" else LocalMapper
    mapper = cls(image_hidden, int(first.shape[0]), text_hidden)
    expected = {k: tuple(v.shape) for k, v in mapper.state_dict().items()}
    kv_shapes = _expected_kv_shapes(unet)
    _check_keys(path, state, expected | kv_shapes)
    mapper.load_state_dict({k: state[k].float() for k in expected}, strict=True)
    return mapper.eval(), {k: state[k].float() for k in kv_shapes}


@torch.no_grad()
def _apply_kv(unet: UNet2DConditionModel, kv: dict[str, torch.Tensor], kind: str) -> None:
    for name in cross_attention_names(unet):
        attn = unet.get_submodule(name)
        prefix = checkpoint_prefix(name)
        k, v = kv[f"{prefix}_to_k.weight"], kv[f"{prefix}_to_v.weight"]
        if kind == "global":
            # ELITE's global K/V replace SD's attn2 projections everywhere, uncond pass included.
            attn.to_k.weight.copy_(k)
            attn.to_v.weight.copy_(v)
        else:
            proc = attn.processor
            assert isinstance(proc, EliteAttnProcessor)
            proc.to_k_local.weight.copy_(k)
            proc.to_v_local.weight.copy_(v)


def _save_tokenizer(clip: str, local_only: bool) -> Path:
    src = Path(clip)
    if (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        return src
    tokenizer = CLIPTokenizer.from_pretrained(clip, local_files_only=local_only)
    dst = Path(tempfile.mkdtemp(prefix="elite-clip-tokenizer-"))
    tokenizer.save_pretrained(dst)
    return dst


def _use_safetensors(directory: Path) -> bool | None:
    """The weight format to load from a local model directory, chosen here rather than by the
    library's fallback: safetensors when the directory has them, else PyTorch ``.bin`` (which
    diffusers and transformers read with ``torch.load(weights_only=True)``). ``None`` for a
    hub id or a directory with neither: the library then decides and reports what is missing.

    Leaving the choice to diffusers makes a ``.bin``-only directory (as SD v1-4 downloads often
    are) log "An error occurred while trying to fetch ...: no file named
    diffusion_pytorch_model.safetensors" and "Defaulting to unsafe serialization" on a
    successful load: it tries safetensors first and reports the miss as an error.
    """
    if not directory.is_dir():
        return None
    names = [p.name for p in directory.iterdir()]
    if any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names):
        return True
    if any(n.endswith(".bin") or n.endswith(".bin.index.json") for n in names):
        return False
    return None


def load_elite(
    sd: str,
    clip: str,
    global_mapper: Path,
    local_mapper: Path,
    allow_network: bool = False,
) -> EliteModels:
    """Load every ELITE module in fp32 from upstream-format artifacts (see module docstring)."""
    local_only = not allow_network
    # low_cpu_mem_usage=False: what diffusers falls back to without `accelerate` (not a
    # dependency here), said explicitly so that it does not warn about the fallback.
    unet = UNet2DConditionModel.from_pretrained(
        sd,
        subfolder="unet",
        local_files_only=local_only,
        use_safetensors=_use_safetensors(Path(sd) / "unet"),
        low_cpu_mem_usage=False,
    )
    vae = AutoencoderKL.from_pretrained(
        sd,
        subfolder="vae",
        local_files_only=local_only,
        use_safetensors=_use_safetensors(Path(sd) / "vae"),
        low_cpu_mem_usage=False,
    )
    clip_model = CLIPModel.from_pretrained(
        clip,
        local_files_only=local_only,
        attn_implementation="eager",
        use_safetensors=_use_safetensors(Path(clip)),
    )
    vision, text = clip_model.vision_model, clip_model.text_model
    install_elite_attention(unet)
    image_hidden, text_hidden = int(vision.config.hidden_size), int(text.config.hidden_size)
    gmap, gkv = load_mapper_checkpoint(global_mapper, "global", unet, image_hidden, text_hidden)
    lmap, lkv = load_mapper_checkpoint(local_mapper, "local", unet, image_hidden, text_hidden)
    assert isinstance(gmap, GlobalMapper) and isinstance(lmap, LocalMapper)
    _apply_kv(unet, gkv, "global")
    _apply_kv(unet, lkv, "local")
    models = EliteModels(
        vision=vision.float().eval(),
        text=text.float().eval(),
        unet=unet.float().eval(),
        vae=vae.float().eval(),
        global_mapper=gmap.float().eval(),
        local_mapper=lmap.float().eval(),
        tokenizer_dir=_save_tokenizer(clip, local_only),
        # Every input as the user gave it: a path (the directories and the mapper files
        # alike) or a hub id.
        source={
            "unet": sd,
            "clip": clip,
            "global_mapper": str(global_mapper),
            "local_mapper": str(local_mapper),
        },
    )
    return models
