"""Caption datasets over a feature store, with length-bucketed batches.

A training epoch is a list of (row, caption) pairs: each image contributes
``captions_per_image`` of its captions (drawn with the epoch's seed) or all of them. Pairs are
shuffled, grouped into pools of many batches, sorted by length inside a pool and cut into batches,
so a batch holds captions of nearly equal length and the decoder runs over little padding. With
``group`` (``train.group_captions``) the images are shuffled and bucketed instead, and a batch holds
all the drawn captions of each of its images, so that the model encodes each image once for all of
them (self-critical.pytorch's ``seq_per_img``). The plan depends only on (seed, epoch), which is
what makes resuming exact.
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
    images: torch.Tensor | None = None  # (B,) each row's image in ``features`` (I, ...) when rows
    #                                     share images; None: row b's image is features[b]

    def to(self, device: torch.device) -> "Batch":
        images = None if self.images is None else self.images.to(device, non_blocking=True)
        return Batch(self.features.to(device, non_blocking=True), self.inputs.to(device, non_blocking=True),
                     self.targets.to(device, non_blocking=True), self.image_ids, images)

    def pin(self) -> "Batch":
        """In page-locked memory, so that the copy to the GPU runs asynchronously."""
        images = None if self.images is None else self.images.pin_memory()
        return Batch(self.features.pin_memory(), self.inputs.pin_memory(), self.targets.pin_memory(),
                     self.image_ids, images)


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

    def epoch_plan(self, epoch: int, seed: int, batch_size: int, captions_per_image: int,
                   group: bool = False) -> list[np.ndarray]:
        """Length-bucketed batches of (image index, caption index) pairs for one epoch; with
        ``group``, batches of whole images (all their drawn captions), about ``batch_size`` pairs."""
        rng = np.random.default_rng([seed, epoch])
        drawn = []
        for caps in self.captions:
            if captions_per_image <= 0 or captions_per_image >= len(caps):
                drawn.append(np.arange(len(caps)))
            else:
                drawn.append(rng.choice(len(caps), captions_per_image, replace=False))
        if group:
            return self._image_batches(drawn, batch_size, rng)
        pairs = np.array([(i, int(c)) for i, caps in enumerate(drawn) for c in caps], dtype=np.int64)
        pairs = pairs[rng.permutation(len(pairs))]
        lengths = np.array([len(self.captions[i][c]) for i, c in pairs])
        return [pairs[b] for b in length_buckets(lengths, batch_size, rng)]

    def _image_batches(self, drawn: list[np.ndarray], batch_size: int, rng: np.random.Generator
                       ) -> list[np.ndarray]:
        """Images shuffled and bucketed by their longest drawn caption, ``batch_size`` / (captions
        per image) to a batch; a batch's pairs longest first."""
        images = rng.permutation(len(drawn))
        per_image = sum(map(len, drawn)) / max(1, len(drawn))
        longest = np.array([max(len(self.captions[i][c]) for c in drawn[i]) for i in images])
        batches = []
        for b in length_buckets(longest, max(1, round(batch_size / per_image)), rng):
            pairs = np.array([(i, int(c)) for i in images[b] for c in drawn[i]], dtype=np.int64)
            lengths = np.array([len(self.captions[i][c]) for i, c in pairs])
            batches.append(pairs[np.argsort(-lengths, kind="stable")])
        return batches

    def batch(self, pairs: np.ndarray) -> Batch:
        """Gather features and pad captions for one planned batch; an image that several rows
        share is gathered once (``Batch.images``)."""
        seqs = [self.captions[i][c] for i, c in pairs]
        tokens = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for k, s in enumerate(seqs):
            tokens[k, : len(s)] = torch.tensor(s)
        ids = [self.image_ids[i] for i in pairs[:, 0]]
        unique, images = np.unique(pairs[:, 0], return_inverse=True)
        if len(unique) == len(pairs):
            return Batch(self.features(pairs[:, 0]), *teacher_forcing(tokens), ids)
        return Batch(self.features(unique), *teacher_forcing(tokens), ids, torch.from_numpy(images.reshape(-1)))

    def image_batches(self, batch_size: int, keep=None):
        """Yield (image ids, features) over every image once, in order (for decoding); only the
        batches whose number ``keep(b)`` accepts, when given (one rank's share)."""
        for b, lo in enumerate(range(0, len(self), batch_size)):
            if keep is not None and not keep(b):
                continue
            index = np.arange(lo, min(lo + batch_size, len(self)))
            yield [self.image_ids[i] for i in index], self.features(index)
