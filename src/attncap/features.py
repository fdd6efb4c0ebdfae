"""The feature store: an encoder run once over every image of a split, kept in one file.

Layout, per split, in ``run_dir/features/``::

    {split}.npy    (N, R, D) float16 regions, or (N, 3, S, S) uint8 pixels for a trainable encoder
                   (``small_cnn``, or a pretrained one with ``encoder.fine_tune``)
    {split}.json   manifest: encoder, image ids and files in row order, failed images, shape, dtype

Extraction streams: worker processes decode JPEGs, the encoder runs on a batch, and the rows are
written at their offset with plain file writes (not a writable memory map, whose dirty pages would
count against resident memory), so memory stays flat however many images there are. While running,
the files are ``{split}.partial.npy/.json``; the partial manifest records which batches are done
(written after their rows are fsynced), so an interrupted run resumes where it stopped.

Under torchrun every rank takes every world-size-th of the batches still to do, writes its rows
into the one partial store (disjoint byte ranges) and its progress into its own
``{split}.partial.rank{r}.json``; rank 0 then commits. A resumed run, with any number of
processes, encodes only the batches no rank has finished.

The manifest ``{split}.json`` is the store's commit: written last, checked first. Finishing a
store removes the old manifest, renames the data into place, then writes the new manifest; a kill
anywhere in between is finished by the next run. ``encoder.precision=auto`` is part of the key as
asked ("auto"); the precision it chose is recorded and kept when a store is resumed or reused on a
machine where "auto" would choose otherwise (a job requeued on another node).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .distributed import Dist
from .encoders import Encoder, to_pixels
from .errors import AttncapError
from .files import fault_point, fsync_dir, read_json, write_json
from .images import load_image

FORMAT = 1


@dataclass(frozen=True)
class ImageItem:
    image_id: int
    path: str


class _ImageFiles(Dataset):
    """Decodes and resizes one image per row (in worker processes); a bad file yields its reason."""

    def __init__(self, items: Sequence[ImageItem], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int):
        size = self.size
        try:
            return row, to_pixels(load_image(self.items[row].path), size), ""
        except AttncapError as exc:
            return row, torch.zeros(3, size, size, dtype=torch.uint8), str(exc)


def _collate(batch):
    rows = [b[0] for b in batch]
    return rows, torch.stack([b[1] for b in batch]), [b[2] for b in batch]


def _encoder_record(encoder: Encoder, pretrained: bool) -> dict:
    s = encoder.spec
    return {"name": s.name, "image_size": s.image_size, "grid": s.grid, "dim": s.dim,
            "trainable": s.trainable, "pretrained": pretrained, "precision": encoder.precision,
            "colour_stats": type(encoder).__name__ == "ColourStats",
            # only when set: stores made without them keep the key they always had
            **({"fine_tune": encoder.fine_tune} if getattr(encoder, "fine_tune", 0) else {}),
            **({} if s.head else {"head": False})}


def _row_layout(encoder: Encoder) -> tuple[tuple[int, ...], np.dtype]:
    s = encoder.spec
    if s.trainable:  # the model runs the encoder itself: keep the resized pixels
        return (3, s.image_size, s.image_size), np.dtype(np.uint8)
    return (s.grid * s.grid, s.dim), np.dtype(np.float16)


class FeatureStore:
    """A finished, read-only store for one split (memory-mapped)."""

    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = path, manifest
        self.array = np.load(path, mmap_mode="r")
        expected = tuple(manifest["shape"])
        if self.array.shape != expected or str(self.array.dtype) != manifest["dtype"]:
            raise AttncapError(f"feature store {path} is {self.array.shape} {self.array.dtype}, "
                               f"its manifest says {expected} {manifest['dtype']}; re-run `attncap features`")
        self.ids: list[int] = manifest["image_ids"]
        self.row_of = {image_id: i for i, image_id in enumerate(self.ids)}
        self.failed = {f["image_id"] for f in manifest["failed"]}

    @classmethod
    def open(cls, features_dir: str | Path, split: str) -> "FeatureStore":
        features_dir = Path(features_dir)
        manifest = read_json(features_dir / f"{split}.json", f"feature manifest for split {split!r}")
        path = features_dir / f"{split}.npy"
        if not path.is_file():
            raise AttncapError(f"feature store {path} is missing; run `attncap features`")
        try:
            return cls(path, manifest)
        except (ValueError, KeyError) as exc:
            raise AttncapError(f"feature store {path} is corrupt ({exc}); delete it and re-run "
                               "`attncap features`") from None

    @property
    def encoder(self) -> dict:
        return self.manifest["encoder"]

    def __getitem__(self, image_id: int) -> np.ndarray:
        return self.array[self.row_of[image_id]]


def _header_offset(path: Path) -> int:
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if major == 1
                       else np.lib.format.read_array_header_2_0)
        read_header(f)  # advances to the first data byte
        return f.tell()


def _digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def pinned_precision(features_dir: str | Path, requested: str) -> str:
    """The precision to extract with: ``requested``, unless it is "auto" and a store of this run
    (finished or partial) was already made with "auto": then the precision that one chose."""
    if requested != "auto":
        return requested
    for path in sorted(Path(features_dir).glob("*.json")):
        try:
            manifest = read_json(path, "feature manifest")
        except AttncapError:
            continue
        if isinstance(manifest, dict) and manifest.get("requested_precision") == "auto" \
                and manifest.get("precision") in ("fp32", "bf16"):
            return manifest["precision"]
    return requested


def _rank_manifest(features_dir: Path, split: str, rank: int) -> Path:
    """Rank 0's progress is ``{split}.partial.json`` (the one-process name); rank r's beside it."""
    return features_dir / (f"{split}.partial.json" if rank == 0 else f"{split}.partial.rank{rank}.json")


def _rank_manifests(features_dir: Path, split: str) -> list[Path]:
    return sorted({_rank_manifest(features_dir, split, 0), *features_dir.glob(f"{split}.partial.rank*.json")})


def _progress(path: Path, key: dict, batch_size: int) -> dict | None:
    """A rank's saved progress when it belongs to this key and batch size, else None."""
    try:
        state = read_json(path, "partial feature manifest") if path.is_file() else None
    except AttncapError:
        return None
    ok = isinstance(state, dict) and state.get("key") == _digest(key) and state.get("batch_size") == batch_size
    return state if ok else None


