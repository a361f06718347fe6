"""The JPEG decoding matrix: JPEG files of every kind people have, with Pillow's decoded pixels.

Writes into ``tests/fixtures/jpeg/`` (or ``--out``) a set of small JPEGs cut from the
scikit-image sample photos of the golden cases (``export/sample_images.py``), and
``matrix.json``, which records for each file what Pillow 13 gives for
``ImageOps.exif_transpose(Image.open(f)).convert("RGB")`` — what the runtime must reproduce —
as the sha256 and shape of the uint8 ``[H, W, 3]`` array (or the error Pillow raises). The
Rust test ``tests/jpeg_matrix.rs`` requires the runtime's decoding to have the same sha256 on
every file.

Most files are written by Pillow itself (each subsampling mode it writes, qualities,
progressive, optimised tables, restart intervals, grayscale, CMYK with the Adobe marker, RGB
without colour transform, EXIF orientations, an ICC profile, odd sizes down to 1×1). Layouts
Pillow cannot write come from ``export/jpeg_writer.py`` (4:4:0, 4:1:1, 3×2 sampling, lossless)
or from byte edits of Pillow's files (YCCK: the Adobe transform flag; a truncated file; a
missing EOI; a corrupt entropy byte; a 12-bit precision header). ``--check`` rebuilds
everything in a temporary directory and compares bytes with ``--out``.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import io
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image, ImageCms, ImageOps, features

from . import jpeg_writer
from .sample_images import SAMPLES, load_photo

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "jpeg"

Box = tuple[int, int, int, int]  # left, top, right, bottom


@dataclass(frozen=True)
class Entry:
    name: str  # file name
    what: str  # what the file exercises
    photo: str  # the skimage.data sample it is cut from
    box: Box | None  # crop of the photo (None: the whole photo)
    mode: str = "RGB"  # Pillow mode before saving
    save: dict[str, Any] = field(default_factory=dict)  # Image.save keyword arguments
    # Instead of Image.save: a writer of the cropped pixels (export/jpeg_writer.py).
    writer: Callable[[np.ndarray], bytes] | None = None
    # A byte edit applied to the written file.
    edit: Callable[[bytes], bytes] | None = None


def exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def srgb_profile() -> bytes:
    """littlecms's sRGB profile with its creation date (header bytes 24..36) and profile ID
    (84..100; all zero means "not computed") cleared, so that reruns write the same bytes."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    data[24:36] = bytes(12)
    data[84:100] = bytes(16)
    return bytes(data)


def find_marker(data: bytes, marker: int) -> int:
    """Offset of the first marker segment ``0xFF marker`` before the first scan."""
    i = 2
    while i < len(data):
        if data[i + 1] == marker:
            return i
        if data[i + 1] == 0xDA:
            break
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ValueError(f"no 0x{marker:02X} marker")


def set_adobe_transform(transform: int) -> Callable[[bytes], bytes]:
    """The APP14 Adobe marker's transform flag (its last byte) set to ``transform``."""

    def edit(data: bytes) -> bytes:
        i = find_marker(data, 0xEE)
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        return data[: end - 1] + bytes([transform]) + data[end:]

    return edit


def drop_adobe(data: bytes) -> bytes:
    i = find_marker(data, 0xEE)
    return data[:i] + data[i + 2 + int.from_bytes(data[i + 2 : i + 4], "big") :]


def truncate_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def drop_eoi(data: bytes) -> bytes:
    assert data.endswith(b"\xff\xd9")
    return data[:-2]


def append_garbage(data: bytes) -> bytes:
    return data + b"trailing bytes after EOI"


def corrupt_entropy(data: bytes) -> bytes:
    """One byte of the entropy-coded data changed (never into a marker): libjpeg warns and
    goes on, and so does Pillow."""
    start = find_marker(data, 0xDA)
    i = start + (len(data) - start) // 3
    while data[i] == 0xFF or data[i - 1] == 0xFF or data[i] == 0x00:
        i += 1
    return data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1 :]


def precision_12(data: bytes) -> bytes:
    """The SOF header's sample precision changed to 12 bits (Pillow refuses those)."""
    i = find_marker(data, 0xC0)
    return data[: i + 4] + b"\x0c" + data[i + 5 :]


