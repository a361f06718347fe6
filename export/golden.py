"""Golden data for the runtime's parity tests (DESIGN.md §3), from the reference pipeline.

Run on the tiny model's PyTorch weights — regenerated from the fixed-seed tiny generator, never
read back from the ONNX bundle and never written by the Rust side. Each case gets a directory of
``.npy`` stage dumps; ``cases.json`` lists the settings. The inputs are the photographs and masks
in ``tests/golden/images/`` (see SOURCES.md there and ``export/sample_images.py``).

A case with another ``scheduler`` than LMS may ``reuse`` an earlier case with the same image,
mask and prompt: its concept and text stages are checked equal to that case's and its ``files``
point at that case's ``.npy`` files (paths are relative to the golden directory), so only what
the scheduler changes is stored (initial latents, timesteps, σ, latents, image).
"""

from __future__ import annotations

import filecmp
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import LMSDiscreteScheduler

from .models import EliteModels
from .reference import Concept, Generation, ReferencePipeline

# The stages fixed by the image, mask and prompt alone (what a reusing case shares).
SHARED_STAGES = (
    "pixels_global",
    "pixels_local",
    "mask_grid",
    "word_embeddings",
    "local_embeddings",
    "input_ids",
    "text_cond",
    "text_uncond",
)


@dataclass(frozen=True)
class Case:
    name: str
    image: str  # relative to the golden directory
    mask: str | None
    prompt: str
    placeholder: str
    seed: int
    steps: int
    guidance: float
    lam: float
    height: int
    width: int
    note: str
    scheduler: str = "lms"  # a runtime scheduler name (export/schedulers.py)
    reuses: str | None = None  # an earlier case whose concept and text stages this one shares
    # Record the attention maps of every step (prompt tokens only: start to end token).
    attention_maps: bool = False


CASES = (
    Case(
        "cat_generate",
        "images/chelsea.png",
        "images/chelsea_mask.png",
        "a photo of a S",
        "S",
        42,
        100,
        5.0,
        0.8,
        256,
        256,
        "the official scripts' settings (100 steps, λ 0.8, seed 42) at the tiny model's native "
        "256²; non-square input (451×300)",
    ),
    Case(
        "second_edit",
        "images/coffee.png",
        "images/coffee_mask.png",
        "a S wearing sunglasses",
        "S",
        7,
        12,
        5.0,
        0.6,
        384,
        256,
        "editing prompt with λ 0.6, short run, non-square 384×256 output; attention maps of "
        "every step (prompt tokens and the placeholder gate)",
        attention_maps=True,
    ),
    Case(
        "cat_nomask",
        "images/chelsea.png",
        None,
        "a painting of S on the beach",
        "S",
        123,
        8,
        7.5,
        0.8,
        256,
        256,
        "no mask: the whole image is the object",
    ),
    Case(
        "multitoken_word",
        "images/coffee.png",
        "images/coffee_mask.png",
        "an impressionistic watercolour of S",
        "S",
        2024,
        4,
        5.0,
        0.8,
        512,
        512,
        "words of several tokens precede the placeholder (token index ≠ word index); SD's 512²",
    ),
    Case(
        "cat_jpeg",
        "images/chelsea.jpg",
        "images/chelsea_mask.png",
        "a photo of a S",
        "S",
        42,
        4,
        5.0,
        0.8,
        256,
        256,
        "JPEG input (Pillow's default 4:2:0, quality 90, non-square 451×300), decoded as Pillow "
        "decodes it; 4 steps at 256²",
    ),
    Case(
        "cat_dpmpp_karras",
        "images/chelsea.png",
        "images/chelsea_mask.png",
        "a photo of a S",
        "S",
        42,
        20,
        5.0,
        0.8,
        256,
        256,
        "cat_generate with DPM-Solver++ 2M on Karras σ at 20 steps, the fast preset",
        scheduler="dpmpp-2m-karras",
        reuses="cat_generate",
    ),
    Case(
        "edit_euler_a",
        "images/coffee.png",
        "images/coffee_mask.png",
        "a S wearing sunglasses",
        "S",
        7,
        15,
        5.0,
        0.6,
        384,
        256,
        "second_edit with Euler ancestral at 15 steps: per-step noise from the seed's generator "
        "after the initial latents",
        scheduler="euler-a",
        reuses="second_edit",
    ),
)


# Cases stored partly by reference: a stage file byte-identical to the same stage of an
# earlier case is not written again, and the case's "files" entry points to the earlier copy
# (the JPEG case shares its noise, token ids, unconditional text and LMS tables).
SHARE_IDENTICAL_FILES = {"cat_jpeg"}


def share_identical_files(
    entry: dict[str, object], earlier: list[dict[str, object]], root: Path
) -> None:
    files = entry["files"]
    assert isinstance(files, dict)
    for key, rel in files.items():
        for other in earlier:
            other_files = other["files"]
            assert isinstance(other_files, dict)
            if key in other_files and filecmp.cmp(
                root / rel, root / other_files[key], shallow=False
            ):
                (root / rel).unlink()
                files[key] = other_files[key]
                break