def _fresh_progress(key: dict, batch_size: int, encoder: Encoder) -> dict:
    """The partial manifest is rewritten after every batch, so it holds a digest of the key (encoder,
    image list), not the key itself, which for COCO would be megabytes."""
    return {"key": _digest(key), "batch_size": batch_size, "batches": [], "failed": [], "seconds": 0.0,
            "requested_precision": key["requested_precision"], "precision": encoder.precision}


def _start_partial(features_dir: Path, split: str, key: dict, batch_size: int, encoder: Encoder) -> None:
    """Rank 0: keep a partial store of this key, or start a blank one (and forget others' progress)."""
    path = features_dir / f"{split}.partial.npy"
    if path.is_file() and _progress(_rank_manifest(features_dir, split, 0), key, batch_size) is not None:
        return
    for stale in _rank_manifests(features_dir, split):
        stale.unlink(missing_ok=True)
    shape, dtype = _row_layout(encoder)
    n = len(key["image_ids"])
    blank = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, *shape))  # sparse file
    del blank  # only the header was needed; rows are written by _fill
    write_json(_rank_manifest(features_dir, split, 0), _fresh_progress(key, batch_size, encoder))


def _batches_left(features_dir: Path, split: str, key: dict, batch_size: int) -> list[int]:
    """Rank 0: the batches (of ``batch_size`` rows, in row order) that no rank has finished."""
    done = set()
    for path in _rank_manifests(features_dir, split):
        state = _progress(path, key, batch_size)
        done.update(state["batches"] if state else ())
    n = len(key["image_ids"])
    return [b for b in range(-(-n // batch_size)) if b not in done]


def _merged(features_dir: Path, split: str, key: dict, batch_size: int) -> dict:
    """Every rank's progress as one: failed images in row order, the longest rank's seconds."""
    states = [s for s in (_progress(p, key, batch_size) for p in _rank_manifests(features_dir, split)) if s]
    rows = {image_id: k for k, image_id in enumerate(key["image_ids"])}
    failed = sorted((f for s in states for f in s["failed"]), key=lambda f: rows[f["image_id"]])
    return {"failed": failed, "seconds": max(s.get("seconds", 0.0) for s in states),
            "batches": sorted(b for s in states for b in s["batches"])}


def extract_features(encoder: Encoder, items: Sequence[ImageItem], features_dir: str | Path,
                     split: str, pretrained: bool = True, batch_size: int = 32, workers: int = 2,
                     progress: bool = True, requested_precision: str | None = None,
                     dist: Dist | None = None) -> FeatureStore:
    """Run ``encoder`` over ``items`` into ``features_dir/{split}.npy``; resume or reuse when possible.

    Unreadable images are skipped (their row stays zero), counted, and listed in the manifest.
    ``requested_precision``: what the config asked for ("auto" or the encoder's own precision).
    Under torchrun (``dist``) every rank encodes its share of the batches into the same partial
    store and rank 0 commits it: the store is byte for byte the one a single process writes.
    """
    dist = dist or Dist()
    features_dir = Path(features_dir)
    key = {"format": FORMAT, "encoder": _encoder_record(encoder, pretrained),
           "requested_precision": requested_precision or getattr(encoder, "requested_precision",
                                                                 encoder.precision),
           "image_ids": [it.image_id for it in items], "files": [it.path for it in items]}
    plan = None
    if dist.is_main:
        features_dir.mkdir(parents=True, exist_ok=True)
        plan = _plan(features_dir, split, key, batch_size, encoder)
    plan = dist.broadcast(plan)  # "reuse", "commit", or the batches still to encode
    if isinstance(plan, list):
        mine = plan[dist.rank::dist.world_size]
        _fill(encoder, items, features_dir, split, key, batch_size, mine, workers, progress, dist.rank)
        dist.barrier()
    if dist.is_main and plan != "reuse":
        state = _merged(features_dir, split, key, batch_size)
        _commit(features_dir, split, key, state, encoder)
        if state["failed"]:
            print(f"{split}: skipped {len(state['failed'])} unreadable image(s):")
        for f in state["failed"]:
            print(f"  {f['reason']}")
    dist.barrier()
    return FeatureStore.open(features_dir, split)


def _plan(features_dir: Path, split: str, key: dict, batch_size: int, encoder: Encoder) -> str | list[int]:
    """Rank 0 decides: reuse a finished store, finish an interrupted commit, or encode what is left."""
    final_json, final = features_dir / f"{split}.json", features_dir / f"{split}.npy"
    partial = features_dir / f"{split}.partial.npy"
    if final_json.is_file() and final.is_file():
        manifest = read_json(final_json, "feature manifest")
        if all(manifest.get(k) == v for k, v in key.items()):
            for leftover in _rank_manifests(features_dir, split):  # a kill after the commit
                leftover.unlink(missing_ok=True)
            return "reuse"
    if not partial.is_file() and final.is_file() \
            and _progress(_rank_manifest(features_dir, split, 0), key, batch_size) is not None \
            and not _batches_left(features_dir, split, key, batch_size):
        return "commit"  # the kill came after the data was renamed into place, before the manifest
    _start_partial(features_dir, split, key, batch_size, encoder)
    return _batches_left(features_dir, split, key, batch_size)


def _commit(features_dir: Path, split: str, key: dict, state: dict, encoder: Encoder) -> None:
    """Make the finished partial store the split's store: old manifest out, data in, new manifest."""
    final_json, final = features_dir / f"{split}.json", features_dir / f"{split}.npy"
    partial = features_dir / f"{split}.partial.npy"
    shape, dtype = _row_layout(encoder)
    manifest = {**key, "precision": encoder.precision, "shape": [len(key["image_ids"]), *shape],
                "dtype": str(dtype), "failed": state["failed"], "seconds": state.get("seconds", 0.0)}
    if partial.is_file():
        if final_json.exists():  # the old store must never be read against the new data
            final_json.unlink()
            fsync_dir(features_dir)
            fault_point(f"unlink {final_json.name}")
        os.replace(partial, final)
        fsync_dir(features_dir)
        fault_point(f"rename {final.name}")
    write_json(final_json, manifest, indent=None)
    for progress in _rank_manifests(features_dir, split):
        progress.unlink(missing_ok=True)
    fsync_dir(features_dir)
    fault_point(f"unlink {split}.partial.json")


def image_loader(items: Sequence[ImageItem], image_size: int, batch_size: int, workers: int,
                 start: int = 0, batches: Sequence[int] | None = None) -> DataLoader:
    """Batches of (row numbers, uint8 pixels (b, 3, S, S), failure reasons) from ``items[start:]``,
    or only the given batch numbers (batch b = rows ``b * batch_size`` onwards).

    ``workers`` processes decode and resize JPEGs ahead of the encoder (4 batches each), so
    decoding overlaps the forward passes; the order of rows is kept.
    """
    n = len(items)
    if batches is None:
        batches = range(start // batch_size, -(-n // batch_size))
    rows = [list(range(max(start, b * batch_size), min(n, (b + 1) * batch_size))) for b in batches]
    return DataLoader(_ImageFiles(items, image_size), batch_sampler=[r for r in rows if r],
                      num_workers=workers, collate_fn=_collate, persistent_workers=False,
                      prefetch_factor=4 if workers else None)


def _fill(encoder, items, features_dir: Path, split: str, key: dict, batch_size: int, batches: list[int],
          workers: int, progress: bool, rank: int) -> None:
    """Encode ``batches`` and write their rows in place, saving this rank's progress after each."""
    path, manifest = features_dir / f"{split}.partial.npy", _rank_manifest(features_dir, split, rank)
    state = _progress(manifest, key, batch_size) or _fresh_progress(key, batch_size, encoder)
    device = next((p.device for p in encoder.parameters()), torch.device("cpu"))
    shape, dtype = _row_layout(encoder)
    row_bytes = int(np.prod(shape)) * dtype.itemsize
    offset = _header_offset(path)
    loader = image_loader(items, encoder.spec.image_size, batch_size, workers, batches=batches)
    total = sum(min(len(items), (b + 1) * batch_size) - b * batch_size for b in batches)
    bar = tqdm(total=total, unit="img", desc=f"features {split}" + (f" (rank {rank})" if rank else ""),
               disable=not progress, dynamic_ncols=True)
    started = time.time() - state.get("seconds", 0.0)
    with open(path, "r+b") as out, torch.inference_mode():
        for rows, pixels, reasons in loader:
            if encoder.spec.trainable:
                block = pixels.numpy()
            else:
                block = encoder(pixels.to(device)).to("cpu", torch.float16).numpy()  # (b, R, D)
            for k, reason in enumerate(reasons):
                if reason:
                    block[k] = 0
                    state["failed"].append({"image_id": items[rows[k]].image_id,
                                            "file": items[rows[k]].path, "reason": reason})
            out.seek(offset + rows[0] * row_bytes)
            out.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
            out.flush()
            os.fsync(out.fileno())  # the rows are on disk before the manifest says they are done
            fault_point(f"rows {split}")
            state["batches"].append(rows[0] // batch_size)
            state["seconds"] = round(time.time() - started, 1)
            write_json(manifest, state, indent=None)
            bar.update(len(rows))
    bar.close()


def verify_store(features_dir: str | Path, split: str) -> list[str]:
    """Check a finished store against its manifest; return a list of problems (empty when sound)."""
    problems = []
    try:
        store = FeatureStore.open(features_dir, split)
    except AttncapError as exc:
        return [str(exc)]
    for name in store.manifest["files"]:
        if not Path(name).is_file():
            problems.append(f"image listed in the manifest is gone: {name}")
    if store.encoder["trainable"]:
        return problems
    norms = np.abs(store.array[:, :, :8].astype(np.float32)).sum(axis=(1, 2))
    for row, image_id in enumerate(store.ids):
        if norms[row] == 0 and image_id not in store.failed:
            problems.append(f"row {row} (image {image_id}) is all zero but not listed as failed")
    return problems
