"""Input photographs and object masks of the golden cases, from scikit-image's sample data.

Writes into ``tests/golden/images/`` (or ``--out``):

- ``<name>.png``: the photograph as scikit-image ships it (RGB, 8 bit, original size);
- ``<name>_mask.png``: its object mask, 8-bit grayscale, same size, 255 = object, 0 = background
  (ELITE's convention: white = object);
- ``<name>.jpg`` for the samples with ``jpeg=True``: the photograph as Pillow writes a JPEG by
  default (4:2:0, baseline) at quality 90, the input of the golden JPEG case;
- ``SOURCES.md``: each image's origin and licence, quoted from scikit-image's ``skimage.data``.

Masks are polygons and ellipses whose coordinates are written below (placed by eye on the
photographs, no learned segmentation), so the same inputs give the same bytes on every run.
``--check`` rebuilds everything in a temporary directory and compares bytes with ``--out``;
``--overlay DIR`` also writes mask-over-photo previews for looking at (not committed).
"""

from __future__ import annotations

import argparse
import filecmp
import importlib.metadata
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image
from skimage.draw import ellipse, polygon

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "images"

Point = tuple[float, float]  # (x, y) in pixels: column, row


@dataclass(frozen=True)
class Ellipse:
    center: Point
    radii: Point  # (x radius, y radius)


@dataclass(frozen=True)
class SampleImage:
    name: str  # the skimage.data loader, also the file stem
    subject: str  # what the mask covers
    source: str  # from skimage.data's docstring
    licence: str  # from skimage.data's docstring
    polygons: tuple[tuple[Point, ...], ...]
    ellipses: tuple[Ellipse, ...] = ()
    jpeg: bool = False  # also write <name>.jpg


JPEG_QUALITY = 90


SAMPLES: tuple[SampleImage, ...] = (
    SampleImage(
        name="chelsea",
        subject="the cat (head, ears, shoulder); the blurred room at the top left and right "
        "is background",
        source="`skimage.data.chelsea()`: Chelsea the cat, photographed by Stefan van der Walt",
        licence='"No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."',
        polygons=(
            (
                (0, 299),
                (0, 128),
                (12, 122),
                (28, 110),
                (30, 60),
                (35, 20),
                (40, 0),
                (398, 0),
                (372, 45),
                (362, 70),
                (375, 95),
                (380, 125),
                (372, 160),
                (360, 195),
                (350, 225),
                (345, 260),
                (345, 299),
            ),
        ),
        jpeg=True,
    ),
    SampleImage(
        name="coffee",
        subject="the cup with its handle (and the bit of the spoon's neck that lies against "
        "it); the saucer, the spoon's bowl and the table are background",
        source="`skimage.data.coffee()`: coffee cup, photograph courtesy of Pikolo Espresso Bar",
        licence='"No copyright restrictions. CC0 by the photographer (Rachel Michetti)."',
        polygons=(
            (  # the body below the rim, left side down to the base, up the right side
                (174, 112),
                (180, 170),
                (192, 205),
                (205, 232),
                (225, 255),
                (255, 275),
                (270, 284),
                (300, 286),
                (326, 280),
                (328, 262),
                (345, 245),
                (365, 232),
                (383, 210),
                (398, 175),
                (407, 112),
            ),
            (  # the handle
                (205, 232),
                (200, 245),
                (196, 265),
                (196, 285),
                (203, 300),
                (215, 307),
                (232, 305),
                (250, 298),
                (258, 285),
                (258, 255),
                (250, 240),
                (235, 232),
            ),
        ),
        ellipses=(Ellipse(center=(290, 112), radii=(119, 96)),),  # the rim, seen from above
    ),
)


def load_photo(sample: SampleImage) -> np.ndarray:
    photo = getattr(skimage.data, sample.name)()
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"skimage.data.{sample.name}: expected uint8 RGB, got {photo.shape}")
    return photo


