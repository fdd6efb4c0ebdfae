"""Self-critical training as a phase of a run: from the tiny trained run's cross-entropy checkpoint,
into its own checkpoints and log, resumed exactly, and through `attncap train --scst`."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from attncap import scst_train as scst_train_lib
from attncap.cli import main
from attncap.distributed import StopSignals, process_group
from attncap.errors import AttncapError
from attncap.scst_train import scst_train
from attncap.train import open_splits
from conftest import tiny_config

# 48 training images in batches of 8: 6 steps per epoch, 12 in all; a stop at step 8 lands mid-epoch 2.
SCST = {"epochs": 2, "batch_size": 8, "samples": 3, "lr": 1e-3, "patience": 0}
TRAIN = {"log_every": 1}


def weights(run, name):
    return load_file(str(run / "checkpoints" / name / "model.safetensors"))


def records(run):
    return [json.loads(line) for line in (run / "scst" / "metrics.jsonl").read_text().splitlines()]


def copy(trained_run, dst):
    shutil.copytree(trained_run, dst)
    return dst


def overrides(sections):
    return [a for name, values in sections.items() for k, v in values.items()
            for a in ("--set", f"{name}.{k}={v}")]


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_scst_from_the_trained_run_changes_the_weights_and_logs_reward_baseline_entropy(
        trained_run, tmp_path, capsys, baseline):
    run = copy(trained_run, tmp_path / "run")
    scst = {**SCST, "baseline": baseline, "bleu4": 0.5 if baseline == "greedy" else 0.0}
    assert main(["train", "--scst", "--run", str(run), "--quiet",
                 *overrides({"scst": scst, "train": TRAIN})]) == 0
    assert "trained 2 epochs (12 steps); self-critical: best val CIDEr (beam 2)" in capsys.readouterr().out
    start, after = weights(trained_run, "best"), weights(run, "scst_latest")
    assert max(float((start[k] - after[k]).abs().max()) for k in start) > 1e-3
    for name in ("best", "latest"):  # the cross-entropy checkpoints stay as they were
        assert all(torch.equal(weights(trained_run, name)[k], weights(run, name)[k]) for k in start)
    assert (run / "checkpoints" / "scst_best" / "model.safetensors").is_file()
    assert (run / "scst" / "cider_d.npz").is_file() and any((run / "scst" / "tb").glob("events.*"))
    steps = [r for r in records(run) if "epoch" not in r]
    epochs = [r for r in records(run) if "epoch" in r]
    assert [r["step"] for r in steps] == list(range(1, 13)) and [r["epoch"] for r in epochs] == [1, 2]
    for r in steps:
        assert {"reward", "baseline", "entropy", "scst_loss", "lr"} <= r.keys()
        assert r["reward"] >= 0 and r["entropy"] > 0 and r["lr"] == SCST["lr"]
    if baseline == "mean":  # the mean of the others averages to the mean reward
        assert all(abs(r["reward"] - r["baseline"]) < 1e-4 for r in steps)
    assert all({"reward", "val_CIDEr", "val_loss", "time_s"} <= r.keys() for r in epochs)


def steps_on_one_batch(run: Path, scst: dict, steps: int = 25) -> list[dict]:
    """``steps`` SCST steps on the same 8 training images, from the run's cross-entropy best."""
    cfg = tiny_config(scst={"batch_size": 8, "samples": 5, "lr": 5e-3, **scst})
    with process_group(None) as dist, StopSignals() as stop:
        vocab, stores, splits = open_splits(run)
        reward = scst_train_lib.build_reward(run, splits["train"], vocab, 0.0, dist)
        t = scst_train_lib._trainer(run, cfg, vocab, stores["train"], len(splits["train"]), False, False,
                                    dist, stop)
        return [scst_train_lib.scst_step(t, splits["train"], vocab, reward, np.arange(8)) for _ in range(steps)]


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_scst_steps_on_one_batch_raise_its_reward(trained_run, tmp_path, baseline):
    """It learns what it is rewarded for: 25 steps on the same 8 images (of the 2-epoch model, which
    writes near-random captions) raise their sampled captions' mean CIDEr-D by half at least (mean
    baseline: about 0.21 -> 0.41 over the first and last 5 steps; greedy: 0.21 -> 0.45)."""
    rewards = [r["reward"] for r in steps_on_one_batch(copy(trained_run, tmp_path / "run"), {"baseline": baseline})]
    assert np.mean(rewards[-5:]) > 1.5 * np.mean(rewards[:5]), np.round(rewards, 3)


