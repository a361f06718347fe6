"""CLIP tokenizer files: the upstream (transformers) directory and the bundle's tokenizer.json.

Two products, one vocabulary:

- ``write_clip_vocab`` writes a transformers-format CLIP tokenizer directory (``vocab.json``,
  ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``) from CLIP's own BPE
  file, ``bpe_simple_vocab_16e6.txt.gz``, shipped in the ``open_clip_torch`` package. The tiny
  model generator saves this as its upstream-format tokenizer; for real exports the same
  directory comes from ``openai/clip-vit-large-patch14``.
- ``build_tokenizer_json`` turns such a directory into the bundle's ``tokenizer.json`` (HF
  ``tokenizers`` format, 77 tokens, pad = ``<|endoftext|>``), the file the Rust runtime loads.

The pipeline is the one in DESIGN.md §5 ("Tokenizer"); it reproduces
transformers' CLIP tokenizer id for id. Command line (writes the Rust test fixture)::

    python -m export.tokenizer --fixture tests/fixtures/tokenizer/tokenizer.json
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
)
from tokenizers.models import BPE
from tokenizers.processors import TemplateProcessing

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Lines 1..48894 of the BPE file (line 0 is a version header), as CLIP slices it.
MERGE_COUNT = 49152 - 256 - 2
VOCAB_SIZE = 49408
MAX_TOKENS = 77
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
END_OF_WORD = "</w>"
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MERGES_HEADER = "#version: 0.2"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def find_bpe_file() -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz`` inside the installed ``open_clip`` package.

    The package is installed only for this data file and is never imported.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{BPE_FILE_NAME}: package `open_clip` (open_clip_torch) is not installed; "
            "run scripts/setup-python"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BPE_FILE_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{BPE_FILE_NAME} not found in {list(spec.submodule_search_locations)}")


def read_bpe_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The 48894 merges of CLIP's BPE file, in rank order (CLIP's own slicing)."""
    lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
    for rank, merge in enumerate(merges):
        if len(merge) != 2:
            raise ValueError(f"{bpe_path}: merge {rank + 1} is not a pair: {merge!r}")
    return [(first, second) for first, second in merges]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary: bytes, bytes + ``</w>``, every merge joined, then bos and eos."""
    base = list(bytes_to_unicode().values())
    tokens = base + [token + END_OF_WORD for token in base]
    tokens += [first + second for first, second in merges]
    tokens += [BOS, EOS]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or len(tokens) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab


def _write_json(path: Path, value: object) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True)
    path.write_text(text + "\n", encoding="utf-8")


def _tokenizer_config() -> dict[str, object]:
    return {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_TOKENS,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "add_prefix_space": False,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
    }


def _special_tokens_map() -> dict[str, str]:
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


def write_clip_vocab(dst_dir: Path | str, bpe_path: Path | None = None) -> Path:
    """Write a transformers-format CLIP tokenizer directory built from CLIP's BPE file.

    ``transformers.CLIPTokenizer.from_pretrained(dst_dir)`` loads it with
    ``model_max_length`` 77 and pad = ``<|endoftext|>``. Returns ``dst_dir``.
    """
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    merges = read_bpe_merges(bpe_path if bpe_path is not None else find_bpe_file())
    vocab = clip_vocab(merges)
    # Upstream's vocab.json is one line in id order; keep that layout.
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merge_lines = [MERGES_HEADER] + [f"{first} {second}" for first, second in merges]
    (dst / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    _write_json(dst / "tokenizer_config.json", _tokenizer_config())
    _write_json(dst / "special_tokens_map.json", _special_tokens_map())
    return dst


def read_vocab(clip_tokenizer_dir: Path) -> dict[str, int]:
    vocab = json.loads((clip_tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    for token, expected in ((BOS, BOS_ID), (EOS, EOS_ID)):
        if vocab.get(token) != expected:
            raise ValueError(
                f"{clip_tokenizer_dir / 'vocab.json'}: {token} has id {vocab.get(token)}, "
                f"expected {expected}"
            )
    return vocab


def read_merges(clip_tokenizer_dir: Path) -> list[tuple[str, str]]:
    """Merges from a transformers ``merges.txt`` (header line skipped, as transformers does)."""
    path = clip_tokenizer_dir / "merges.txt"
    lines = path.read_text(encoding="utf-8").split("\n")
    body = lines[1:] if lines and lines[0].startswith("#version") else lines
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(body, start=2):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFC(),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Lowercase(),
        ]
    )


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Keep the CLIP regex matches and drop what lies between them (whitespace): `invert=True`
    # with `removed` is "keep matches"; ByteLevel then only maps bytes to characters.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _decoder() -> decoders.Decoder:
    # Bytes back to text, then each end-of-word marker becomes a space (trailing one dropped).
    return decoders.Sequence(
        [
            decoders.ByteLevel(),
            decoders.Replace(END_OF_WORD, " "),
            decoders.Strip(" ", 0, 1),
        ]
    )


def _post_processor() -> TemplateProcessing:
    return TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} {EOS} $B {EOS}",
        special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)],
    )


def build_tokenizer(clip_tokenizer_dir: Path | str) -> Tokenizer:
    """The bundle tokenizer as a ``tokenizers.Tokenizer`` (see ``build_tokenizer_json``)."""
    src = Path(clip_tokenizer_dir)
    model = BPE(
        vocab=read_vocab(src),
        merges=read_merges(src),
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
        unk_token=EOS,
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = _normalizer()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.post_processor = _post_processor()
    tokenizer.decoder = _decoder()
    # Matched in the raw prompt, before normalisation, as transformers' CLIP tokenizer does.
    tokenizer.add_special_tokens(
        [AddedToken(token, normalized=False, special=True) for token in (BOS, EOS)]
    )
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.enable_padding(length=MAX_TOKENS, pad_id=EOS_ID, pad_token=EOS)
    return tokenizer


def build_tokenizer_json(clip_tokenizer_dir: Path | str) -> str:
    """The bundle's ``tokenizer.json`` text, built from a transformers CLIP tokenizer directory.

    Compact (about 1.7 MB for CLIP's 49408 tokens); the same input gives the same bytes.
    """
    return build_tokenizer(clip_tokenizer_dir).to_str(pretty=False) + "\n"


def write_tokenizer_json(src_dir: Path | str, dst_path: Path | str) -> Path:
    """Write ``build_tokenizer_json(src_dir)`` to ``dst_path``; returns ``dst_path``."""
    dst = Path(dst_path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(build_tokenizer_json(src_dir), encoding="utf-8")
    return dst


def write_fixture(dst_path: Path) -> Path:
    """The Rust tests' tokenizer.json, from a CLIP directory built from the BPE file."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_tokenizer_json(write_clip_vocab(tmp), dst_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--fixture", type=Path, help="write tokenizer.json built from the BPE file")
    group.add_argument("--vocab-dir", type=Path, help="write a transformers CLIP tokenizer dir")
    group.add_argument("--from-dir", type=Path, help="transformers CLIP tokenizer dir to convert")
    parser.add_argument("--out", type=Path, help="tokenizer.json path (with --from-dir)")
    args = parser.parse_args()
    if args.fixture is not None:
        print(write_fixture(args.fixture))
    elif args.vocab_dir is not None:
        print(write_clip_vocab(args.vocab_dir))
    else:
        if args.out is None:
            parser.error("--from-dir needs --out")
        print(write_tokenizer_json(args.from_dir, args.out))


if __name__ == "__main__":
    main()
