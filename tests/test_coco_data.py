"""Prepare on COCO-format data: Karpathy's split, and every kind of bad input the issue lists."""

import json

import numpy as np
import pytest
from PIL import Image

from attncap.cli import main
from attncap.config import DataConfig
from attncap.encoders import build_encoder
from attncap.errors import AttncapError
from attncap.features import ImageItem, extract_features
from attncap.files import read_json
from attncap.prepare import load_split, prepare
from attncap.vocab import tokenize
from coco_fixture import draw, image_name


def skipped_items(data_dir, reason):
    return [item for item in read_json(data_dir / "manifest.json")["skipped"]["items"] if item["reason"] == reason]


def test_karpathy_split_folds_restval_and_skips_images_not_on_disk(mini_coco, tmp_path, capsys):
    cfg = DataConfig(dataset="coco", splits=str(mini_coco.root / "karpathy" / "dataset_coco.json"), top_k=8)
    vocab = prepare(cfg, None, mini_coco.root, tmp_path / "data")
    ids = {s: [r["id"] for r in load_split(tmp_path / "data", s)] for s in ("train", "val", "test")}
    assert ids == mini_coco.karpathy  # file order kept; restval in train; the missing image dropped
    manifest = read_json(tmp_path / "data" / "manifest.json")
    assert manifest["split_source"] == "karpathy" and manifest["counts"] == {"train": 20, "val": 4, "test": 4}
    assert manifest["skipped"]["counts"] == {"image file not found": 1}
    (missing,) = skipped_items(tmp_path / "data", "image file not found")
    assert missing["image_id"] == mini_coco.missing_id and missing["file"].endswith(
        f"val2014/{image_name('val2014', mini_coco.missing_id)}")
    err = capsys.readouterr().err
    assert "warning: skipped 1 x image file not found" in err and "manifest.json" in err
    record = load_split(tmp_path / "data", "test")[0]
    assert record["file"] == str(mini_coco.root / "val2014" / image_name("val2014", record["id"]))
    assert len(record["captions"]) == 4 and len(vocab) == 4 + 8
    few = prepare(DataConfig(dataset="coco", splits=cfg.splits, num_examples=5), None, mini_coco.root,
                  tmp_path / "few")
    assert [r["id"] for r in load_split(tmp_path / "few", "train")] == mini_coco.karpathy["train"][:5]
    words = {w for r in load_split(tmp_path / "few", "train") for c in r["captions"] for w in tokenize(c)}
    assert set(few.words[4:]) == words  # the vocabulary comes from those five images only