def baseline(sampling: list[tuple[int, int]], quality: int) -> Callable[[np.ndarray], bytes]:
    """jpeg_writer on the YCbCr planes Pillow computes for the pixels."""

    def write(rgb: np.ndarray) -> bytes:
        ycc = np.array(Image.fromarray(rgb).convert("YCbCr"))
        planes = [ycc[:, :, c] for c in range(3)]
        return jpeg_writer.encode_baseline(planes, sampling, quality)

    return write


def lossless_gray(rgb: np.ndarray) -> bytes:
    return jpeg_writer.encode_lossless_gray(np.array(Image.fromarray(rgb).convert("L")))


CHELSEA, COFFEE = "chelsea", "coffee"
CAT = (150, 60, 246, 124)  # 96×64 of the cat's face
CUP = (200, 100, 296, 164)  # 96×64 across the cup's rim
ODD = (201, 99, 298, 160)  # 97×61: partial MCUs on both axes

ENTRIES: tuple[Entry, ...] = (
    Entry("chelsea_420_q75.jpg", "the whole photo, 451×300, 4:2:0, quality 75 "
          "(Pillow's defaults)", CHELSEA, None, save={"quality": 75}),
    Entry("cat_444_q95.jpg", "4:4:4, quality 95", CHELSEA, CAT,
          save={"quality": 95, "subsampling": "4:4:4"}),
    Entry("cat_422_q85.jpg", "4:2:2, quality 85", CHELSEA, CAT,
          save={"quality": 85, "subsampling": "4:2:2"}),
    Entry("cat_420_q50.jpg", "4:2:0, quality 50", CHELSEA, CAT,
          save={"quality": 50, "subsampling": "4:2:0"}),
    Entry("cup_420_q20.jpg", "4:2:0, quality 20 (coarse)", COFFEE, CUP,
          save={"quality": 20, "subsampling": "4:2:0"}),
    Entry("cup_444_q100.jpg", "4:4:4, quality 100", COFFEE, CUP,
          save={"quality": 100, "subsampling": "4:4:4"}),
    Entry("odd_420_q90.jpg", "97×61, 4:2:0: partial MCUs on both axes", COFFEE, ODD,
          save={"quality": 90, "subsampling": "4:2:0"}),
    Entry("odd_422_q90.jpg", "97×61, 4:2:2", COFFEE, ODD,
          save={"quality": 90, "subsampling": "4:2:2"}),
    Entry("odd_440_q90.jpg", "97×61, 4:4:0 (luma 1×2; jpeg_writer)", COFFEE, ODD,
          writer=baseline([(1, 2), (1, 1), (1, 1)], 90)),
    Entry("cup_440_q80.jpg", "4:4:0 (luma 1×2; jpeg_writer)", COFFEE, CUP,
          writer=baseline([(1, 2), (1, 1), (1, 1)], 80)),
    Entry("cup_411_q85.jpg", "4:1:1 (luma 4×1; jpeg_writer)", COFFEE, CUP,
          writer=baseline([(4, 1), (1, 1), (1, 1)], 85)),
    Entry("odd_32_q85.jpg", "97×61, luma 3×2 (generic upsampling; jpeg_writer)", COFFEE, ODD,
          writer=baseline([(3, 2), (1, 1), (1, 1)], 85)),
    Entry("cup_444_writer.jpg", "4:4:4 from jpeg_writer (a non-libjpeg encoder)", COFFEE,
          CUP, writer=baseline([(1, 1), (1, 1), (1, 1)], 75)),
    Entry("cat_420_progressive.jpg", "progressive, 4:2:0", CHELSEA, CAT,
          save={"quality": 85, "subsampling": "4:2:0", "progressive": True}),
    Entry("cup_444_progressive.jpg", "progressive, 4:4:4", COFFEE, CUP,
          save={"quality": 90, "subsampling": "4:4:4", "progressive": True}),
    Entry("odd_422_progressive.jpg", "progressive, 4:2:2, 97×61", COFFEE, ODD,
          save={"quality": 80, "subsampling": "4:2:2", "progressive": True}),
    Entry("cat_420_optimized.jpg", "optimised Huffman tables", CHELSEA, CAT,
          save={"quality": 85, "optimize": True}),
    Entry("cat_420_restart1.jpg", "restart marker every MCU", CHELSEA, CAT,
          save={"quality": 85, "restart_marker_blocks": 1}),
    Entry("odd_444_restart_rows.jpg", "restart marker every MCU row, 4:4:4", COFFEE, ODD,
          save={"quality": 85, "subsampling": "4:4:4", "restart_marker_rows": 1}),
    Entry("cup_420_progressive_restart.jpg", "progressive with restart markers", COFFEE, CUP,
          save={"quality": 85, "progressive": True, "restart_marker_blocks": 3}),
    Entry("cat_gray_q90.jpg", "grayscale (one component)", CHELSEA, CAT, mode="L",
          save={"quality": 90}),
    Entry("odd_gray_progressive.jpg", "grayscale, progressive, 97×61", COFFEE, ODD, mode="L",
          save={"quality": 80, "progressive": True}),
    Entry("cup_cmyk_adobe.jpg", "CMYK with the Adobe marker (transform 0), inverted as "
          "Photoshop writes it", COFFEE, CUP, mode="CMYK", save={"quality": 90}),
    Entry("cup_ycck_adobe.jpg", "YCCK (Adobe transform 2): Pillow's CMYK file with the flag "
          "set", COFFEE, CUP, mode="CMYK", save={"quality": 90}, edit=set_adobe_transform(2)),
    Entry("cup_cmyk_no_adobe.jpg", "four components without an Adobe marker", COFFEE, CUP,
          mode="CMYK", save={"quality": 90}, edit=drop_adobe),
    Entry("cat_cmyk_progressive.jpg", "CMYK, progressive", CHELSEA, CAT, mode="CMYK",
          save={"quality": 85, "progressive": True}),
    Entry("cup_rgb_keep.jpg", "RGB components without colour transform (Adobe transform 0)",
          COFFEE, CUP, save={"quality": 90, "keep_rgb": True, "subsampling": "4:4:4"}),
    Entry("cat_icc.jpg", "an embedded ICC profile (ignored by convert(\"RGB\"))", CHELSEA,
          CAT, save={"quality": 90, "icc_profile": srgb_profile()}),
    Entry("cat_exif6.jpg", "EXIF orientation 6 (rotate 90° clockwise), 4:2:0", CHELSEA, CAT,
          save={"quality": 90, "exif": exif(6)}),
    Entry("odd_exif3.jpg", "EXIF orientation 3 (180°)", COFFEE, ODD,
          save={"quality": 90, "exif": exif(3)}),
    Entry("odd_exif8_progressive.jpg", "EXIF orientation 8, progressive", COFFEE, ODD,
          save={"quality": 90, "progressive": True, "exif": exif(8)}),
    Entry("odd_exif5.jpg", "EXIF orientation 5 (transpose)", COFFEE, ODD,
          save={"quality": 90, "exif": exif(5)}),
    Entry("one_rgb.jpg", "1×1 RGB", COFFEE, (250, 130, 251, 131), save={"quality": 90}),
    Entry("one_gray.jpg", "1×1 grayscale", COFFEE, (250, 130, 251, 131), mode="L",
          save={"quality": 90}),
    Entry("row_420.jpg", "31×1, 4:2:0", COFFEE, (230, 130, 261, 131), save={"quality": 90}),
    Entry("column_420_progressive.jpg", "1×29, 4:2:0, progressive", COFFEE,
          (250, 110, 251, 139), save={"quality": 90, "progressive": True}),
    Entry("cat_q1.jpg", "quality 1 (extreme quantisation)", CHELSEA, CAT,
          save={"quality": 1}),
    Entry("cat_no_eoi.jpg", "no EOI marker after complete data (Pillow accepts it)",
          CHELSEA, CAT, save={"quality": 85}, edit=drop_eoi),
    Entry("cat_trailing.jpg", "bytes after the EOI marker", CHELSEA, CAT,
          save={"quality": 85}, edit=append_garbage),
    Entry("cat_corrupt.jpg", "one corrupt entropy-coded byte (libjpeg warns and goes on)",
          CHELSEA, CAT, save={"quality": 85}, edit=corrupt_entropy),
    Entry("cat_truncated.jpg", "truncated in the middle of the scan (Pillow: error)", CHELSEA,
          CAT, save={"quality": 85}, edit=truncate_half),
    Entry("cat_progressive_truncated.jpg", "progressive, truncated (Pillow: error)", CHELSEA,
          CAT, save={"quality": 85, "progressive": True}, edit=truncate_half),
    Entry("cat_precision12.jpg", "12-bit sample precision in the header (Pillow: error)",
          CHELSEA, CAT, save={"quality": 85}, edit=precision_12),
    Entry("cat_lossless.jpg", "lossless JPEG (SOF3), grayscale; Pillow 13 decodes it with "
          "libjpeg-turbo 3", CHELSEA, (150, 60, 182, 84), writer=lossless_gray),
)  # fmt: skip


