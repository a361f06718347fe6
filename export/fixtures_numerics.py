"""Reference fixtures for the native numerics: LMS scheduler, torch noise, Pillow preprocessing.

Every value written here comes from the libraries the Rust side must match (diffusers, torch,
Pillow, numpy), never from the Rust code. Run from the repository root:

    /work/main/.venv/bin/python export/fixtures_numerics.py

and commit the files it writes under tests/fixtures/numerics/. Output is deterministic.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from diffusers import LMSDiscreteScheduler
from PIL import Image, ImageOps

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "numerics"

# Step counts whose sigmas and timesteps are stored in full (and coefficients, sampled above
# 100 steps; every count 1..1000 is covered by fingerprints).
LMS_COUNTS = [1, 2, 3, 4, 5, 10, 25, 50, 100, 250, 999, 1000]
LMS_MAX_ORDER = 4

# Seeds and sizes of the torch.randn references.
RANDN_SEEDS = [0, 7, 42, 123, 2**32 + 5]
RANDN_SIZES = [1, 2, 3, 15, 16, 17, 100, 16384, 32768, 4 * 4 * 48 * 32 + 3]
RANDN_HEAD_TAIL = 48
RANDN_STRIDE = 127

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def sd_scheduler() -> LMSDiscreteScheduler:
    """The scheduler configuration of SD v1 / ELITE."""
    return LMSDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
    )


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash: a compact, exact fingerprint of a float32 array's bits."""
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def f32_bytes(values: npt.ArrayLike) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def save(name: str, array: np.ndarray) -> None:
    np.save(OUT / name, array)


def coefficient_steps(steps: int) -> list[int]:
    """Step indices whose coefficients are stored: all of them up to 100 steps, else a sample
    (the first and last 16 and every 25th) to keep the fixture small."""
    if steps <= 100:
        return list(range(steps))
    return [k for k in range(steps) if k < 16 or k >= steps - 16 or k % 25 == 0]


def exact_lms_coefficient(sigmas: np.ndarray, order: int, t: int, j: int) -> float:
    """The exact integral of the Lagrange basis polynomial, in rational arithmetic on
    diffusers' float32 sigmas (diffusers itself integrates a float32 integrand numerically)."""
    nodes = [Fraction(float(sigmas[t - k])) for k in range(order)]
    others = [nodes[m] for m in range(order) if m != j]
    # Coefficients of prod(tau - r) in increasing powers.
    poly = [Fraction(1)]
    for root in others:
        shifted = [Fraction(0)] + poly
        scaled = [-root * c for c in poly] + [Fraction(0)]
        poly = [a + b for a, b in zip(shifted, scaled)]
    denominator = Fraction(1)
    for root in others:
        denominator *= nodes[j] - root

    def antiderivative(x: Fraction) -> Fraction:
        return sum((c * x ** (p + 1) / (p + 1) for p, c in enumerate(poly)), Fraction(0))

    a, b = Fraction(float(sigmas[t])), Fraction(float(sigmas[t + 1]))
    return float((antiderivative(b) - antiderivative(a)) / denominator)


def lms_coefficient_rows(sched: LMSDiscreteScheduler, steps: int) -> list[list[float]]:
    """Rows [steps, step index, j, diffusers' get_lms_coefficient, exact integral]."""
    sigmas = sched.sigmas.numpy()
    rows: list[list[float]] = []
    for t in coefficient_steps(steps):
        order = min(t + 1, LMS_MAX_ORDER)
        for j in range(order):
            diffusers_value = sched.get_lms_coefficient(order, t, j)
            exact = exact_lms_coefficient(sigmas, order, t, j)
            rows.append([float(steps), float(t), float(j), diffusers_value, exact])
    return rows


