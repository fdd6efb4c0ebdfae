"""The prepare stage: COCO-format captions + images -> splits, vocabulary and token ids.

Writes ``run_dir/data/``: ``vocab.json``, ``{train,val,test}.json`` (per image: id, file, raw
captions, token ids) and ``manifest.json`` (what produced them, from what, and every skipped
item with its reason). The vocabulary is fitted on the training split only.

Splits are always by image, never by caption (the same image in two splits inflates scores):
from Karpathy's ``dataset_coco.json`` ("restval" folded into train), from a ``{"train": [ids],
"val": [...], "test": [...]}`` file, or seeded. A dataset-level problem (unreadable JSON, a
missing field) raises :class:`AttncapError` naming the file and field; a per-item problem (an
image file not on disk, an empty caption, a duplicate id) skips the item, counts it and lists it
in the manifest.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from pathlib import Path

from .config import DataConfig
from .errors import AttncapError
from .files import atomic_folder, read_json, recover_folder, write_json
from .vocab import Vocab, build_vocab, tokenize

SPLITS = ("train", "val", "test")
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class Skipped:
    """Per-item problems: each skipped item with its reason, for the manifest and a warning."""

    def __init__(self):
        self.items: list[dict] = []

    def add(self, reason: str, **where) -> None:
        self.items.append({"reason": reason, **where})

    def counts(self) -> dict[str, int]:
        return dict(Counter(item["reason"] for item in self.items))

    def warn(self, manifest: Path) -> None:
        """One line per reason on stderr, with an example; the full list is in the manifest."""
        for reason, n in self.counts().items():
            first = next(item for item in self.items if item["reason"] == reason)
            example = ", ".join(f"{k} {v}" for k, v in first.items() if k != "reason")
            print(f"warning: skipped {n} x {reason} (e.g. {example}); all listed in {manifest}",
                  file=sys.stderr)


def _image_id(value, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise AttncapError(f"{where} must be an integer image id, got {value!r}")
    return value


def _good_caption(text) -> bool:
    return isinstance(text, str) and bool(tokenize(text))


def load_coco_captions(captions_json: str | Path, images_dir: str | Path,
                       skipped: Skipped | None = None) -> dict[int, dict]:
    """Read a COCO captions JSON: ``{image_id: {"file": path, "captions": [str]}}``.

    Captions of unknown images, duplicate annotation or image ids and empty captions are
    skipped into ``skipped``; images may be left without captions (see :func:`usable`).
    """
    skipped = skipped if skipped is not None else Skipped()
    data = read_json(captions_json, "captions JSON")
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AttncapError(f"captions JSON {captions_json} has no '{key}' list; is it COCO format?")
    root = Path(images_dir).resolve()
    images: dict[int, dict] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise AttncapError(f"captions JSON {captions_json}: images[{k}] lacks 'id' or 'file_name'")
        image_id = _image_id(img["id"], f"captions JSON {captions_json}: images[{k}].id")
        if image_id in images:
            skipped.add("duplicate image id", image_id=image_id)
            continue
        images[image_id] = {"file": str(root / img["file_name"]), "captions": []}
    seen: set = set()
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise AttncapError(f"captions JSON {captions_json}: annotations[{k}] lacks 'image_id'")
        where = {"annotation_id": ann.get("id"), "image_id": ann["image_id"]}
        if ann.get("id") is not None and ann["id"] in seen:
            skipped.add("duplicate annotation id", **where)
        elif ann["image_id"] not in images:
            skipped.add("caption of an image not in 'images'", **where)
        elif not _good_caption(ann.get("caption")):
            skipped.add("empty caption", **where)
        else:
            images[ann["image_id"]]["captions"].append(ann["caption"].strip())
        seen.add(ann.get("id"))
    return images


def is_karpathy(data) -> bool:
    """Whether a split file is Karpathy's format (``{"images": [{"split": ..., ...}]}``)."""
    return isinstance(data, dict) and isinstance(data.get("images"), list) and \
        any(isinstance(e, dict) and "split" in e for e in data["images"][:1])


