"""Tokenizer and vocabulary: words <-> ids, fitted on training captions only."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import AttncapError
from .files import read_json, write_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # PAD is id 0, so a zero-filled tensor is all padding

_NOT_WORD = re.compile(r"[^\w\s]|_", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lowercase, strip punctuation, split on whitespace: ``"A dog, running!" -> ["a", "dog", "running"]``.

    Unicode letters are kept (NFC-normalised), so non-ASCII captions tokenize sensibly.
    """
    text = unicodedata.normalize("NFC", text).lower()
    return _NOT_WORD.sub(" ", text).split()


@dataclass(frozen=True)
class Vocab:
    """An immutable word list; the id of a word is its position."""

    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if tuple(self.words[: len(SPECIALS)]) != SPECIALS:
            raise AttncapError(f"vocabulary must start with {SPECIALS}, got {self.words[:4]}")
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    # ids of the special tokens (their positions in SPECIALS); class attributes, not fields
    pad, start, end, unk = range(len(SPECIALS))

    def id(self, word: str) -> int:
        return self._index.get(word, self.unk)

    def encode(self, text: str, max_words: int | None = None) -> list[int]:
        """Caption text -> ``[<start>, w1, ..., wn, <end>]`` ids (words beyond max_words dropped)."""
        words = tokenize(text)[:max_words]
        return [self.start, *(self.id(w) for w in words), self.end]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids -> words, stopping at ``<end>`` and skipping ``<start>``/``<pad>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i in (self.start, self.pad):
                continue
            out.append(self.words[i])
        return out

    def save(self, path: str | Path) -> None:
        write_json(path, {"words": list(self.words)}, indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        data = read_json(path, "vocabulary")
        if not isinstance(data, dict) or not isinstance(data.get("words"), list):
            raise AttncapError(f"vocabulary {path} has no 'words' list; re-run `attncap prepare`")
        return cls(tuple(data["words"]))


def build_vocab(captions: Iterable[str], top_k: int = 20000, min_count: int = 1) -> Vocab:
    """Fit a vocabulary on (training) captions: the ``top_k`` most frequent words seen ``min_count`` times.

    Ties are broken alphabetically so the result does not depend on caption order.
    """
    if top_k < 1:
        raise AttncapError(f"top_k must be at least 1, got {top_k}")
    counts = Counter(w for c in captions for w in tokenize(c))
    ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return Vocab(SPECIALS + tuple(ranked[:top_k]))


def pad_batch(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """Right-pad id lists with ``<pad>`` (0) to the longest one."""
    longest = max(len(s) for s in sequences)
    return [list(s) + [0] * (longest - len(s)) for s in sequences]
