"""CLIP's byte-pair tokenizer without torch: open_clip's SimpleTokenizer (clean "lower", no reduction mask, no
extra special tokens, the configuration CLIP models use) with NumPy output.

open_clip's tokenizer module imports torch, so an ONNX-only process that tokenized through it would import torch on
its first text (a query, or a new category's text prototype). This is the same algorithm over the same vocabulary
file; embeddings.direct uses it only after it gave the model's own tokenizer's ids on check texts.
"""

from __future__ import annotations

import gzip
import html
import itertools
import threading
from functools import lru_cache
from typing import Any

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # ships inside the open_clip package
CHECK_TEXTS = [
    "a photo of a cat",
    "A Cup of COFFEE,   on a table!",
    "an astronaut's white suit &amp; helmet",
    "naïve café — crème brûlée 🍮 ½ 東京",
    "it's 3.14 o'clock; we'll see",
    "",
    "   ",
    " ".join(["a long description of an old harbour at dusk with boats"] * 12),  # cut at the context length
]


def vocab_path() -> str | None:
    """open_clip's vocabulary file, found without importing open_clip (which imports torch)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return str(path)
    return None


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(word))


def _clean(text: str) -> str:
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """texts -> (n, context_length) int64 ids: start, the text's byte-pair ids, end, zero padding."""

    def __init__(self, vocab: str, context_length: int = 77) -> None:
        import regex

        self.vocab = vocab
        self.context_length = context_length
        with gzip.open(vocab) as fh:
            merges_text = fh.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(_bytes_to_unicode().values())
        words = byte_chars + [v + "</w>" for v in byte_chars] + ["".join(m) for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        self.encoder = {w: i for i, w in enumerate(words + special)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.sot, self.eot = self.encoder[special[0]], self.encoder[special[1]]
        self._cache: dict[str, str] = {t: t for t in special}
        self._lock = threading.Lock()
        self._pattern = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )

    def _bpe(self, token: str) -> str:
        with self._lock:
            hit = self._cache.get(token)
        if hit is not None:
            return hit
        word: tuple[str, ...] = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        with self._lock:
            self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        table = _bytes_to_unicode()
        ids: list[int] = []
        for token in self._pattern.findall(_clean(text)):
            chars = "".join(table[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(chars).split(" "))
        return ids

    def __call__(self, texts: list[str] | str) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = ids
        return out


def matching(tokenizer: Any) -> dict[str, Any] | None:
    """{"vocab", "context_length"} for a ClipTokenizer that gives `tokenizer`'s ids on CHECK_TEXTS, else None."""
    length = getattr(tokenizer, "context_length", None)
    vocab = vocab_path()
    if type(tokenizer).__name__ != "SimpleTokenizer" or not isinstance(length, int) or vocab is None:
        return None
    try:
        ours = ClipTokenizer(vocab, length)
        if not np.array_equal(ours(CHECK_TEXTS), np.asarray(tokenizer(CHECK_TEXTS))):
            return None
    except Exception:  # another open_clip tokenizer layout: keep open_clip's own
        return None
    return {"vocab": vocab, "context_length": length}
