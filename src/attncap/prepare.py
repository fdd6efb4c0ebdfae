"""The prepare stage: COCO-format captions + images -> splits, vocabulary and token ids.

Writes ``run_dir/data/``: ``vocab.json``, ``{train,val,test}.json`` (per image: id, file, raw
captions, token ids) and ``manifest.json`` (what produced them, from what). The vocabulary is
fitted on the training split only.
"""

from __future__ import annotations

import random
from pathlib import Path

from .config import DataConfig
from .errors import AttncapError
from .files import read_json, write_json
from .vocab import Vocab, build_vocab, tokenize

SPLITS = ("train", "val", "test")


def load_coco_captions(captions_json: str | Path, images_dir: str | Path) -> dict[int, dict]:
    """Read a COCO captions JSON: ``{image_id: {"file": path, "captions": [str]}}``.

    Images without a caption and captions without text are dropped; a dataset-level problem
    (missing keys, unreadable JSON) raises an error naming the field.
    """
    data = read_json(captions_json, "captions JSON")
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AttncapError(f"captions JSON {captions_json} has no '{key}' list; is it COCO format?")
    images = {}
    for img in data["images"]:
        if "id" not in img or "file_name" not in img:
            raise AttncapError(f"captions JSON {captions_json}: an entry of 'images' lacks 'id' or 'file_name'")
        images[img["id"]] = {"file": str(Path(images_dir).resolve() / img["file_name"]), "captions": []}
    for ann in data["annotations"]:
        if ann.get("image_id") in images and tokenize(str(ann.get("caption", ""))):
            images[ann["image_id"]]["captions"].append(str(ann["caption"]).strip())
    return {i: rec for i, rec in images.items() if rec["captions"]}


def split_ids(ids: list[int], splits_file: str, seed: int, val: int, test: int) -> dict[str, list[int]]:
    """Split image ids (never captions) into train/val/test: from a file, or seeded."""
    if splits_file:
        data = read_json(splits_file, "splits file")
        known = set(ids)
        out = {}
        for name in SPLITS:
            if not isinstance(data.get(name), list):
                raise AttncapError(f"splits file {splits_file} has no '{name}' list of image ids")
            out[name] = [i for i in data[name] if i in known]
        return out
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return {"test": order[:test], "val": order[test:test + val], "train": order[test + val:]}


def prepare(cfg: DataConfig, captions_json: str | Path, images_dir: str | Path, out_dir: str | Path,
            extra: dict | None = None) -> Vocab:
    """Build the vocabulary and tokenized splits into ``out_dir``; returns the vocabulary."""
    out_dir = Path(out_dir)
    records = load_coco_captions(captions_json, images_dir)
    if not records:
        raise AttncapError(f"captions JSON {captions_json} has no image with a caption")
    splits = split_ids(list(records), cfg.splits, cfg.seed, cfg.val_images, cfg.test_images)
    if cfg.num_examples > 0:
        splits["train"] = splits["train"][: cfg.num_examples]
    vocab = build_vocab((c for i in splits["train"] for c in records[i]["captions"]),
                        cfg.top_k, cfg.min_count)
    for name, ids in splits.items():
        rows = [{"id": i, "file": records[i]["file"], "captions": records[i]["captions"],
                 "tokens": [vocab.encode(c, cfg.max_words) for c in records[i]["captions"]]}
                for i in ids]
        write_json(out_dir / f"{name}.json", {"split": name, "images": rows}, indent=None)
    vocab.save(out_dir / "vocab.json")
    write_json(out_dir / "manifest.json", {
        "captions": str(captions_json), "images": str(images_dir), "splits_file": cfg.splits,
        "counts": {k: len(v) for k, v in splits.items()}, "vocab_size": len(vocab),
        "data_config": cfg.__dict__, **(extra or {})})
    return vocab


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    """The prepared records of one split (see :func:`prepare`)."""
    data = read_json(Path(data_dir) / f"{split}.json", f"prepared split {split!r} (run `attncap prepare`)")
    return data["images"]


def references(records: list[dict]) -> dict[int, list[str]]:
    """Reference captions per image id, tokenized and re-joined (the metrics' input)."""
    return {r["id"]: [" ".join(tokenize(c)) for c in r["captions"]] for r in records}

