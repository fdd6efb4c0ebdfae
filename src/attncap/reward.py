"""CIDEr-D as a reward: every sampled caption of a batch scored at once against cached references.

Self-critical training scores several sampled captions per image at every step, so the score must
cost far less than the step. :class:`CiderD` gives the per-caption numbers of pycocoevalcap's
``Cider`` (n-grams 1..4, tf-idf vectors, clipped cosine similarity, a Gaussian length penalty
with sigma 6, x 10), with the document frequencies and reference vectors computed once from the
training references and cached, and a batch scored with a few numpy sorts and lookups instead of
Python dictionaries.

As in self-critical.pytorch's ``CiderD(df="coco-train")``, document frequencies come from the
whole training set rather than from the batch; for candidates of every image of that set the
scores are pycocoevalcap's own (tests/test_reward.py). Text is compared word for word, already
tokenized (:func:`attncap.prepare.references`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import AttncapError
from .files import atomic_path

ORDERS = 4               # n-grams of 1..4 words
SIGMA = 6.0              # the length penalty's width
BASE = np.uint64(1 << 16)  # n-gram keys: (w1 + 1) * BASE^(n-1) + ... in one uint64, so < 65535 words
FORMAT = 2
ARRAYS = ("image_ids", "ref_start", "keys", "log_df", "ref_entry", "ref_tf", "ref_norm", "ref_length")


@dataclass
class _Grams:
    """The distinct n-grams of each row of a word-id grid, with their counts."""

    row: np.ndarray    # (E,) which row
    key: np.ndarray    # (E,) uint64 n-gram key
    order: np.ndarray  # (E,) n - 1
    tf: np.ndarray     # (E,) float64 count in the row


def _grams(words: np.ndarray) -> _Grams:
    """Word ids (M, L), -1 after the end -> the distinct n-grams of every row, sorted by (row, key)."""
    M, L = words.shape
    rows, keys, orders = [], [], []
    shifted = (words + 1).astype(np.uint64)                       # (M, L); 0 = padding
    for n in range(1, min(ORDERS, L) + 1):
        key = np.zeros((M, L - n + 1), dtype=np.uint64)
        for i in range(n):
            key = key * BASE + shifted[:, i:L - n + 1 + i]
        valid = words[:, n - 1:] >= 0                             # padding only at the end
        rows.append(np.broadcast_to(np.arange(M)[:, None], valid.shape)[valid])
        keys.append(key[valid])
        orders.append(np.full(int(valid.sum()), n - 1, dtype=np.int64))
    row, key, order = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (rows, keys, orders))
    key = key.astype(np.uint64)
    sort = np.lexsort((key, row))
    row, key, order = row[sort], key[sort], order[sort]
    first = np.ones(len(key), bool)
    first[1:] = (row[1:] != row[:-1]) | (key[1:] != key[:-1])
    starts = np.flatnonzero(first)
    tf = np.diff(np.append(starts, len(key))).astype(np.float64)
    return _Grams(row[starts], key[starts], order[starts], tf)


def _per_row(index: np.ndarray, values: np.ndarray, rows: int) -> np.ndarray:
    """Sum ``values`` into (rows, ORDERS) by flat index ``row * ORDERS + order``."""
    return np.bincount(index, values, minlength=rows * ORDERS).reshape(rows, ORDERS)


class CiderD:
    """CIDEr-D of candidate captions against the references of a fixed set of images.

    Build once with :meth:`build` (or :meth:`cached`), then :meth:`score` text or
    :meth:`score_ids` word ids as often as needed.
    """

    def __init__(self, arrays: dict[str, np.ndarray], words: list[str]):
        self.arrays = arrays
        self.words = {w: i for i, w in enumerate(words)}  # reference word -> id
        self.rows = {int(i): k for k, i in enumerate(arrays["image_ids"])}
        self.ref_len = float(np.log(len(arrays["image_ids"])))
        self.fingerprint = ""  # of the references it was built from (see :meth:`cached`)
        self.image_ids, self.ref_start = arrays["image_ids"], arrays["ref_start"]  # (I,), (I + 1,) refs
        self.keys, self.log_df = arrays["keys"], arrays["log_df"]  # (G,) every reference n-gram, log df
        self.ref_entry, self.ref_tf = arrays["ref_entry"], arrays["ref_tf"]  # ref * G + n-gram, its count
        self.ref_norm, self.ref_length = arrays["ref_norm"], arrays["ref_length"]  # (refs, 4), bigrams

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def build(cls, references: dict[int, list[str]]) -> "CiderD":
        """Document frequencies and reference vectors of ``{image id: [tokenized captions]}``."""
        if not references or any(not refs for refs in references.values()):
            raise AttncapError("CIDEr-D needs at least one image, each with at least one reference caption")
        ids = sorted(references)
        texts = [c.split() for i in ids for c in references[i]]
        words = sorted({w for t in texts for w in t})
        if not words:
            raise AttncapError("CIDEr-D needs reference captions with words; all of them are empty")
        if len(words) >= int(BASE) - 1:
            raise AttncapError(f"CIDEr-D keys hold fewer than {int(BASE) - 1} distinct words; the "
                               f"references have {len(words)}")
        index = {w: k for k, w in enumerate(words)}
        counts = np.array([len(references[i]) for i in ids])
        grams = _grams(_grid([[index[w] for w in t] for t in texts]))
        image_of_ref = np.repeat(np.arange(len(ids)), counts)
        keys, dense = np.unique(grams.key, return_inverse=True)   # every reference n-gram, sorted
        seen = np.unique(image_of_ref[grams.row] * len(keys) + dense)  # (image, n-gram) pairs
        df = np.bincount(seen % len(keys), minlength=len(keys))
        ref_len = np.log(len(ids))
        log_df = np.log(np.maximum(1.0, df))
        vec = grams.tf * (ref_len - log_df[dense])
        arrays = {
            "image_ids": np.array(ids, dtype=np.int64),
            "ref_start": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),  # (I + 1,)
            "keys": keys, "log_df": log_df,
            "ref_entry": grams.row * len(keys) + dense,           # sorted: (ref, n-gram)
            "ref_tf": np.minimum(grams.tf, 65535).astype(np.uint16),  # its count (vectors: tf * idf)
            "ref_norm": np.sqrt(_per_row(grams.row * ORDERS + grams.order, vec ** 2, len(texts))),
            "ref_length": np.maximum(0, np.array([len(t) for t in texts]) - 1).astype(np.float64),
        }
        return cls(arrays, words)

    @classmethod
    def cached(cls, path: str | Path, references: dict[int, list[str]]) -> "CiderD":
        """:meth:`load` ``path`` if it was built from these references, else build and save it there."""
        path = Path(path)
        fingerprint = _fingerprint(references)
        if path.is_file():
            try:
                found = cls.load(path)
                if found.fingerprint == fingerprint:
                    return found
            except AttncapError:
                pass  # unreadable or another format: rebuilt below
        built = cls.build(references)
        built.fingerprint = fingerprint
        built.save(path)
        return built

    def save(self, path: str | Path) -> None:
        meta = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint})
        words = sorted(self.words, key=self.words.get)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fp:
                np.savez(fp, meta=np.array(meta), words=np.array(words, dtype=str), **self.arrays)

    @classmethod
    def load(cls, path: str | Path) -> "CiderD":
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != FORMAT:
                    raise AttncapError(f"{path}: CIDEr-D cache of another format; delete it to rebuild")
                arrays = {k: data[k] for k in ARRAYS}
                words = data["words"].tolist()
        except (OSError, ValueError, KeyError) as exc:
            raise AttncapError(f"{path}: unreadable CIDEr-D cache ({exc}); delete it to rebuild") from None
        found = cls(arrays, words)
        found.fingerprint = meta["fingerprint"]
        return found

    # -- scoring -------------------------------------------------------------------------------
    def score(self, image_ids: Sequence[int], captions: Sequence[str]) -> np.ndarray:
        """CIDEr-D of each tokenized caption against its image's references: (M,) float64."""
        fresh: dict[str, int] = {}  # words no reference has: ids of their own, never matched
        rows = [[self.words.get(w) if w in self.words else fresh.setdefault(w, len(self.words) + len(fresh))
                 for w in c.split()] for c in captions]
        if len(self.words) + len(fresh) >= int(BASE) - 1:
            raise AttncapError("too many distinct words for CIDEr-D's n-gram keys")
        return self.score_ids(image_ids, _grid(rows))

    def word_ids(self, vocabulary: Sequence[str]) -> np.ndarray:
        """Model vocabulary ids -> this scorer's word ids (words no reference has get ids of their
        own), for :meth:`score_ids` on decoded token ids: ``ids[tokens]``."""
        fresh: dict[str, int] = {}
        return np.array([self.words[w] if w in self.words else fresh.setdefault(w, len(self.words) + len(fresh))
                         for w in vocabulary], dtype=np.int64)

    def score_ids(self, image_ids: Sequence[int], words: np.ndarray) -> np.ndarray:
        """CIDEr-D of word-id rows (M, L), -1 after each caption's end, one image id per row: (M,)."""
        try:
            img = np.array([self.rows[int(i)] for i in image_ids], dtype=np.int64)
        except KeyError as exc:
            raise AttncapError(f"CIDEr-D has no references for image {exc.args[0]}") from None
        M = len(img)
        hyp = _grams(np.asarray(words, dtype=np.int64).reshape(M, -1))
        dense = np.minimum(np.searchsorted(self.keys, hyp.key), len(self.keys) - 1)
        found = self.keys[dense] == hyp.key
        vec = hyp.tf * (self.ref_len - np.where(found, self.log_df[dense], 0.0))      # (E,)
        norm = np.sqrt(_per_row(hyp.row * ORDERS + hyp.order, vec ** 2, M))          # (M, 4)
        length = np.bincount(hyp.row, hyp.tf * (hyp.order == 1), minlength=M)        # bigrams, as coco
        nrefs = np.diff(self.ref_start)[img]                                          # (M,)
        pair_start = np.concatenate([[0], np.cumsum(nrefs)])                          # (M + 1,)
        pair_ref = np.repeat(self.ref_start[img] - pair_start[:-1], nrefs) + np.arange(pair_start[-1])
        pair_hyp = np.repeat(np.arange(M), nrefs)                                     # (P,)
        dot = self._clipped_dots(hyp, dense[found], vec[found], found, img, nrefs, pair_start)
        denom = norm[pair_hyp] * self.ref_norm[pair_ref]                             # (P, 4)
        sim = np.where(denom != 0, dot / np.where(denom != 0, denom, 1.0), dot)
        delta = length[pair_hyp] - self.ref_length[pair_ref]
        sim *= np.exp(-(delta ** 2) / (2 * SIGMA ** 2))[:, None]
        per_ref = np.bincount(pair_hyp, sim.mean(1), minlength=M)
        return per_ref / np.maximum(nrefs, 1) * 10.0

    def _clipped_dots(self, hyp: _Grams, dense, vec, found, img, nrefs, pair_start) -> np.ndarray:
        """sum over each candidate's n-grams of min(v_hyp, v_ref) * v_ref, per (candidate, reference)
        pair and order: (P, 4). Candidate n-grams no reference has contribute nothing."""
        row, order = hyp.row[found], hyp.order[found]             # (F,)
        reps = nrefs[row]
        within = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)  # j-th reference
        entry = np.repeat(np.arange(len(row)), reps)
        ref = self.ref_start[img[row]][entry] + within
        wanted = ref * len(self.keys) + dense[entry]
        pos = np.minimum(np.searchsorted(self.ref_entry, wanted), len(self.ref_entry) - 1)
        idf = self.ref_len - self.log_df[dense[entry]]
        v_ref = np.where(self.ref_entry[pos] == wanted, self.ref_tf[pos] * idf, 0.0)
        contrib = np.minimum(vec[entry], v_ref) * v_ref
        pair = pair_start[row][entry] + within
        return _per_row(pair * ORDERS + order[entry], contrib, int(pair_start[-1]))


def _grid(rows: list[list[int]]) -> np.ndarray:
    """Ragged word-id lists -> (M, L) with -1 after each row's end."""
    out = np.full((len(rows), max([len(r) for r in rows] + [1])), -1, dtype=np.int64)
    for k, r in enumerate(rows):
        out[k, :len(r)] = r
    return out


def _fingerprint(references: dict[int, list[str]]) -> str:
    text = json.dumps(sorted((int(i), list(c)) for i, c in references.items()))
    return hashlib.sha256(text.encode()).hexdigest()
