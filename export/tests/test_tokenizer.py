"""The bundle tokenizer.json against transformers' CLIP tokenizers, id for id.

Oracles, all loaded from the same directory written by ``write_clip_vocab``:

- ``transformers.CLIPTokenizerFast`` and ``transformers.CLIPTokenizer``. Since transformers 5
  both names are the same ``tokenizers``-backed class (there is no slow CLIP tokenizer any more);
  the tests check that and still run both names.
- ``SlowClipTokenizer`` below: transformers 4.26.1's slow ``CLIPTokenizer`` (the version the
  ELITE reference pins), pure Python, reading ``vocab.json``/``merges.txt`` and doing its own
  BPE. Its ftfy step is modelled as NFC normalisation, which is all ``ftfy.fix_text`` does to
  the prompts in ``PROMPTS``. ``SLOW_4_26_1_SHA256`` records the ids of the real transformers
  4.26.1 slow tokenizer with ftfy 6.3.1 for every prompt (``ids_digest``), made once with::

      tok = transformers.CLIPTokenizer.from_pretrained(clip_dir)   # 4.26.1, slow, ftfy 6.3.1
      ids_digest(tok(p, padding="max_length", max_length=77, truncation=True).input_ids)

Prompts where ftfy's text repair changes the text (``FTFY_PROMPTS``) are excluded from the
slow comparison: the real 4.26.1 slow tokenizer gives other ids there (recorded below), while
our tokenizer and transformers' fast one agree with each other (4.26.1's fast tokenizer too).

Without ftfy installed, transformers 4.26.1's slow tokenizer falls back to BERT's
BasicTokenizer, a third behaviour not reproduced here: it strips accents, splits every
punctuation character (``'s`` becomes ``'`` + ``s``, ``!!!`` three tokens) and spaces CJK
characters; checked once, it gives other ids for 12 of the 37 ``PROMPTS`` (not for
``a photo of a S`` or any prompt made only of plain words).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import unicodedata
from functools import lru_cache
from pathlib import Path

import pytest
import regex
import transformers
from tokenizers import Tokenizer

from export.tokenizer import (
    BOS_ID,
    CLIP_PATTERN,
    EOS_ID,
    MAX_TOKENS,
    VOCAB_SIZE,
    build_tokenizer_json,
    bytes_to_unicode,
    find_bpe_file,
    write_clip_vocab,
    write_tokenizer_json,
)

# Lazily exported by transformers; type checkers do not see it.
CLIPTokenizerFast = transformers.CLIPTokenizerFast  # type: ignore[attr-defined]
REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "tokenizer" / "tokenizer.json"

LONG_WORDS = (
    "an extremely detailed oil painting of a S sitting on a wooden chair in a sunlit room "
    "with plants, books, a cup of tea, golden hour light, soft shadows, by a famous artist, "
    "trending on artstation, 8k, sharp focus, intricate details, volumetric lighting, "
    "cinematic composition, award winning photograph, masterpiece, highly realistic"
)

PROMPTS: list[str] = [
    "a photo of a S",
    "a photo of an astronaut riding a horse on mars",
    "",
    "S",
    "*",
    "A S wearing sunglasses",
    "a S in the snow",
    "a painting of S in the style of Van Gogh",
    "S S S",
    "a photo of a S, on the beach.",
    "Hello, world! How's it going?",
    "it's the cat's toy; they're here, we've been, I'm sure you'll see, he'd go",
    "don't stop: can't won't shouldn't",
    "   leading and trailing spaces   ",
    "multiple     spaces\tand\ttabs\nand newlines\r\n",
    "numbers 12345 and 3.14159 and 1,000,000",
    "2023-10-05 at 10:30pm",
    "UPPERCASE AND MiXeD CaSe",
    "café crème brûlée naïve résumé",
    "cafe\u0301 with a decomposed accent",
    "Zürich, São Paulo, Kraków, Ελληνικά, русский",
    "日本語のテキスト and 中文",
    "emoji 🐱🚀 and symbols © ™ ° ±",
    "punctuation!!! ??? ... --- ((brackets)) [x] {y}",
    "e-mail: someone@example.com, url https://example.com/path?q=1",
    "#hashtag @mention $100 50% a+b=c",
    "x'''s !'s it's-'ll'd ''",
    "S's hat and the S-shaped road",
    "quotes \"double\" and 'single'",
    "under_score and back\\slash and pipe|char",
    "<|endoftext|> literal special token",
    "A photo of a S with a red hat, highly detailed, 4k, trending on artstation",
    "a photo of a S " * 20,
    LONG_WORDS,
    "a " * 75,
    "a " * 76,
    "S " + "very " * 80 + "S",
]

# ftfy.fix_text changes these: curly quotes are straightened, fullwidth forms narrowed, the
# ligature split, the HTML entity unescaped, the mojibake repaired.
FTFY_PROMPTS: list[str] = [
    "it’s a “quoted” S",
    "ｆｕｌｌｗｉｄｔｈ Ｓ",
    "a ﬁne ﬂower",
    "fish &amp; chips",
    "cafÃ© au lait",
]

# sha256 of the 77 ids (see ids_digest) from the real transformers 4.26.1 slow CLIPTokenizer
# with ftfy 6.3.1, first 16 hex digits; filled in by the recording snippet in the docstring.
SLOW_4_26_1_SHA256: dict[str, str] = {
    PROMPTS[0]: "5a5bfe85a7c12f2a",
    PROMPTS[1]: "45e2e36712e5b256",
    PROMPTS[2]: "427cfaf487d5508d",
    PROMPTS[3]: "8f204691e71ce374",
    PROMPTS[4]: "c435c256838167c5",
    PROMPTS[5]: "e115004fb6253bb9",
    PROMPTS[6]: "5d332687b779e1a5",
    PROMPTS[7]: "7f6f47cc201dc88b",
    PROMPTS[8]: "4751e640cb8f5906",
    PROMPTS[9]: "b63a75de612bb887",
    PROMPTS[10]: "778c359b7203b6f8",
    PROMPTS[11]: "c8df061df01bf8b8",
    PROMPTS[12]: "b656187d87e72d9c",
    PROMPTS[13]: "2a6ddd22a803d0a7",
    PROMPTS[14]: "35b24e69af63f0aa",
    PROMPTS[15]: "cf9160b718ef4c36",
    PROMPTS[16]: "6f0c48dfe94f53a4",
    PROMPTS[17]: "c974cae0181f4739",
    PROMPTS[18]: "b78703c48c6f7051",
    PROMPTS[19]: "505657e38925563f",
    PROMPTS[20]: "fc9455abab9a45b2",
    PROMPTS[21]: "ddb78261ecf14b9a",
    PROMPTS[22]: "236ab0e32036d6f8",
    PROMPTS[23]: "b0ec4d556534c777",
    PROMPTS[24]: "a293feb0b1c037fa",
    PROMPTS[25]: "4068df7e48dcc942",
    PROMPTS[26]: "ca1730b64b63c1a2",
    PROMPTS[27]: "ad3495ca79e1071f",
    PROMPTS[28]: "ffa01feef50b7817",
    PROMPTS[29]: "7138aa0964a7edcc",
    PROMPTS[30]: "dd415a5efc1c2c11",
    PROMPTS[31]: "9965ed45e173346e",
    PROMPTS[32]: "a442561c1720cea3",
    PROMPTS[33]: "e2d2be28e821a2b4",
    PROMPTS[34]: "a1f8fe73013da2c0",
    PROMPTS[35]: "a1f8fe73013da2c0",
    PROMPTS[36]: "4683244c9baa36a0",
    FTFY_PROMPTS[0]: "d9a4a484d11425c1",
    FTFY_PROMPTS[1]: "97d1b905c377eade",
    FTFY_PROMPTS[2]: "d5286dafda6d5481",
    FTFY_PROMPTS[3]: "a4905689ea9a7405",
    FTFY_PROMPTS[4]: "b71b1a1104b31d42",
}


def ids_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(str(i) for i in ids).encode()).hexdigest()[:16]


class SlowClipTokenizer:
    """transformers 4.26.1's slow CLIPTokenizer (ftfy branch), for prompts ftfy leaves as NFC."""

    def __init__(self, clip_dir: Path) -> None:
        self.encoder: dict[str, int] = json.loads((clip_dir / "vocab.json").read_text("utf-8"))
        merges_text = (clip_dir / "merges.txt").read_text("utf-8")
        lines = merges_text.strip().split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(line.split()) for line in lines]
        self.bpe_ranks: dict[tuple[str, ...], int] = {m: r for r, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.pattern = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
        self.specials = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")

    def bpe(self, token: str) -> list[str]:
        if token in ("<|startoftext|>", "<|endoftext|>"):
            return [token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def tokenize(self, text: str) -> list[str]:
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        tokens: list[str] = []
        for piece in self.pattern.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            tokens.extend(self.bpe(mapped))
        return tokens

    def __call__(self, prompt: str) -> list[int]:
        tokens: list[str] = []
        for chunk in self.specials.split(prompt):  # added tokens are split out first
            if chunk in ("<|startoftext|>", "<|endoftext|>"):
                tokens.append(chunk)
            elif chunk.strip():
                tokens.extend(self.tokenize(chunk))
        ids = [self.encoder.get(t, EOS_ID) for t in tokens][: MAX_TOKENS - 2]
        ids = [BOS_ID] + ids + [EOS_ID]
        return ids + [EOS_ID] * (MAX_TOKENS - len(ids))


@lru_cache(maxsize=1)
def _clip_dir_cached(root: str) -> Path:
    return write_clip_vocab(Path(root) / "clip_tokenizer")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _clip_dir_cached(str(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def bundle_tokenizer(clip_dir: Path) -> Tokenizer:
    return Tokenizer.from_str(build_tokenizer_json(clip_dir))


def transformers_ids(tokenizer: object, prompt: str) -> list[int]:
    # As the ELITE reference calls it (padding to model_max_length, truncation on).
    encoded = tokenizer(  # type: ignore[operator]
        prompt, padding="max_length", max_length=MAX_TOKENS, truncation=True
    )
    return list(encoded.input_ids)


def test_bpe_file_is_clip_s() -> None:
    digest = hashlib.sha256(find_bpe_file().read_bytes()).hexdigest()
    assert digest.startswith("924691ac") and digest.endswith("804a")
    lines = gzip.decompress(find_bpe_file().read_bytes()).decode("utf-8").split("\n")
    assert len(lines) > 48894


def test_vocab_construction(clip_dir: Path) -> None:
    vocab = json.loads((clip_dir / "vocab.json").read_text("utf-8"))
    merges = (clip_dir / "merges.txt").read_text("utf-8").split("\n")
    assert len(vocab) == VOCAB_SIZE
    assert sorted(vocab.values()) == list(range(VOCAB_SIZE))
    assert merges[0] == "#version: 0.2" and len([m for m in merges[1:] if m]) == 48894
    byte_chars = list(bytes_to_unicode().values())
    assert [vocab[c] for c in byte_chars] == list(range(256))
    assert [vocab[c + "</w>"] for c in byte_chars] == list(range(256, 512))
    assert vocab["in"] == 512  # the first merge, "i n"
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert vocab["s</w>"] == 338 and vocab["*</w>"] == 265


def test_transformers_loads_directory(clip_dir: Path) -> None:
    for cls in (transformers.CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(clip_dir)
        assert tok.model_max_length == MAX_TOKENS
        assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == EOS_ID
        assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
        assert len(tok) == VOCAB_SIZE


def test_transformers_5_has_no_slow_clip_tokenizer() -> None:
    # If this fails, transformers brought a slow CLIPTokenizer back: compare against it too.
    assert transformers.CLIPTokenizer is CLIPTokenizerFast


def test_ids_match_transformers(clip_dir: Path, bundle_tokenizer: Tokenizer) -> None:
    fast = CLIPTokenizerFast.from_pretrained(clip_dir)
    slow_name = transformers.CLIPTokenizer.from_pretrained(clip_dir)
    slow = SlowClipTokenizer(clip_dir)
    counts = {"fast": 0, "CLIPTokenizer": 0, "slow 4.26.1 port": 0}
    mismatches: list[str] = []
    for prompt in PROMPTS:
        ours = bundle_tokenizer.encode(prompt).ids
        assert len(ours) == MAX_TOKENS and ours[0] == BOS_ID and ours[-1] == EOS_ID
        for name, ids in (
            ("fast", transformers_ids(fast, prompt)),
            ("CLIPTokenizer", transformers_ids(slow_name, prompt)),
            ("slow 4.26.1 port", slow(prompt)),
        ):
            if ids == ours:
                counts[name] += 1
            else:
                mismatches.append(f"{name}: {prompt!r}: {ids} != {ours}")
    print(f"\n{len(PROMPTS)} prompts; ids identical to: {counts}")
    assert not mismatches, "\n".join(mismatches)


def test_ids_match_real_slow_4_26_1(bundle_tokenizer: Tokenizer) -> None:
    matched = 0
    for prompt in PROMPTS:
        assert ids_digest(bundle_tokenizer.encode(prompt).ids) == SLOW_4_26_1_SHA256[prompt]
        matched += 1
    print(f"\n{matched}/{len(PROMPTS)} prompts identical to transformers 4.26.1 slow + ftfy")


def test_ftfy_prompts(clip_dir: Path, bundle_tokenizer: Tokenizer) -> None:
    """Excluded from the slow comparison; fast and ours still agree on them."""
    fast = CLIPTokenizerFast.from_pretrained(clip_dir)
    for prompt in FTFY_PROMPTS:
        ours = bundle_tokenizer.encode(prompt).ids
        assert ours == transformers_ids(fast, prompt), prompt
        assert ids_digest(ours) != SLOW_4_26_1_SHA256[prompt], prompt


def test_runtime_notes_vectors(bundle_tokenizer: Tokenizer) -> None:
    def head(prompt: str, n: int) -> list[int]:
        return bundle_tokenizer.encode(prompt).ids[:n]

    assert head("a photo of a S", 8) == [49406, 320, 1125, 539, 320, 338, 49407, 49407]
    assert head("a photo of an astronaut riding a horse on mars", 13) == [
        *[49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496],
        *[49407, 49407],
    ]
    assert head("S", 3) == [49406, 338, 49407] and head("*", 3) == [49406, 265, 49407]
    assert bundle_tokenizer.encode("").ids == [BOS_ID] + [EOS_ID] * (MAX_TOKENS - 1)


def test_truncation_keeps_bos_and_eos(bundle_tokenizer: Tokenizer) -> None:
    exact = bundle_tokenizer.encode("a " * 75).ids
    assert exact == [BOS_ID] + [320] * 75 + [EOS_ID]
    long = bundle_tokenizer.encode("a " * 200).ids
    assert long == exact


def test_decode_round_trip(bundle_tokenizer: Tokenizer) -> None:
    ids = bundle_tokenizer.encode("A photo of S's café, 12!").ids
    assert bundle_tokenizer.decode(ids) == "a photo of s 's café , 1 2 !"


def test_outputs_are_deterministic(clip_dir: Path, tmp_path: Path) -> None:
    again = write_clip_vocab(tmp_path / "again")
    for name in (
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (again / name).read_bytes() == (clip_dir / name).read_bytes(), name
    first = write_tokenizer_json(clip_dir, tmp_path / "a" / "tokenizer.json").read_bytes()
    second = write_tokenizer_json(again, tmp_path / "b" / "tokenizer.json").read_bytes()
    assert first == second
    assert first.decode("utf-8") == build_tokenizer_json(clip_dir)


def test_committed_fixture_is_current(clip_dir: Path) -> None:
    """tests/fixtures/tokenizer/tokenizer.json (Rust tests) = build_tokenizer_json output.

    Regenerate with: python -m export.tokenizer --fixture tests/fixtures/tokenizer/tokenizer.json
    """
    assert FIXTURE.read_text("utf-8") == build_tokenizer_json(clip_dir)
