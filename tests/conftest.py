"""Shared fixtures: a tiny shapes-world run, prepared and with features, built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from attncap import config as config_lib
from attncap.config import RunConfig

TINY = {
    "data": {"train_images": 48, "val_images": 12, "test_images": 12, "shapes_image_size": 128},
    "encoder": {"batch_size": 16, "workers": 0},
    "model": {"embed_dim": 32, "proj_dim": 32, "attention_dim": 32, "hidden_dim": 48, "fc_dim": 32},
    "train": {"epochs": 2, "batch_size": 16, "warmup_steps": 2, "log_every": 2, "threads": 1},
    "decode": {"beam_size": 2, "max_len": 12, "eval_batch_size": 16},
}


def tiny_config(**sections) -> RunConfig:
    cfg = config_lib.merge(RunConfig(), TINY)
    return config_lib.merge(cfg, sections)


@pytest.fixture(scope="session")
def prepared_run(tmp_path_factory) -> Path:
    """A run directory with the shapes world, prepared data and EfficientNet-Lite0 features."""
    from attncap.pipeline import features_stage, prepare_stage

    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    prepare_stage(run, cfg, progress=False)
    features_stage(run, cfg, progress=False)
    return run


@pytest.fixture()
def run_copy(prepared_run, tmp_path) -> Path:
    """A private copy of the prepared run that a test may train in or damage."""
    dst = tmp_path / "run"
    shutil.copytree(prepared_run, dst)
    return dst


@pytest.fixture(scope="session")
def trained_run(prepared_run, tmp_path_factory) -> Path:
    """The tiny run trained for 2 epochs (checkpoints/best and latest). Read it; don't modify it."""
    from attncap.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    shutil.copytree(prepared_run, run)
    train(run, tiny_config(), progress=False)
    return run


@pytest.fixture(scope="session")
def mini_coco(tmp_path_factory):
    """A miniature MS-COCO 2014 on disk and as zips (see tests/coco_fixture.py). Read-only."""
    from coco_fixture import build_mini_coco

    return build_mini_coco(tmp_path_factory.mktemp("mini_coco"))