def write_lms() -> None:
    sched = sd_scheduler()
    sigmas: list[np.ndarray] = []
    timesteps: list[np.ndarray] = []
    coeff_rows: list[list[float]] = []
    init_sigma: list[float] = []
    for steps in LMS_COUNTS:
        sched.set_timesteps(steps)
        sigmas.append(sched.sigmas.numpy().astype(np.float32))
        timesteps.append(sched.timesteps.numpy().astype(np.float32))
        init_sigma.append(float(sched.init_noise_sigma))
        coeff_rows.extend(lms_coefficient_rows(sched, steps))
    save("lms_counts.npy", np.array(LMS_COUNTS, dtype=np.int64))
    save("lms_sigmas.npy", np.concatenate(sigmas))
    save("lms_timesteps.npy", np.concatenate(timesteps))
    save("lms_coefficients.npy", np.array(coeff_rows, dtype=np.float64))
    save("lms_init_noise_sigma.npy", np.array(init_sigma, dtype=np.float32))

    # Every step count 1..=1000, as FNV-1a fingerprints of the float32 bits: a bit-exact check
    # of the whole family in 16 KB instead of 2 MB of values.
    hashes = np.zeros((1000, 2), dtype=np.uint64)
    for steps in range(1, 1001):
        sched.set_timesteps(steps)
        hashes[steps - 1, 0] = fnv1a64(f32_bytes(sched.sigmas.numpy()))
        hashes[steps - 1, 1] = fnv1a64(f32_bytes(sched.timesteps.numpy()))
    save("lms_hashes.npy", hashes)

    # The training sigma table (what set_timesteps interpolates), float32 as torch computes it.
    table = ((1 - sched.alphas_cumprod) / sched.alphas_cumprod) ** 0.5
    save("lms_train_sigmas.npy", table.numpy().astype(np.float32))

    write_lms_steps(sched)


def write_lms_steps(sched: LMSDiscreteScheduler) -> None:
    """A few full denoising runs through diffusers' step() on fixed random inputs."""
    rng = np.random.default_rng(20230817)
    for steps, run in [(10, 10), (100, 6)]:
        sched.set_timesteps(steps)
        numel = 64
        sample0 = (rng.standard_normal(numel) * float(sched.init_noise_sigma)).astype(np.float32)
        eps = rng.standard_normal((run, numel)).astype(np.float32)
        x = torch.from_numpy(sample0.copy())
        outputs: list[np.ndarray] = []
        for i in range(run):
            t = sched.timesteps[i]
            sched.scale_model_input(x, t)
            x = sched.step(torch.from_numpy(eps[i]), t, x).prev_sample
            outputs.append(x.numpy().copy())
        save(f"lms_step{steps}_sample0.npy", sample0)
        save(f"lms_step{steps}_noise_pred.npy", eps)
        save(f"lms_step{steps}_samples.npy", np.stack(outputs).astype(np.float32))


def kept_indices(numel: int) -> np.ndarray:
    """Which elements of a randn draw are stored: the first and last 48 (the last 16 are the
    redrawn tail block) and every 127th, enough to pin the layout without storing 100 KB."""
    i = np.arange(numel)
    return i[(i < RANDN_HEAD_TAIL) | (i + RANDN_HEAD_TAIL >= numel) | (i % RANDN_STRIDE == 0)]