def object_mask(sample: SampleImage, height: int, width: int) -> np.ndarray:
    """255 inside any of the sample's polygons and ellipses, 0 elsewhere (uint8, H×W)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for points in sample.polygons:
        xs = np.array([x for x, _ in points], dtype=float)
        ys = np.array([y for _, y in points], dtype=float)
        rows, cols = polygon(ys, xs, shape=mask.shape)
        mask[rows, cols] = 255
    for shape in sample.ellipses:
        (cx, cy), (rx, ry) = shape.center, shape.radii
        rows, cols = ellipse(cy, cx, ry, rx, shape=mask.shape)
        mask[rows, cols] = 255
    return mask


def save_png(array: np.ndarray, path: Path) -> None:
    """PNG without metadata (no timestamps), so identical arrays give identical bytes."""
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    expected = "L" if array.ndim == 2 else "RGB"
    if image.mode != expected:
        raise ValueError(f"{path}: image mode {image.mode}, expected {expected}")
    image.save(path, format="PNG", compress_level=9)


def save_jpeg(array: np.ndarray, path: Path) -> None:
    """Pillow's default JPEG (4:2:0, baseline, no EXIF or ICC) at ``JPEG_QUALITY``."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        path, format="JPEG", quality=JPEG_QUALITY
    )


def sources_markdown(sizes: dict[str, tuple[int, int]]) -> str:
    lines = [
        "# Golden-case input images",
        "",
        "Written by `export/sample_images.py` (do not edit by hand; rerun the script) from the",
        f"sample data bundled with scikit-image {importlib.metadata.version('scikit-image')} "
        "(`skimage.data`), at their",
        "original size (not downscaled). Source and licence are quoted from the `skimage.data`",
        "docstrings. Masks: 8-bit grayscale PNG, same size as the photograph, 255 = object,",
        "0 = background; drawn from the polygon/ellipse coordinates in the script. A `.jpg` is",
        f"the photograph as Pillow writes it at quality {JPEG_QUALITY} (4:2:0), for the JPEG "
        "golden case; `_jpeg_pillow.png` is Pillow's decoding of that JPEG, stored losslessly.",
        "",
        "| file | size (w×h) | source | licence | mask covers |",
        "|---|---|---|---|---|",
    ]
    for sample in SAMPLES:
        width, height = sizes[sample.name]
        files = f"`{sample.name}.png`, `{sample.name}_mask.png`"
        if sample.jpeg:
            files += f", `{sample.name}.jpg`, `{sample.name}_jpeg_pillow.png`"
        lines.append(
            f"| {files} | {width}×{height} | {sample.source} | {sample.licence} "
            f"| {sample.subject} |"
        )
    return "\n".join(lines) + "\n"


def overlay(photo: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Photo with the background darkened and tinted, for checking a mask by eye."""
    out = photo.astype(np.float32)
    background = mask == 0
    out[background] = out[background] * 0.3 + np.array([0, 0, 160], dtype=np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_samples(out_dir: Path, overlay_dir: Path | None = None) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sizes: dict[str, tuple[int, int]] = {}
    for sample in SAMPLES:
        photo = load_photo(sample)
        height, width = photo.shape[:2]
        mask = object_mask(sample, height, width)
        sizes[sample.name] = (width, height)
        for array, path in (
            (photo, out_dir / f"{sample.name}.png"),
            (mask, out_dir / f"{sample.name}_mask.png"),
        ):
            save_png(array, path)
            written.append(path)
        if sample.jpeg:
            jpeg = out_dir / f"{sample.name}.jpg"
            save_jpeg(photo, jpeg)
            # What the official code sees of the JPEG (Pillow's decoding), stored losslessly:
            # a concept from it must equal the concept from the JPEG (tests/golden.rs).
            with Image.open(jpeg) as decoded:
                pillow = np.asarray(decoded.convert("RGB"))
            save_png(pillow, out_dir / f"{sample.name}_jpeg_pillow.png")
            written += [jpeg, out_dir / f"{sample.name}_jpeg_pillow.png"]
        if overlay_dir is not None:
            overlay_dir.mkdir(parents=True, exist_ok=True)
            save_png(overlay(photo, mask), overlay_dir / f"{sample.name}_overlay.png")
    sources = out_dir / "SOURCES.md"
    sources.write_text(sources_markdown(sizes), encoding="utf-8")
    written.append(sources)
    return written


def check(out_dir: Path) -> list[str]:
    """Names of files in ``out_dir`` that differ from a fresh build (empty: all identical)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_samples(Path(tmp))
        return [
            path.name
            for path in fresh
            if not (out_dir / path.name).is_file()
            or not filecmp.cmp(path, out_dir / path.name, shallow=False)
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--overlay", type=Path, help="also write mask previews here")
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args()
    if args.check:
        stale = check(args.out)
        print(f"{args.out}: " + (f"differs: {', '.join(stale)}" if stale else "up to date"))
        return 1 if stale else 0
    for path in write_samples(args.out, args.overlay):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