def _save(path: Path, array: np.ndarray) -> str:
    np.save(path, np.ascontiguousarray(array))
    return path.name


def lms_table(steps: int) -> np.ndarray:
    """diffusers' LMS coefficients per step, ``[steps, 4]`` (unused orders are 0)."""
    scheduler = LMSDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    scheduler.set_timesteps(steps)
    table = np.zeros((steps, 4), dtype=np.float64)
    for i in range(steps):
        order = min(i + 1, 4)
        for j in range(order):
            table[i, j] = scheduler.get_lms_coefficient(order, i, j)
    return table


def write_case(
    case: Case, pipe: ReferencePipeline, root: Path, stages: dict[str, dict[str, np.ndarray]]
) -> dict[str, object]:
    """Runs and writes one case; ``stages`` collects every case's arrays (for ``reuses``)."""
    print(
        f"[golden] {case.name}: {case.scheduler}, {case.steps} steps at {case.width}x{case.height}",
        file=sys.stderr,
        flush=True,
    )
    concept: Concept = pipe.encode_concept(
        root / case.image, root / case.mask if case.mask else None
    )
    gen: Generation = pipe.generate(
        concept,
        case.prompt,
        case.placeholder,
        case.seed,
        case.steps,
        case.guidance,
        case.lam,
        case.height,
        case.width,
        scheduler=case.scheduler,
        attention_maps=case.attention_maps,
    )
    d = root / case.name
    d.mkdir(parents=True, exist_ok=True)
    tensors = {
        "pixels_global": concept.pixels_global,
        "pixels_local": concept.pixels_local,
        "mask_grid": concept.mask_grid,
        "word_embeddings": concept.word_embeddings,
        "local_embeddings": concept.local_embeddings,
        "input_ids": gen.input_ids,
        "text_cond": gen.text_cond,
        "text_uncond": gen.text_uncond,
        "init_latents": gen.init_latents,
        # As the float32 the UNet takes (DPM-Solver++'s are whole numbers in int64).
        "timesteps": gen.timesteps.to(torch.float32),
        "sigmas": gen.sigmas,
    }
    arrays = {k: v.numpy() for k, v in tensors.items()}
    stages[case.name] = arrays
    files: dict[str, str] = {}
    for key, array in arrays.items():
        if case.reuses is not None and key in SHARED_STAGES:
            shared = stages[case.reuses][key]
            assert np.array_equal(shared, array), f"{case.name}: {key} differs from {case.reuses}"
            files[key] = f"{case.reuses}/{key}.npy"
        else:
            files[key] = f"{case.name}/{_save(d / f'{key}.npy', array)}"
    if case.scheduler == "lms":
        files["lms_coefficients"] = f"{case.name}/" + _save(
            d / "lms_coefficients.npy", lms_table(case.steps)
        )
    last = len(gen.timesteps)
    for k, lat in sorted(gen.latents.items()):
        key = "latents_last" if k == last else f"latents_step{k}"
        files[key] = f"{case.name}/{_save(d / f'{key}.npy', lat.numpy())}"
    assert gen.image is not None
    files["image"] = f"{case.name}/{_save(d / 'image.npy', gen.image)}"
    if case.attention_maps:
        # [steps, tokens, h, w] for the prompt's tokens (start to end token): the padding
        # tokens' maps come out of the same graph output and would only add megabytes.
        ids = gen.input_ids[0].tolist()
        tokens = ids.index(pipe.tokenizer.eos_token_id) + 1
        maps = torch.cat(gen.attention_maps)[:, :tokens]
        gates = torch.cat(gen.placeholder_gates)
        for key, recorded in (("attention_maps_steps", maps), ("placeholder_gate_steps", gates)):
            files[key] = f"{case.name}/{_save(d / f'{key}.npy', recorded.numpy())}"
    entry = asdict(case)
    entry.update(
        {
            "placeholder_index": gen.placeholder_index,
            "official_word_index": pipe.placeholder_index(case.prompt, case.placeholder, "word"),
            "files": files,
        }
    )
    return entry


def write_golden(models: EliteModels, root: Path) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = ReferencePipeline(models)
    stages: dict[str, dict[str, np.ndarray]] = {}
    entries: list[dict[str, object]] = []
    for case in CASES:
        entry = write_case(case, pipe, root, stages)
        if case.name in SHARE_IDENTICAL_FILES:
            share_identical_files(entry, entries, root)
        entries.append(entry)
    doc = {
        "generator": "python -m export golden (export/golden.py, reference pipeline in fp32)",
        "bundle": "onnx/tiny",
        "cases": entries,
    }
    (root / "cases.json").write_text(json.dumps(doc, indent=2) + "\n")