def randn_reference(seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(cases [seed, size, kept count], kept values) for torch.randn in this process."""
    cases: list[list[int]] = []
    values: list[np.ndarray] = []
    for seed in seeds:
        for numel in RANDN_SIZES:
            torch.manual_seed(seed)
            draw = torch.randn(numel, dtype=torch.float32).numpy()
            kept = kept_indices(numel)
            cases.append([seed, numel, len(kept)])
            values.append(draw[kept])
    return np.array(cases, dtype=np.int64), np.concatenate(values).astype(np.float32)


def write_randn() -> None:
    cases, values = randn_reference(RANDN_SEEDS)
    save("randn_cases.npy", cases)
    save("randn_values.npy", values)
    # x86 torch (AVX2 and AVX512 alike) draws with its vectorised kernel; builds without it use
    # a scalar one. Record that from a child process pinned to the generic kernel (the
    # capability is fixed when torch loads).
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import fixtures_numerics as f; "
        "import torch; "
        "assert torch.backends.cpu.get_cpu_capability() == 'DEFAULT'; "
        "c, v = f.randn_reference([0, 42]); "
        "f.save('randn_cases_generic.npy', c); f.save('randn_values_generic.npy', v)"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    here = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-c", script, here], env=env, check=True)


# Consecutive torch.randn calls on one CPU generator (what euler-a's per-step noise draws after
# the initial latents): (seed, sizes). Sizes below 16 take torch's scalar path, whose cached
# second Box-Muller value lives in the generator across calls; 16 and more the vectorised one.
RANDN_SEQUENCES = [
    (0, [3, 3, 5, 1]),
    (7, [1, 16, 1, 2]),
    (1234, [36, 36, 36, 36, 36]),
    (42, [64, 64, 64]),
    (123, [17, 2, 31, 16, 7, 15]),
    (2024, [4096, 4096, 4096]),
]


def write_randn_sequences() -> None:
    """Rows [sequence, seed, call size, kept count] and the kept values of each call."""
    rows: list[list[int]] = []
    values: list[np.ndarray] = []
    for index, (seed, sizes) in enumerate(RANDN_SEQUENCES):
        generator = torch.Generator("cpu").manual_seed(seed)
        for numel in sizes:
            draw = torch.randn(numel, generator=generator, dtype=torch.float32).numpy()
            kept = kept_indices(numel)
            rows.append([index, seed, numel, len(kept)])
            values.append(draw[kept])
    save("randn_sequence_cases.npy", np.array(rows, dtype=np.int64))
    save("randn_sequence_values.npy", np.concatenate(values).astype(np.float32))


# Resize cases: (source name, target width, target height).
RESIZE_CASES = [
    ("noise", 23, 15),
    ("noise", 80, 29),
    ("noise", 53, 20),
    ("noise", 30, 37),
    ("noise", 9, 120),
    ("noise", 60, 20),
    ("noise", 50, 36),
    ("noise", 45, 12),
    ("tiny3x2", 7, 5),
    ("tiny1x1", 4, 3),
    ("tiny5x4", 1, 1),
    ("concept", 224, 224),
]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SUBSAMPLE = (slice(None), slice(3, None, 11), slice(3, None, 11))


def png(name: str, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode=mode).save(OUT / name, optimize=True)


def concept_image() -> np.ndarray:
    """300×200 RGB: smooth gradients, hard edges (bicubic overshoot must clip) and a noisy
    patch, so it exercises the resize without costing much as a PNG."""
    y, x = np.mgrid[0:200, 0:300].astype(np.float64)
    r = 127.5 + 127.5 * np.sin(x / 17.0) * np.cos(y / 23.0)
    g = np.where((x // 25 + y // 25) % 2 == 0, 250.0, 5.0)
    b = np.clip((x + y) * 255.0 / 500.0, 0, 255)
    img = np.stack([r, g, b], axis=-1).round().astype(np.uint8)
    rng = np.random.default_rng(7)
    img[90:114, 140:176] = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    return img


def concept_mask() -> np.ndarray:
    """One-channel mask: an off-centre ellipse whose values 1, 128 and 255 all count (> 0)."""
    y, x = np.mgrid[0:200, 0:300].astype(np.float64)
    inside = ((x - 170) / 90) ** 2 + ((y - 95) / 70) ** 2 <= 1.0
    mask = np.where(inside, 255, 0).astype(np.uint8)
    mask[60:70, 100:200] = np.where(inside[60:70, 100:200], 1, 0)
    mask[120:130, 100:200] = np.where(inside[120:130, 100:200], 128, 0)
    return mask


def rgb_mask() -> np.ndarray:
    """Three-channel mask whose channels differ: binarised per channel."""
    y, x = np.mgrid[0:200, 0:300]
    disc = (x - 100) ** 2 + (y - 100) ** 2 < 80**2
    return np.stack([x < 200, y < 120, disc], axis=-1).astype(np.uint8) * 255


def resize_sources() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20231001)
    return {
        "noise": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
        "tiny3x2": rng.integers(0, 256, (2, 3, 3), dtype=np.uint8),
        "tiny1x1": rng.integers(0, 256, (1, 1, 3), dtype=np.uint8),
        "tiny5x4": rng.integers(0, 256, (4, 5, 3), dtype=np.uint8),
        "concept": concept_image(),
    }


def clip_pixels(resized: Image.Image) -> np.ndarray:
    """torchvision's ToTensor + Normalize, in torch float32 ops."""
    t = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return t.sub(mean).div(std).numpy()


def official_concept(image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """ELITE's test-time processing (datasets.py), with mask01 = mask > 0 per channel."""
    mask01 = (mask > 0).astype(np.uint8)
    bicubic = Image.Resampling.BICUBIC
    local = Image.fromarray(image * mask01).resize((224, 224), bicubic)
    glob = Image.fromarray(image).resize((224, 224), bicubic)
    seg = torch.from_numpy(mask01.astype(np.float32)).permute(2, 0, 1)[None]
    seg128 = torch.nn.functional.interpolate(seg, size=(128, 128), mode="nearest")
    seg16 = torch.nn.functional.interpolate(seg128, size=(16, 16), mode="nearest")
    return {
        "global_u8": np.array(glob),
        "local_u8": np.array(local),
        "global": clip_pixels(glob)[SUBSAMPLE],
        "local": clip_pixels(local)[SUBSAMPLE],
        "grid": (seg16[0, 0] > 0).numpy().reshape(-1).astype(np.float32),
    }


def exif_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def pillow_rgb(path: Path) -> np.ndarray:
    """`Image.open(path).convert("RGB")` as an array."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def write_decode_cases() -> None:
    rng = np.random.default_rng(99)
    rgba = rng.integers(0, 256, (15, 20, 4), dtype=np.uint8)
    png("decode_rgba.png", rgba, "RGBA")
    la = rng.integers(0, 256, (15, 20, 2), dtype=np.uint8)
    png("decode_la.png", la, "LA")
    gray = rng.integers(0, 256, (15, 20), dtype=np.uint8)
    png("decode_gray.png", gray, "L")
    rgb16 = rng.integers(0, 65536, (15, 20, 3), dtype=np.uint16)
    write_png16(OUT / "decode_rgb16.png", rgb16)
    for name in ["decode_rgba.png", "decode_la.png", "decode_gray.png", "decode_rgb16.png"]:
        save(name.replace(".png", "_rgb.npy"), pillow_rgb(OUT / name))

    # The other formats the runtime accepts, lossless so Pillow's decode is the reference.
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).save(OUT / "format.bmp")
    Image.fromarray(small).save(OUT / "format.tiff")
    Image.fromarray(small).save(OUT / "format.webp", lossless=True)
    Image.fromarray(small).quantize(16).save(OUT / "format.gif")
    for ext in ["bmp", "tiff", "webp", "gif"]:
        save(f"format_{ext}_rgb.npy", pillow_rgb(OUT / f"format.{ext}"))

    # 16-bit grayscale: we keep the high byte (Pillow would clip to 255), so numpy's >> 8 is
    # the reference.
    gray16 = rng.integers(0, 65536, (6, 8), dtype=np.uint16)
    write_png16(OUT / "decode_gray16.png", gray16[:, :, None])
    save("decode_gray16_rgb.npy", np.repeat((gray16 >> 8).astype(np.uint8)[:, :, None], 3, 2))

    # EXIF orientation 6 (rotate 90° clockwise to display): lossless PNG (eXIf chunk) and JPEG.
    photo = concept_image()[40:64, 50:82]  # 32×24
    Image.fromarray(photo).save(OUT / "exif6.png", exif=exif_orientation(6))
    Image.fromarray(photo).save(
        OUT / "exif6.jpg", quality=95, subsampling=0, exif=exif_orientation(6)
    )
    for name in ["exif6.png", "exif6.jpg"]:
        with Image.open(OUT / name) as im:
            upright = np.array(ImageOps.exif_transpose(im).convert("RGB"))
        save(name.replace(".", "_") + "_upright.npy", upright)


def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit gray or RGB PNG (Pillow cannot write 16-bit RGB)."""
    height, width, channels = array.shape
    color_type = {1: 0, 3: 2}[channels]
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def write_preprocess() -> None:
    sources = resize_sources()
    for name, array in sources.items():
        png(f"resize_src_{name}.png", array)
    for name, width, height in RESIZE_CASES:
        out = Image.fromarray(sources[name]).resize((width, height), Image.Resampling.BICUBIC)
        png(f"resize_{name}_{width}x{height}.png", np.array(out))

    image = sources["concept"]
    mask = concept_mask()
    png("concept_mask.png", mask, "L")
    png("concept_mask_rgb.png", rgb_mask())
    png("concept_mask_small.png", mask[:100, :150], "L")
    cases = {
        "concept_l": np.repeat(mask[:, :, None], 3, axis=2),
        "concept_rgb": rgb_mask(),
    }
    for case, case_mask in cases.items():
        ref = official_concept(image, case_mask)
        if case == "concept_l":
            # The full-resolution uint8 squash of the masked image, and the (mask-independent)
            # normalised global input.
            png(f"{case}_local_224.png", ref["local_u8"])
            save("concept_global_sub.npy", ref["global"])
        save(f"{case}_local_sub.npy", ref["local"])
        save(f"{case}_grid.npy", ref["grid"])
    write_decode_cases()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    sections = sys.argv[1:] or ["lms", "randn", "randn_sequences", "preprocess"]
    if "lms" in sections:
        write_lms()
    if "randn" in sections:
        write_randn()
    if "randn_sequences" in sections:
        write_randn_sequences()
    if "preprocess" in sections:
        write_preprocess()


if __name__ == "__main__":
    main()
