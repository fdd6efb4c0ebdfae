"""Caption datasets over a feature store, with length-bucketed batches.

A training epoch is a list of (row, caption) pairs: each image contributes
``captions_per_image`` of its captions (drawn with the epoch's seed) or all of them. Pairs are
shuffled, grouped into pools of many batches, sorted by length inside a pool and cut into batches,
so a batch holds captions of nearly equal length and the decoder runs over little padding. The
plan depends only on (seed, epoch), which is what makes resuming exact.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from .features import FeatureStore
from .vocab import Vocab

T = TypeVar("T")
U = TypeVar("U")
POOL_BATCHES = 50  # batches per sorting pool: large enough to bucket, small enough to stay random


@dataclass
class Batch:
    features: torch.Tensor  # (B, R, D) float16 regions, or (B, 3, S, S) uint8 pixels
    inputs: torch.Tensor    # (B, T) <start> w1 .. wn <pad>... (see teacher_forcing)
    targets: torch.Tensor   # (B, T) w1 .. wn <end> <pad>...
    image_ids: list[int]

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.features.to(device, non_blocking=True), self.inputs.to(device, non_blocking=True),
                     self.targets.to(device, non_blocking=True), self.image_ids)

    def pin(self) -> "Batch":
        """In page-locked memory, so that the copy to the GPU runs asynchronously."""
        return Batch(self.features.pin_memory(), self.inputs.pin_memory(), self.targets.pin_memory(),
                     self.image_ids)


def prefetch(items: Iterable[T], load: Callable[[T], U], depth: int = 2) -> Iterator[U]:
    """``load(item)`` for every item, in order, computed ``depth`` items ahead in a background thread.

    Gathering a batch from the memory-mapped store (and pinning it for the GPU) then overlaps the
    previous training step: numpy and torch release the GIL while they copy.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(load, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def teacher_forcing(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``<start> w1 .. wn <end> <pad>..`` (B, T+1) -> decoder inputs and targets, each (B, T).

    Inputs are ``<start> w1 .. wn`` then padding: ``<end>`` is never fed (nothing follows it), so
    every row has as many input steps as target words and the decoder runs no wasted step.
    """
    inputs = tokens[:, :-1]
    return inputs.masked_fill(inputs == Vocab.end, Vocab.pad), tokens[:, 1:]


def length_buckets(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Cut already-shuffled items into batches of near-equal length, in random batch order.

    Items are sorted by length inside pools of ``POOL_BATCHES`` batches, so a batch holds captions
    of nearly equal length while which captions meet in a batch still changes every epoch.
    Returns the item positions of every batch, longest first (the order the decoder runs them in).
    """
    batches = []
    pool = batch_size * POOL_BATCHES
    for lo in range(0, len(lengths), pool):
        order = lo + np.argsort(lengths[lo:lo + pool], kind="stable")
        batches += [order[k:k + batch_size][::-1] for k in range(0, len(order), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


class CaptionSplit:
    """One split's images (those with features) and their tokenized captions."""

    def __init__(self, store: FeatureStore, records: list[dict]):
        self.store = store
        usable = [r for r in records if r["id"] in store.row_of and r["id"] not in store.failed]
        self.image_ids = [r["id"] for r in usable]
        self.rows = np.array([store.row_of[i] for i in self.image_ids], dtype=np.int64)
        self.captions = [r["tokens"] for r in usable]
        self.records = usable
        self.array = store.array  # memory-mapped: the page cache keeps what fits in RAM

    def __len__(self) -> int:
        return len(self.image_ids)

    def features(self, index: np.ndarray) -> torch.Tensor:
        """Features of images ``index`` (positions in this split), as stored: float16 regions
        (the model converts them on its device: half the bytes to move) or uint8 pixels."""
        return torch.from_numpy(np.ascontiguousarray(self.array[self.rows[index]]))

    def epoch_plan(self, epoch: int, seed: int, batch_size: int, captions_per_image: int
                   ) -> list[np.ndarray]:
        """Length-bucketed batches of (image index, caption index) pairs for one epoch."""
        rng = np.random.default_rng([seed, epoch])
        pairs = []
        for i, caps in enumerate(self.captions):
            if captions_per_image <= 0 or captions_per_image >= len(caps):
                pairs += [(i, c) for c in range(len(caps))]
            else:
                pairs += [(i, int(c)) for c in rng.choice(len(caps), captions_per_image, replace=False)]
        pairs = np.array(pairs, dtype=np.int64)[rng.permutation(len(pairs))]
        lengths = np.array([len(self.captions[i][c]) for i, c in pairs])
        return [pairs[b] for b in length_buckets(lengths, batch_size, rng)]

    def batch(self, pairs: np.ndarray) -> Batch:
        """Gather features and pad captions for one planned batch."""
        seqs = [self.captions[i][c] for i, c in pairs]
        tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for k, s in enumerate(seqs):
            tokens[k, : len(s)] = torch.tensor(s)
        return Batch(self.features(pairs[:, 0]), *teacher_forcing(tokens),
                     [self.image_ids[i] for i in pairs[:, 0]])

    def image_batches(self, batch_size: int, keep=None):
        """Yield (image ids, features) over every image once, in order (for decoding); only the
        batches whose number ``keep(b)`` accepts, when given (one rank's share)."""
        for b, lo in enumerate(range(0, len(self), batch_size)):
            if keep is not None and not keep(b):
                continue
            index = np.arange(lo, min(lo + batch_size, len(self)))
            yield [self.image_ids[i] for i in index], self.features(index)