def bad_coco(tmp_path):
    """A COCO-format captions JSON with one of each per-item problem, and its image folder."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    images = []
    for i in range(1, 15):
        if i != 13:  # image 13 is listed but not on disk
            draw(i)[0].save(images_dir / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg"})
    anns = [{"id": 100 + i, "image_id": i, "caption": f"A picture of thing w{i}."} for i in range(1, 11)]
    anns += [
        {"id": 200, "image_id": 99, "caption": "an image that is not in images"},
        {"id": 101, "image_id": 2, "caption": "a duplicate annotation id"},
        {"id": 201, "image_id": 12, "caption": "  \t "},
        {"id": 202, "image_id": 3, "caption": None},
        {"id": 203, "image_id": 1, "caption": "Un CAFÉ près de la fenêtre"},
        {"id": 204, "image_id": 13, "caption": "the image file is gone"},
        {"id": 205, "image_id": 14, "caption": "a fine caption"},
    ]
    # image 11 has no annotation; image 12 only a blank one
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": [1, 2, 3, 4, 5, 6, 11, 12, 13, 99], "val": [7, 8], "test": [9, 10, 14]}))
    return path, images_dir, splits


def test_per_item_problems_are_skipped_counted_and_listed(tmp_path, capsys):
    captions, images_dir, splits = bad_coco(tmp_path)
    vocab = prepare(DataConfig(dataset="coco", splits=str(splits)), captions, images_dir, tmp_path / "data")
    manifest = read_json(tmp_path / "data" / "manifest.json")
    assert manifest["skipped"]["counts"] == {
        "caption of an image not in 'images'": 1, "duplicate annotation id": 1, "empty caption": 2,
        "image without a caption": 2, "image file not found": 1}
    assert {i["image_id"] for i in skipped_items(tmp_path / "data", "image without a caption")} == {11, 12}
    assert skipped_items(tmp_path / "data", "duplicate annotation id") == [
        {"reason": "duplicate annotation id", "annotation_id": 101, "image_id": 2}]
    assert manifest["split_source"] == "file" and manifest["counts"] == {"train": 6, "val": 2, "test": 3}
    train = {r["id"]: r for r in load_split(tmp_path / "data", "train")}
    assert train[2]["captions"] == ["A picture of thing w2."]
    assert train[1]["captions"][1] == "Un CAFÉ près de la fenêtre"  # kept as written
    assert {"café", "près", "fenêtre"} <= set(vocab.words)   # and tokenized lowercase
    assert train[1]["tokens"][1][2] == vocab.id("café")
    assert capsys.readouterr().err.count("warning: skipped") == 5


def test_dataset_level_problems_stop_with_an_error_naming_the_field(tmp_path, mini_coco, capsys):
    captions, images_dir, _ = bad_coco(tmp_path)
    cut = tmp_path / "cut.json"
    cut.write_text(captions.read_text()[:300])
    code = main(["prepare", "--run", str(tmp_path / "run"), "--captions", str(cut), "--images", str(images_dir),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "cut.json is not valid JSON" in err and "Traceback" not in err
    data = json.loads(captions.read_text())
    del data["images"][3]["file_name"]
    captions.write_text(json.dumps(data))
    with pytest.raises(AttncapError, match=r"images\[3\] lacks 'id' or 'file_name'"):
        prepare(DataConfig(dataset="coco"), captions, images_dir, tmp_path / "d")
    karpathy = json.loads((mini_coco.root / "karpathy" / "dataset_coco.json").read_text())
    karpathy["images"][5]["split"] = "dev"
    bad = tmp_path / "karpathy.json"
    bad.write_text(json.dumps(karpathy))
    with pytest.raises(AttncapError, match=r"images\[5\]\.split is 'dev'"):
        prepare(DataConfig(dataset="coco", splits=str(bad)), None, mini_coco.root, tmp_path / "d")
    with pytest.raises(AttncapError, match="no usable image.*image file not found"):
        prepare(DataConfig(dataset="coco", splits=str(mini_coco.root / "karpathy" / "dataset_coco.json")),
                None, tmp_path / "elsewhere", tmp_path / "d")
    with pytest.raises(AttncapError, match="data.captions"):
        prepare(DataConfig(dataset="coco"), None, images_dir, tmp_path / "d")
    assert main(["prepare", "--run", str(tmp_path / "run2"), "--set", "data.dataset=coco", "--quiet"]) == 2
    assert "needs data.images" in capsys.readouterr().err


def test_features_list_undecodable_images_and_read_cmyk_and_renamed_png(mini_coco, tmp_path):
    folder = mini_coco.root / "train2014"
    cmyk, png, truncated, normal = mini_coco.train_ids[:4]
    items = [ImageItem(i, str(folder / image_name("train2014", i))) for i in (cmyk, png, truncated, normal)]
    assert Image.open(items[0].path).mode == "CMYK" and Image.open(items[1].path).format == "PNG"
    store = extract_features(build_encoder("small_cnn"), items, tmp_path / "features", "train",
                             pretrained=False, workers=0, progress=False)
    assert [(f["image_id"], f["file"]) for f in store.manifest["failed"]] == [(truncated, items[2].path)]
    assert "truncated or corrupt" in store.manifest["failed"][0]["reason"]
    assert not store[truncated].any()
    for image_id in (cmyk, png, normal):  # stored pixels (small_cnn keeps them) match the drawing
        expected = np.asarray(draw(image_id)[0].resize((128, 128)), dtype=np.float32).transpose(2, 0, 1)
        assert np.abs(store[image_id].astype(np.float32) - expected).mean() < 12
