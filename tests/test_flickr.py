"""Flickr8k and Flickr30k through the CLI on miniatures in their exact format: Karpathy's split
file from `attncap data coco2014` (served from 127.0.0.1), images in the folder the sets unpack to,
then configs/flickr{8k,30k}.toml: prepare -> features -> train -> evaluate."""

import json
from pathlib import Path

import pytest

from attncap import config as config_lib
from attncap.cli import main
from attncap.metrics import METRIC_KEYS
from coco_fixture import FLICKR_FOLDERS, ZipServer, flickr_name, write_flickr_images
from conftest import TINY

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DATASETS = ("flickr8k", "flickr30k")


@pytest.mark.parametrize("dataset", DATASETS)
def test_flickr_config_files_load_with_the_papers_settings(dataset):
    cfg = config_lib.load(CONFIG_DIR / f"{dataset}.toml")
    paper = config_lib.load(CONFIG_DIR / "coco_paper.toml")
    assert cfg.data.splits == f"data/coco2014/karpathy/dataset_{dataset}.json"
    assert cfg.data.images.endswith(FLICKR_FOLDERS[dataset]) and cfg.data.dataset == "coco"
    for section in ("encoder", "model", "train", "decode"):  # soft attention exactly as on COCO
        assert getattr(cfg, section) == getattr(paper, section), section
    assert (cfg.data.top_k, cfg.data.min_count, cfg.data.num_examples) == (10000, 5, 0)


@pytest.fixture(scope="module")
def karpathy_dir(mini_coco, tmp_path_factory):
    """`attncap data coco2014 --no-images` from the local server: karpathy/ with all three split files."""
    root = tmp_path_factory.mktemp("flickr_root")
    with ZipServer(mini_coco.zips) as server:
        assert main(["data", "coco2014", "--root", str(root), "--mirror", server.url, "--no-checksums",
                     "--no-images", "--quiet"]) == 0
    return root / "karpathy"


def tiny_args():
    skip = {"train_images", "val_images", "test_images", "shapes_image_size"}  # shapes world only
    return [f"--set={section}.{k}={v}" for section, values in TINY.items() for k, v in values.items()
            if k not in skip]


@pytest.mark.parametrize("dataset", DATASETS)
def test_flickr_runs_end_to_end(karpathy_dir, dataset, tmp_path, capsys):
    split_file = karpathy_dir / f"dataset_{dataset}.json"
    entries = json.loads(split_file.read_text())["images"]
    assert {"filepath", "cocoid"}.isdisjoint(entries[0]) and entries[0]["imgid"] == 0
    images = tmp_path / FLICKR_FOLDERS[dataset]
    test_ids = write_flickr_images(images, split_file)
    run = tmp_path / "run"
    assert main(["prepare", "--run", str(run), "--config", str(CONFIG_DIR / f"{dataset}.toml"),
                 "--splits", str(split_file), "--images", str(images), "--quiet", *tiny_args()]) == 0
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["split_source"] == "karpathy" and manifest["counts"] == {"train": 12, "val": 4, "test": 4}
    assert manifest["caption_counts"]["train"] == 60 and not manifest["skipped"]["items"]
    test_split = json.loads((run / "data" / "test.json").read_text())["images"]
    assert [r["id"] for r in test_split] == test_ids  # imgid, a running index from 0, is the image id
    assert test_split[0]["file"] == str((images / flickr_name(dataset, test_ids[0])).resolve())
    assert test_split[0]["captions"][-1].endswith("middle .")  # Karpathy's "raw", as written

    assert main(["features", "--run", str(run), "--encoder", "small_cnn", "--quiet"]) == 0
    assert main(["train", "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet", "--samples", "1"]) == 0
    assert "BLEU-4" in capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["decoder"] == "lstm" and cfg["model"]["gate"] is True  # the config's, not defaults
    results = json.loads((run / "eval" / "results_test.json").read_text())
    assert [r["image_id"] for r in results] == test_ids
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert set(METRIC_KEYS) <= set(scores) and "CHAIRs" not in scores  # no instance annotations
    assert (run / "eval" / "report" / "index.html").is_file()


def test_prepare_reads_karpathys_flickr_file_without_a_config(karpathy_dir, tmp_path):
    split_file = karpathy_dir / "dataset_flickr8k.json"
    images = tmp_path / FLICKR_FOLDERS["flickr8k"]
    write_flickr_images(images, split_file)
    (images / flickr_name("flickr8k", 3)).unlink()  # one image the user lacks: skipped and listed
    assert main(["prepare", "--run", str(tmp_path / "run"), "--splits", str(split_file), "--images", str(images),
                 "--quiet"]) == 0
    manifest = json.loads((tmp_path / "run" / "data" / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 11, "val": 4, "test": 4}
    assert [(i["reason"], i["image_id"]) for i in manifest["skipped"]["items"]] == [("image file not found", 3)]
