"""A minimal JPEG writer for the layouts Pillow cannot write: any chroma sampling factors
(4:4:0, 4:1:1, 3×2, ...) and lossless (SOF3) JPEG.

Only *inputs* for the decoder tests come from here; what the tests compare against is always
Pillow's decoding of these files (``export/jpeg_matrix.py``), so the writer need not match any
encoder, only produce valid files. Its quantisation and Huffman tables are copied from a JPEG
that Pillow wrote (libjpeg's standard tables at the given quality), so nothing here is typed
in by hand but the zig-zag order and the marker layout of ITU T.81.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.fft import dctn


def zigzag() -> list[int]:
    """Natural (row-major) index of each zig-zag position of an 8×8 block (T.81 figure A.6)."""
    order = sorted(
        ((y, x) for y in range(8) for x in range(8)),
        key=lambda p: (p[0] + p[1], p[1] if (p[0] + p[1]) % 2 == 0 else p[0]),
    )
    return [y * 8 + x for y, x in order]


ZIGZAG = zigzag()


@dataclass(frozen=True)
class Huffman:
    bits: bytes  # 16 counts of codes per length
    values: bytes

    def codes(self) -> dict[int, tuple[int, int]]:
        """symbol -> (code, length), canonical as T.81 Annex C builds them."""
        table: dict[int, tuple[int, int]] = {}
        code, k = 0, 0
        for length in range(1, 17):
            for _ in range(self.bits[length - 1]):
                table[self.values[k]] = (code, length)
                code += 1
                k += 1
            code <<= 1
        return table


@dataclass(frozen=True)
class Tables:
    quant: bytes  # 64 values in zig-zag order
    dc: Huffman
    ac: Huffman


def segments(data: bytes) -> list[tuple[int, bytes]]:
    """The marker segments of a JPEG up to its first SOS: (marker, payload)."""
    out, i = [], 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        out.append((marker, data[i + 4 : i + 2 + length]))
        if marker == 0xDA:
            break
        i += 2 + length
    return out


def tables_from_pillow(quality: int) -> Tables:
    """The first quantisation table and the first DC and AC Huffman tables of a grayscale JPEG
    that Pillow writes at ``quality``."""
    buf = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buf, "JPEG", quality=quality)
    quant, dc, ac = b"", None, None
    for marker, payload in segments(buf.getvalue()):
        if marker == 0xDB and not quant:
            assert payload[0] == 0, "8-bit table 0"
            quant = payload[1:65]
        if marker == 0xC4:
            i = 0
            while i < len(payload):
                kind, bits = payload[i], payload[i + 1 : i + 17]
                values = payload[i + 17 : i + 17 + sum(bits)]
                if kind == 0x00:
                    dc = Huffman(bits, values)
                elif kind == 0x10:
                    ac = Huffman(bits, values)
                i += 17 + sum(bits)
    assert quant and dc is not None and ac is not None
    return Tables(quant, dc, ac)


class BitWriter:
    def __init__(self) -> None:
        self.out = bytearray()
        self.acc, self.n = 0, 0

    def write(self, value: int, length: int) -> None:
        self.acc = (self.acc << length) | (value & ((1 << length) - 1))
        self.n += length
        while self.n >= 8:
            byte = (self.acc >> (self.n - 8)) & 0xFF
            self.out.append(byte)
            if byte == 0xFF:
                self.out.append(0)  # byte stuffing
            self.n -= 8
        self.acc &= (1 << self.n) - 1

    def flush(self) -> bytes:
        if self.n:
            self.write((1 << (8 - self.n)) - 1, 8 - self.n)  # pad with 1 bits
        return bytes(self.out)


def category(v: int) -> tuple[int, int]:
    """(SSSS, extra bits) of a DC difference or AC coefficient (T.81 F.1.2.1)."""
    size = abs(v).bit_length()
    return size, (v if v >= 0 else v + (1 << size) - 1)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def dht(tables: Tables) -> bytes:
    return segment(
        0xC4,
        b"\x00" + tables.dc.bits + tables.dc.values + b"\x10" + tables.ac.bits + tables.ac.values,
    )


def adobe(transform: int) -> bytes:
    """APP14 "Adobe" with the colour transform flag (0: none, 1: YCbCr, 2: YCCK)."""
    return segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, transform))


def plane(samples: np.ndarray, h: int, v: int, hmax: int, vmax: int) -> np.ndarray:
    """One component at its sampling factors: box-averaged, then padded by edge replication to
    whole MCUs."""
    height, width = samples.shape
    fy, fx = vmax // v, hmax // h
    ph, pw = -(-height // (8 * vmax)) * 8 * vmax, -(-width // (8 * hmax)) * 8 * hmax
    padded = np.pad(samples.astype(np.float64), ((0, ph - height), (0, pw - width)), mode="edge")
    return padded.reshape(ph // fy, fy, pw // fx, fx).mean(axis=(1, 3))


def encode_baseline(
    components: list[np.ndarray],
    sampling: list[tuple[int, int]],
    quality: int = 90,
    adobe_transform: int | None = None,
) -> bytes:
    """A baseline JPEG of the given component planes (full resolution, uint8, stored as given:
    the caller does any colour transform) with the given (h, v) sampling factors."""
    tables = tables_from_pillow(quality)
    height, width = components[0].shape
    hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
    planes = [plane(c, h, v, hmax, vmax) for c, (h, v) in zip(components, sampling)]
    quant = np.frombuffer(tables.quant, dtype=np.uint8).astype(np.float64)
    dc_codes, ac_codes = tables.dc.codes(), tables.ac.codes()
    bits = BitWriter()
    predictors = [0] * len(components)
    mcus_y, mcus_x = -(-height // (8 * vmax)), -(-width // (8 * hmax))
    for my in range(mcus_y):
        for mx in range(mcus_x):
            for ci, (h, v) in enumerate(sampling):
                for by in range(v):
                    for bx in range(h):
                        y0, x0 = (my * v + by) * 8, (mx * h + bx) * 8
                        block = planes[ci][y0 : y0 + 8, x0 : x0 + 8] - 128.0
                        coef = dctn(block, norm="ortho").reshape(64)[ZIGZAG]
                        q = np.round(coef / quant).astype(int)
                        size, extra = category(int(q[0]) - predictors[ci])
                        predictors[ci] = int(q[0])
                        bits.write(*dc_codes[size])
                        bits.write(extra, size)
                        run = 0
                        for k in range(1, 64):
                            if q[k] == 0:
                                run += 1
                                continue
                            while run > 15:
                                bits.write(*ac_codes[0xF0])  # ZRL
                                run -= 16
                            size, extra = category(int(q[k]))
                            bits.write(*ac_codes[(run << 4) | size])
                            bits.write(extra, size)
                            run = 0
                        if run:
                            bits.write(*ac_codes[0x00])  # EOB
    ids = range(1, len(components) + 1)
    sof = struct.pack(">BHHB", 8, height, width, len(components)) + b"".join(
        bytes([i, (h << 4) | v, 0]) for i, (h, v) in zip(ids, sampling)
    )
    sos = bytes([len(components)]) + b"".join(bytes([i, 0x00]) for i in ids) + b"\x00\x3f\x00"
    return (
        b"\xff\xd8"
        + (adobe(adobe_transform) if adobe_transform is not None else b"")
        + segment(0xDB, b"\x00" + tables.quant)
        + segment(0xC0, sof)
        + dht(tables)
        + segment(0xDA, sos)
        + bits.flush()
        + b"\xff\xd9"
    )


def encode_lossless_gray(samples: np.ndarray) -> bytes:
    """A lossless (SOF3) 8-bit grayscale JPEG, predictor 1 (left), point transform 0."""
    tables = tables_from_pillow(90)  # the DC table codes differences of category 0..11
    dc_codes = tables.dc.codes()
    height, width = samples.shape
    s = samples.astype(int)
    bits = BitWriter()
    for y in range(height):
        for x in range(width):
            if x == 0 and y == 0:
                pred = 128
            elif y == 0 or x > 0:
                pred = s[y, x - 1] if x > 0 else s[y - 1, x]
            else:
                pred = s[y - 1, x]
            size, extra = category(int(s[y, x]) - int(pred))
            bits.write(*dc_codes[size])
            bits.write(extra, size)
    sof = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    sos = b"\x01\x01\x00" + bytes([1, 0, 0])  # Ss = predictor 1, Se = 0, Ah/Al = 0
    return (
        b"\xff\xd8"
        + segment(0xC3, sof)
        + segment(0xC4, b"\x00" + tables.dc.bits + tables.dc.values)
        + segment(0xDA, sos)
        + bits.flush()
        + b"\xff\xd9"
    )