def photo(name: str) -> np.ndarray:
    (sample,) = [s for s in SAMPLES if s.name == name]
    return load_photo(sample)


def write_file(entry: Entry, path: Path) -> None:
    pixels = photo(entry.photo)
    if entry.box is not None:
        left, top, right, bottom = entry.box
        pixels = pixels[top:bottom, left:right]
    if entry.writer is not None:
        data = entry.writer(np.ascontiguousarray(pixels))
    else:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).convert(entry.mode).save(
            buf, "JPEG", **entry.save
        )
        data = buf.getvalue()
    if entry.edit is not None:
        data = entry.edit(data)
    path.write_bytes(data)


def pillow_reference(path: Path) -> dict[str, Any]:
    """What Pillow makes of the file: the header it reads and the pixels, or its error."""
    try:
        with Image.open(path) as im:
            info: dict[str, Any] = {
                "pillow_mode": im.mode,
                "stored_size": list(im.size),
                "progressive": bool(im.info.get("progressive", 0)),
                "sampling": [list(layer[1:3]) for layer in getattr(im, "layer", [])],
                "orientation": im.getexif().get(0x0112, 1),
            }
            rgb = np.ascontiguousarray(np.array(ImageOps.exif_transpose(im).convert("RGB")))
    except (OSError, SyntaxError, ValueError) as e:
        message = str(e).replace(str(path), path.name)  # no machine-specific paths
        return {"pillow_error": f"{type(e).__name__}: {message}"}
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    info["rgb_shape"] = list(rgb.shape)
    info["rgb_sha256"] = hashlib.sha256(rgb.tobytes()).hexdigest()
    return info


