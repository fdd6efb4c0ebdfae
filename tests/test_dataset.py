import json
import threading

import numpy as np
import pytest
import torch

from attncap.dataset import length_buckets, prefetch, teacher_forcing
from attncap.train import train
from attncap.vocab import Vocab
from conftest import tiny_config


def test_teacher_forcing_never_feeds_end():
    tokens = torch.tensor([[Vocab.start, 7, 8, Vocab.end, 0], [Vocab.start, 9, Vocab.end, 0, 0]])
    inputs, targets = teacher_forcing(tokens)
    assert inputs.tolist() == [[Vocab.start, 7, 8, 0], [Vocab.start, 9, 0, 0]]
    assert targets.tolist() == [[7, 8, Vocab.end, 0], [9, Vocab.end, 0, 0]]
    assert ((inputs != 0).sum(1) == (targets != 0).sum(1)).all()  # one input step per target word


def test_length_buckets_cover_everything_once_longest_first():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 20, 1000)
    batches = length_buckets(lengths, 32, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    for b in batches:
        assert (np.diff(lengths[b]) <= 0).all()          # longest first inside a batch
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 2                                     # near-equal lengths: little padding


def test_prefetch_keeps_order_runs_ahead_and_passes_errors():
    loader_threads = set()
    third_loaded = threading.Event()

    def load(x):
        loader_threads.add(threading.get_ident())
        if x == 2:
            third_loaded.set()
        return x * 10

    out = []
    for value in prefetch(range(6), load, depth=2):
        out.append(value)
        if len(out) == 1:  # items 1 and 2 load while item 0 is being used, without asking
            assert third_loaded.wait(timeout=30)
    assert out == [0, 10, 20, 30, 40, 50]
    assert threading.get_ident() not in loader_threads

    def failing(x):
        if x == 3:
            raise ValueError("bad batch 3")
        return x

    with pytest.raises(ValueError, match="bad batch 3"):
        list(prefetch(range(6), failing))


def test_bf16_autocast_training_runs_and_learns(run_copy):
    state = train(run_copy, tiny_config(train={"epochs": 2, "precision": "bf16"}), progress=False)
    assert state.epoch == 2
    log = (run_copy / "train" / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line) for line in log if '"epoch"' in line]
    assert all(np.isfinite(e["train_loss"]) for e in epochs)
    assert epochs[1]["train_loss"] < epochs[0]["train_loss"]


@pytest.mark.parametrize("per_image", [5, 2, 0])
def test_grouped_plan_keeps_each_images_captions_together_and_encodes_it_once(prepared_run, per_image):
    from attncap.train import open_splits

    _, _, splits = open_splits(prepared_run)
    split = splits["train"]
    plan = split.epoch_plan(3, 7, 10, per_image, group=True)
    assert [p.tolist() for p in plan] == [p.tolist() for p in split.epoch_plan(3, 7, 10, per_image, group=True)]
    pairs = np.concatenate(plan)
    counts = np.bincount(pairs[:, 0], minlength=len(split))
    expected = [len(c) if per_image in (0,) or per_image >= len(c) else per_image for c in split.captions]
    assert counts.tolist() == expected                                   # every drawn caption once
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    home = {}
    for k, batch in enumerate(plan):
        for i in batch[:, 0].tolist():
            assert home.setdefault(i, k) == k                              # an image in one batch only
        lengths = [len(split.captions[i][c]) for i, c in batch]
        assert lengths == sorted(lengths, reverse=True)                    # longest first
        loaded = split.batch(batch)
        assert len(loaded.features) == len(set(batch[:, 0].tolist()))     # each image gathered once
        assert torch.equal(loaded.features[loaded.images], split.features(batch[:, 0]))
    per_batch = max(1, round(10 / np.mean(expected)))                      # about 10 captions a batch
    images = [len(set(b[:, 0].tolist())) for b in plan]
    assert max(images) == per_batch and sum(n < per_batch for n in images) <= 1   # one short batch
    assert [p.tolist() for p in plan] != [p.tolist() for p in split.epoch_plan(4, 7, 10, per_image, group=True)]


def test_ungrouped_batches_gather_one_row_per_caption(prepared_run):
    from attncap.train import open_splits

    _, _, splits = open_splits(prepared_run)
    batch = splits["train"].batch(splits["train"].epoch_plan(0, 0, 8, 1)[0])
    assert batch.images is None and len(batch.features) == len(batch.inputs)


def test_grouped_training_runs_and_learns(run_copy):
    cfg = tiny_config(train={"epochs": 2, "captions_per_image": 0, "group_captions": True})
    state = train(run_copy, cfg, progress=False)
    epochs = [json.loads(line) for line in (run_copy / "train" / "metrics.jsonl").read_text().splitlines()
              if '"epoch"' in line]
    assert state.epoch == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]
