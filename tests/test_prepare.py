import json

import pytest

from attncap.config import DataConfig
from attncap.errors import AttncapError
from attncap.prepare import load_split, prepare
from attncap.vocab import Vocab


def coco(tmp_path, n=20):
    images = [{"id": i, "file_name": f"{i}.jpg"} for i in range(1, n + 1)]
    for i in range(1, n + 1):
        (tmp_path / f"{i}.jpg").touch()  # prepare skips images that are not on disk
    anns = [{"id": 100 + i, "image_id": i, "caption": f"A photo number w{i} of a thing."} for i in range(1, n + 1)]
    anns += [{"id": 999, "image_id": 1, "caption": "   "}]  # empty caption: dropped
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_seeded_split_is_by_image_and_vocab_uses_train_only(tmp_path):
    cfg = DataConfig(dataset="coco", val_images=4, test_images=4, seed=3)
    vocab = prepare(cfg, coco(tmp_path), tmp_path, tmp_path / "data")
    splits = {s: load_split(tmp_path / "data", s) for s in ("train", "val", "test")}
    ids = {s: {r["id"] for r in rows} for s, rows in splits.items()}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    train_words = {f"w{i}" for i in ids["train"]}
    assert train_words <= set(vocab.words) and not ({f"w{i}" for i in ids["test"]} & set(vocab.words))
    assert Vocab.load(tmp_path / "data" / "vocab.json") == vocab
    first = splits["train"][0]
    assert first["tokens"][0] == [vocab.start, *[vocab.id(w) for w in first["captions"][0].lower().strip(".").split()], vocab.end]
    assert all(r["file"].startswith(str(tmp_path)) for r in splits["train"])
    again = prepare(cfg, coco(tmp_path), tmp_path, tmp_path / "data2")
    assert again == vocab and load_split(tmp_path / "data2", "test") == splits["test"]


def test_num_examples_and_top_k(tmp_path):
    cfg = DataConfig(dataset="coco", val_images=2, test_images=2, num_examples=5, top_k=3)
    vocab = prepare(cfg, coco(tmp_path), tmp_path, tmp_path / "data")
    assert len(load_split(tmp_path / "data", "train")) == 5
    assert len(vocab) == 4 + 3


def test_dataset_level_problems_name_the_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(AttncapError, match="'annotations'"):
        prepare(DataConfig(), bad, tmp_path, tmp_path / "d")
    bad.write_text('{"images": [], "annotations": [')
    with pytest.raises(AttncapError, match="bad.json"):
        prepare(DataConfig(), bad, tmp_path, tmp_path / "d")