def load_karpathy(data: dict, path: str | Path, images_dir: str | Path, skipped: Skipped
                  ) -> tuple[dict[int, dict], dict[str, list[int]]]:
    """Records and splits from Karpathy's file: files are ``images_dir/filepath/filename``.

    Works for his COCO (``cocoid``) and Flickr (``imgid``, no ``filepath``) files alike.
    """
    root = Path(images_dir).resolve()
    records: dict[int, dict] = {}
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for k, entry in enumerate(data["images"]):
        where = f"Karpathy split file {path}: images[{k}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
            raise AttncapError(f"{where} lacks 'filename'")
        image_id = _image_id(entry.get("cocoid", entry.get("imgid")), f"{where}.cocoid (or imgid)")
        split = KARPATHY_SPLITS.get(entry.get("split"))
        if split is None:
            raise AttncapError(f"{where}.split is {entry.get('split')!r}; expected train, restval, val or test")
        if image_id in records:
            skipped.add("duplicate image id", image_id=image_id)
            continue
        captions = []
        for sentence in entry.get("sentences") or []:
            text = (sentence.get("raw") or " ".join(sentence.get("tokens", []))) if isinstance(sentence, dict) else None
            if _good_caption(text):
                captions.append(text.strip())
            else:
                skipped.add("empty caption", image_id=image_id)
        file = root / entry.get("filepath", "") / entry["filename"]
        records[image_id] = {"file": str(file), "captions": captions}
        splits[split].append(image_id)
    return records, splits


def usable(records: dict[int, dict], skipped: Skipped) -> dict[int, dict]:
    """The records with at least one caption and an image file on disk; the rest are skipped."""
    out = {}
    for image_id, rec in records.items():
        if not rec["captions"]:
            skipped.add("image without a caption", image_id=image_id, file=rec["file"])
        elif not Path(rec["file"]).is_file():
            skipped.add("image file not found", image_id=image_id, file=rec["file"])
        else:
            out[image_id] = rec
    return out


def split_ids(ids: list[int], splits_file: str, seed: int, val: int, test: int,
              skipped: Skipped | None = None) -> dict[str, list[int]]:
    """Split image ids (never captions) into train/val/test: from a ``{split: [ids]}`` file, or seeded.

    A split file whose splits share an image is refused (the leak that inflates test scores); ids
    it names that the data lacks are skipped into ``skipped``, each listed.
    """
    if splits_file:
        return _file_splits(read_json(splits_file, "splits file"), splits_file, set(ids),
                            skipped if skipped is not None else Skipped())
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return {"test": order[:test], "val": order[test:test + val], "train": order[test + val:]}


def _file_splits(data, splits_file: str, known: set[int], skipped: Skipped) -> dict[str, list[int]]:
    out, seen = {}, {}
    for name in SPLITS:
        if not isinstance(data, dict) or not isinstance(data.get(name), list):
            raise AttncapError(f"splits file {splits_file} has no '{name}' list of image ids "
                               "(nor is it Karpathy's format)")
        ids = [_image_id(i, f"splits file {splits_file}: '{name}' entry") for i in data[name]]
        overlap = sorted({i for i in ids if seen.get(i, name) != name})
        if overlap:
            other = seen[overlap[0]]
            raise AttncapError(f"splits file {splits_file}: {len(overlap)} image(s) are in both '{other}' "
                               f"and '{name}' (e.g. {', '.join(map(str, overlap[:5]))}); an image may be "
                               "in one split only, or its scores are inflated: fix the file")
        seen.update((i, name) for i in ids)
        listed = {item.get("image_id") for item in skipped.items}  # already skipped for a reason
        for i in ids:
            if i not in known and i not in listed:
                skipped.add("split file names an image not in the data", image_id=i, split=name)
        out[name] = [i for i in ids if i in known]
    return out


