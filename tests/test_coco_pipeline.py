"""The whole COCO path through the CLI on the miniature COCO served from 127.0.0.1:
data -> prepare -> features -> train -> evaluate -> caption, with InceptionV3 (random weights,
asked for explicitly) and with EfficientNet-Lite0 (its real ImageNet weights)."""

import json
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from attncap import config as config_lib
from attncap.cli import main
from attncap.features import FeatureStore
from attncap.metrics import METRIC_KEYS
from coco_fixture import ZipServer, image_name
from conftest import TINY

CONFIGS = ("coco_seed.toml", "coco_paper.toml")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def tiny_args():
    return [f"--set={section}.{k}={v}" for section, values in TINY.items() for k, v in values.items()]


@pytest.fixture(scope="module")
def coco_prepared(mini_coco, tmp_path_factory):
    """`attncap data coco2014` from the local server, then `attncap prepare` with Karpathy's split."""
    root = tmp_path_factory.mktemp("coco_root")
    with ZipServer(mini_coco.zips) as server:
        assert main(["data", "coco2014", "--root", str(root), "--mirror", server.url, "--no-checksums",
                     "--quiet"]) == 0
    run = tmp_path_factory.mktemp("coco_run")
    assert main(["prepare", "--run", str(run), "--images", str(root),
                 "--splits", str(root / "karpathy" / "dataset_coco.json"), "--quiet", *tiny_args()]) == 0
    return root, run


def fresh_run(coco_prepared, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(coco_prepared[1], run)
    return run


@pytest.fixture()
def no_weight_downloads(tmp_path, monkeypatch):
    """An empty torch cache and every urllib request sent to a closed port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    proxy = urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{port}", "https": f"http://127.0.0.1:{port}"})
    urllib.request.install_opener(urllib.request.build_opener(proxy))
    yield
    urllib.request.install_opener(None)


def test_inception_v3_path_end_to_end(coco_prepared, mini_coco, tmp_path, capsys, no_weight_downloads):
    root, _ = coco_prepared
    run = fresh_run(coco_prepared, tmp_path)
    code = main(["features", "--run", str(run), "--encoder", "inception_v3", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "inception_v3_google" in err and "--no-pretrained" in err and "Traceback" not in err
    assert not (run / "features" / "train.npy").exists()

    assert main(["features", "--run", str(run), "--encoder", "inception_v3", "--no-pretrained", "--quiet"]) == 0
    store = FeatureStore.open(run / "features", "train")
    assert store.array.shape == (20, 64, 2048) and store.array.dtype == np.float16
    assert 0 < (run / "features" / "train.npy").stat().st_size - 20 * 262_144 <= 256  # 8x8x2048 fp16 + header
    assert store.encoder["name"] == "inception_v3" and store.encoder["pretrained"] is False
    assert [f["image_id"] for f in store.manifest["failed"]] == [mini_coco.truncated_id]
    assert main(["features", "--run", str(run), "--verify"]) == 0

    assert main(["train", "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--beams", "1,3,5", "--quiet", "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "| greedy |" in out and "| beam 3 |" in out and "| beam 5 |" in out and "BLEU-4" in out
    for k in (1, 3, 5):
        results = json.loads((run / "eval" / f"results_test_beam{k}.json").read_text())
        assert [r["image_id"] for r in results] == mini_coco.karpathy["test"]
        assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
        scores = json.loads((run / "eval" / f"scores_test_beam{k}.json").read_text())
        assert set(METRIC_KEYS) <= set(scores) and scores["decode"]["beam_size"] == k and scores["images"] == 4
        assert {"CHAIRs", "CHAIRi"} <= set(scores) and scores["chair_captions"] == 4  # annotations/instances_*
        assert {"grounding", "grounding_chance", "grounding_mass", "grounding_words"} <= set(scores)
    assert "| CHAIRs | CHAIRi |" in out
    captions = json.loads((run / "eval" / "captions_test.json").read_text())
    assert all(isinstance(c["hallucinated"], list) and isinstance(c["grounded"], list) for c in captions.values())
    main_scores = json.loads((run / "eval" / "scores.json").read_text())
    assert main_scores == {k: v for k, v in json.loads(
        (run / "eval" / "scores_test_beam5.json").read_text()).items() if k in main_scores}
    assert (run / "eval" / "report" / "index.html").is_file()

    image = root / "val2014" / image_name("val2014", mini_coco.karpathy["test"][0])
    assert main(["caption", "--run", str(run), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}:")


def test_efficientnet_lite0_path_with_real_weights(coco_prepared, mini_coco, tmp_path, capsys):
    root, _ = coco_prepared
    run = fresh_run(coco_prepared, tmp_path)
    assert main(["features", "--run", str(run), "--encoder", "efficientnet_lite0", "--quiet"]) == 0
    store = FeatureStore.open(run / "features", "test")
    assert store.array.shape == (4, 49, 1280) and store.encoder["pretrained"] is True
    assert np.abs(store.array.astype(np.float32)).mean() > 0.01
    assert main(["train", "--run", str(run), "--epochs", "2", "--quiet"]) == 0
    assert main(["evaluate", "--run", str(run), "--quiet", "--samples", "1"]) == 0
    scores = json.loads((run / "eval" / "scores_test_beam2.json").read_text())
    assert set(METRIC_KEYS) <= set(scores)
    assert len(json.loads((run / "eval" / "results_test.json").read_text())) == 4
    capsys.readouterr()
    image = root / "train2014" / image_name("train2014", mini_coco.train_ids[1])  # the PNG named .jpg
    assert main(["caption", "--run", str(run), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}:")


@pytest.mark.parametrize("path", CONFIGS)
def test_coco_config_files_load(path):
    cfg = config_lib.load(CONFIG_DIR / path)
    assert cfg.data.dataset == "coco" and cfg.encoder.name == "inception_v3"
    if "seed" in path:
        assert (cfg.data.top_k, cfg.model.decoder, cfg.model.hidden_dim, cfg.model.embed_dim) == (20000, "gru", 512, 256)
        assert cfg.train.batch_size == 64 and cfg.train.lr == 1e-3
        assert 30_000 <= cfg.data.num_examples * 5 <= 60_000  # COCO has about 5 captions per image
    else:
        assert cfg.model.decoder == "lstm" and cfg.model.alpha_c == 1.0 and cfg.model.dropout == 0.5
        assert cfg.model.init_from_features and cfg.model.gate and cfg.decode.beam_size == 3
        assert cfg.data.splits.endswith("dataset_coco.json") and cfg.train.captions_per_image == 0