def test_the_entropy_bonus_keeps_the_sampling_distribution_spread(trained_run, tmp_path):
    """25 steps on the same 8 images narrow the sampling distribution; with ``scst.entropy`` they
    narrow it less (the per-token entropy logged over the last 5 steps stays higher)."""
    plain, bonus = (np.array([r["entropy"] for r in steps_on_one_batch(copy(trained_run, tmp_path / f"run{w}"),
                                                                       {"entropy": w})]) for w in (0.0, 0.5))
    assert plain[0] == pytest.approx(bonus[0])  # the same model and samples at the first step
    assert plain[-5:].mean() < 0.9 * plain[:5].mean(), np.round(plain, 3)  # SCST narrows it (4.07 -> 3.44)
    assert bonus[-5:].mean() > 1.1 * plain[-5:].mean(), (np.round(plain, 3), np.round(bonus, 3))  # 4.09


def stop_at(monkeypatch, step):
    """Make the run stop as a SIGTERM would, just before optimizer step ``step + 1``."""
    real = scst_train_lib.scst_step

    def step_(t, *args):
        if t.state.step == step:
            t.stop.received = "SIGTERM"
        return real(t, *args)
    monkeypatch.setattr(scst_train_lib, "scst_step", step_)


def test_a_stop_mid_epoch_then_resume_equals_an_uninterrupted_scst_run(trained_run, tmp_path, monkeypatch,
                                                                       capsys):
    straight, stopped = copy(trained_run, tmp_path / "straight"), copy(trained_run, tmp_path / "stopped")
    with pytest.raises(AttncapError, match="another model"):  # not the model it starts from
        scst_train(straight, tiny_config(scst=SCST, model={"hidden_dim": 40}), progress=False)
    cfg = tiny_config(scst={**SCST, "min_lr_ratio": 0.1}, train=TRAIN)  # the cosine schedule resumes too
    scst_train(straight, cfg, progress=False)
    lrs = [r["lr"] for r in records(straight) if "epoch" not in r]  # after each of the 12 steps
    assert len(lrs) == 12 and all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[5] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 6 / 12))))  # halfway: 5.5e-4
    assert lrs[-1] == pytest.approx(1e-4)
    stop_at(monkeypatch, 8)
    state = scst_train(stopped, cfg, progress=False)
    assert state.preempted == "SIGTERM" and (state.epoch, state.step, state.batch_in_epoch) == (1, 8, 2)
    monkeypatch.undo()
    with pytest.raises(AttncapError, match="scst.samples 3 -> 4"):
        scst_train(stopped, tiny_config(scst={**SCST, "samples": 4}, train=TRAIN), progress=False)
    with pytest.raises(AttncapError, match=r"scst.entropy 0(\.0)? -> 0.1"):  # another objective
        scst_train(stopped, tiny_config(scst={**SCST, "entropy": 0.1}, train=TRAIN), progress=False)
    changed = copy(stopped, tmp_path / "changed")  # a changed schedule is applied, with a note
    capsys.readouterr()
    scst_train(changed, tiny_config(scst={**SCST, "min_lr_ratio": 0.5}, train=TRAIN), progress=False)
    assert "scst.min_lr_ratio 0.1 -> 0.5" in capsys.readouterr().out
    lr9 = [r["lr"] for r in records(changed) if "epoch" not in r][8]
    assert lr9 == pytest.approx(1e-3 * (0.5 + 0.5 * 0.5 * (1 + np.cos(np.pi * 9 / 12))))
    assert scst_train(stopped, cfg, progress=False).epoch == 2
    a, b = weights(straight, "scst_latest"), weights(stopped, "scst_latest")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]
    assert strip(records(straight)) == strip(records(stopped))