def write_matrix(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written, files = [], []
    for entry in ENTRIES:
        path = out_dir / entry.name
        write_file(entry, path)
        written.append(path)
        files.append(
            {"file": entry.name, "what": entry.what, "bytes": path.stat().st_size}
            | pillow_reference(path)
        )
    doc = {
        "generator": "python -m export.jpeg_matrix (export/jpeg_matrix.py)",
        "reference": f"Pillow {PIL.__version__} with libjpeg-turbo "
        f"{features.version_feature('libjpeg_turbo')}: "
        'ImageOps.exif_transpose(Image.open(f)).convert("RGB")',
        "pixels": "sha256 of the uint8 [H, W, 3] array in C order",
        "files": files,
    }
    matrix = out_dir / "matrix.json"
    matrix.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(matrix)
    return written


def check(out_dir: Path) -> list[str]:
    """Names of files in ``out_dir`` that differ from a fresh build (empty: all identical)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = write_matrix(Path(tmp))
        stale = [
            p.name
            for p in fresh
            if not (out_dir / p.name).is_file()
            or not filecmp.cmp(p, out_dir / p.name, shallow=False)
        ]
        extra = {p.name for p in out_dir.iterdir()} - {p.name for p in fresh}
        return stale + sorted(extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out, write nothing")
    args = parser.parse_args()
    if args.check:
        stale = check(args.out)
        print(f"{args.out}: " + (f"differs: {', '.join(stale)}" if stale else "up to date"))
        return 1 if stale else 0
    total = 0
    for path in write_matrix(args.out):
        total += path.stat().st_size
        print(f"{path} ({path.stat().st_size} bytes)")
    print(f"{total} bytes in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