def load_dataset(cfg: DataConfig, captions_json: str | Path | None, images_dir: str | Path,
                 skipped: Skipped) -> tuple[dict[int, dict], dict[str, list[int]], str]:
    """Usable records, their splits (by image) and where the split came from."""
    karpathy = read_json(cfg.splits, "splits file") if cfg.splits else None
    if karpathy is not None and is_karpathy(karpathy):
        records, splits = load_karpathy(karpathy, cfg.splits, images_dir, skipped)
        if captions_json:  # a captions JSON, when given, supplies the captions instead
            coco = load_coco_captions(captions_json, images_dir, skipped)
            for image_id, rec in records.items():
                rec["captions"] = coco[image_id]["captions"] if image_id in coco else []
        records = usable(records, skipped)
        return records, {k: [i for i in v if i in records] for k, v in splits.items()}, "karpathy"
    if not captions_json:
        raise AttncapError("data.captions (a COCO captions JSON) is needed unless data.splits is "
                           "Karpathy's dataset_coco.json")
    records = usable(load_coco_captions(captions_json, images_dir, skipped), skipped)
    splits = split_ids(list(records), cfg.splits, cfg.seed, cfg.val_images, cfg.test_images, skipped)
    return records, splits, "file" if cfg.splits else "seeded"


def prepare(cfg: DataConfig, captions_json: str | Path | None, images_dir: str | Path, out_dir: str | Path,
            extra: dict | None = None) -> Vocab:
    """Build the vocabulary and tokenized splits into ``out_dir``; returns the vocabulary."""
    out_dir = Path(out_dir)
    skipped = Skipped()
    records, splits, source = load_dataset(cfg, captions_json, images_dir, skipped)
    if not records:
        raise AttncapError(f"no usable image in {captions_json or cfg.splits} (skipped: "
                           f"{skipped.counts() or 'none'}); check data.images={images_dir}")
    if cfg.num_examples > 0:
        splits["train"] = splits["train"][: cfg.num_examples]
    for name in SPLITS:
        if not splits[name]:
            raise AttncapError(f"the {name} split has no usable image ({source} split of {len(records)} "
                               "images); use more data or change data.val_images/test_images")
    vocab = build_vocab((c for i in splits["train"] for c in records[i]["captions"]),
                        cfg.top_k, cfg.min_count)
    with atomic_folder(out_dir) as tmp:  # splits, vocabulary and manifest are replaced together
        _write_prepared(tmp, cfg, records, splits, source, vocab, skipped, captions_json, images_dir, extra)
    skipped.warn(out_dir / "manifest.json")
    return vocab


def _write_prepared(out_dir: Path, cfg: DataConfig, records: dict, splits: dict, source: str, vocab: Vocab,
                    skipped: Skipped, captions_json, images_dir, extra: dict | None) -> None:
    for name, ids in splits.items():
        rows = [{"id": i, "file": records[i]["file"], "captions": records[i]["captions"],
                 "tokens": [vocab.encode(c, cfg.max_words) for c in records[i]["captions"]]}
                for i in ids]
        write_json(out_dir / f"{name}.json", {"split": name, "images": rows}, indent=None)
    vocab.save(out_dir / "vocab.json")
    write_json(out_dir / "manifest.json", {
        "captions": str(captions_json or ""), "images": str(images_dir), "splits_file": cfg.splits,
        "split_source": source, "counts": {k: len(v) for k, v in splits.items()},
        "caption_counts": {k: sum(len(records[i]["captions"]) for i in v) for k, v in splits.items()},
        "vocab_size": len(vocab), "data_config": cfg.__dict__,
        "skipped": {"counts": skipped.counts(), "items": skipped.items}, **(extra or {})})


def load_split(data_dir: str | Path, split: str) -> list[dict]:
    """The prepared records of one split (see :func:`prepare`)."""
    data = read_json(recover_folder(data_dir) / f"{split}.json", f"prepared split {split!r} (run `attncap prepare`)")
    return data["images"]


def references(records: list[dict]) -> dict[int, list[str]]:
    """Reference captions per image id in attncap's own tokenization, re-joined.

    Only for the cheap per-epoch validation CIDEr, whose candidates are vocabulary words; official
    scores use :func:`raw_references` through the PTBTokenizer (see ``metrics.CaptionScorer``).
    """
    return {r["id"]: [" ".join(tokenize(c)) for c in r["captions"]] for r in records}


def raw_references(records: list[dict]) -> dict[int, list[str]]:
    """Reference captions per image id as written in the dataset (COCO ``caption``, Karpathy ``raw``)."""
    return {r["id"]: list(r["captions"]) for r in records}