def test_scst_without_a_cross_entropy_checkpoint_is_a_one_line_error(run_copy, capsys):
    assert main(["train", "--scst", "--run", str(run_copy), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train first" in err[0], err


def test_two_processes_take_the_one_process_scst_steps(trained_run, tmp_path):
    """torchrun with 2 gloo processes: uneven shares (24 + 23 images) and a stand-in (a batch of 1),
    both baselines' pieces on each rank's own samples, the same weights (here a weight average,
    which every rank keeps) and records as 1 process."""
    import os
    import subprocess
    import sys

    scst = {**SCST, "batch_size": 47, "ema": 0.5}  # 48 images: batches of 47 and 1, 2 epochs, 4 steps
    one, two = copy(trained_run, tmp_path / "one"), copy(trained_run, tmp_path / "two")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
            "-m", "attncap.cli", "--", "train", "--scst", "--run", str(two), "--quiet",
            *overrides({"scst": scst, "train": TRAIN})]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        scst_train(one, tiny_config(scst=scst, train=TRAIN), progress=False)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, out
    assert "2 process(es)" in out
    a, b = weights(one, "scst_latest"), weights(two, "scst_latest")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    ra, rb = records(one), records(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2, 2, 3, 4, 4]
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x.keys() - {"time_s"}:
            assert abs(x[k] - y[k]) <= 2e-5, (k, x, y)


def test_a_weight_average_is_what_validation_scores_and_checkpoints_hold_and_it_resumes_exactly(
        trained_run, tmp_path, monkeypatch):
    """scst.ema: the checkpoints hold the moving average of the live weights after each step (made
    here by hand), validation scored it, and a stop mid-epoch resumes average and live weights."""
    from attncap.checkpoint import load_model, load_state
    from attncap.train import evaluate

    scst = {**SCST, "ema": 0.6}
    cfg = tiny_config(scst=scst, train=TRAIN)
    straight, stopped = copy(trained_run, tmp_path / "straight"), copy(trained_run, tmp_path / "stopped")
    live, real = [], scst_train_lib.scst_step

    def recording(t, *args):
        out = real(t, *args)
        live.append({k: v.detach().clone() for k, v in t.model.state_dict().items()})
        return out
    monkeypatch.setattr(scst_train_lib, "scst_step", recording)
    scst_train(straight, cfg, progress=False)
    monkeypatch.undo()
    assert len(live) == 12
    average = dict(live[0])  # the weights after the first step, then 0.6 x average + 0.4 x weights
    for w in live[1:]:
        average = {k: 0.6 * average[k] + 0.4 * w[k] for k in average}
    saved = weights(straight, "scst_latest")
    for k in saved:
        torch.testing.assert_close(saved[k], average[k], atol=1e-6, rtol=0)
    assert max(float((saved[k] - live[-1][k]).abs().max()) for k in saved) > 1e-4  # not the live weights
    state = load_state(straight / "checkpoints" / "scst_latest")
    assert state["averaged_steps"] == 12
    assert all(torch.equal(state["live_weights"][k], live[-1][k]) for k in saved)

    best = max((r for r in records(straight) if "epoch" in r), key=lambda r: r["val_CIDEr"])
    model, vocab, _, _ = load_model(straight / "checkpoints" / "scst_best")
    _, _, splits = open_splits(straight)
    score = evaluate(model, splits["val"], vocab, cfg, torch.device("cpu"), cfg.decode.beam_size)["val_CIDEr"]
    assert score == pytest.approx(best["val_CIDEr"], abs=1e-5)  # validation scored the average

    stop_at(monkeypatch, 8)
    assert scst_train(stopped, cfg, progress=False).step == 8
    monkeypatch.undo()
    with pytest.raises(AttncapError, match="scst.ema 0.6 -> 0.9"):  # other weights than it scored
        scst_train(stopped, tiny_config(scst={**scst, "ema": 0.9}, train=TRAIN), progress=False)
    scst_train(stopped, cfg, progress=False)
    resumed = weights(stopped, "scst_latest")
    for k in saved:
        torch.testing.assert_close(resumed[k], saved[k], atol=1e-6, rtol=0)
    resumed_live = load_state(stopped / "checkpoints" / "scst_latest")["live_weights"]
    for k in saved:
        torch.testing.assert_close(resumed_live[k], live[-1][k], atol=1e-6, rtol=0)
