"""`features` (and `evaluate`) under torchrun: each rank takes its share of the images, and the
result is the one a single process writes. Real `torchrun` runs with 2 gloo processes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from attncap.cli import main
from attncap.files import FAULT_AT_ENV, FAULT_RANK_ENV
from faults import leftovers, snapshot

ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONUNBUFFERED": "1"}
ONE_THREAD = ["--set", "encoder.threads=1"]  # fp32 convolutions round differently with other thread counts


def torchrun(nproc: int, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={nproc}",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1",
            "-m", "attncap.cli", "--", *argv]
    return subprocess.run(args, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300,
                          start_new_session=True)


@pytest.fixture(scope="module")
def without_features(prepared_run, tmp_path_factory) -> Path:
    """The prepared run with its feature store removed (read-only: copy it)."""
    run = tmp_path_factory.mktemp("stages") / "run"
    shutil.copytree(prepared_run, run)
    shutil.rmtree(run / "features")
    return run


@pytest.fixture(scope="module")
def one_process_store(without_features, tmp_path_factory) -> dict[str, str]:
    run = tmp_path_factory.mktemp("one") / "run"
    shutil.copytree(without_features, run)
    assert main(["features", "--run", str(run), "--quiet", *ONE_THREAD]) == 0
    return snapshot(run / "features")


def test_two_processes_write_the_store_one_process_writes(without_features, one_process_store, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(without_features, run)
    done = torchrun(2, ["features", "--run", str(run), "--quiet", *ONE_THREAD])
    assert done.returncode == 0, done.stdout + done.stderr
    assert snapshot(run / "features") == one_process_store  # the .npy byte for byte, the manifests
    assert not leftovers(run)


def test_a_two_process_run_killed_on_rank_1_is_finished_by_one_process(without_features, one_process_store,
                                                                        tmp_path):
    """Rank 1 dies after writing some of its rows; a plain `attncap features` encodes only the
    batches no rank finished and commits the same store."""
    run = tmp_path / "run"
    shutil.copytree(without_features, run)
    killed = torchrun(2, ["features", "--run", str(run), "--quiet", *ONE_THREAD],
                      {FAULT_AT_ENV: "3", FAULT_RANK_ENV: "1"})
    assert killed.returncode != 0
    assert (run / "features" / "train.partial.rank1.json").is_file()  # its progress survived
    assert main(["features", "--run", str(run), "--quiet", *ONE_THREAD]) == 0
    assert snapshot(run / "features") == one_process_store
    assert not leftovers(run)


def test_two_process_evaluate_writes_the_results_one_process_writes(trained_run, tmp_path):
    """Ranks decode alternate batches; rank 0 scores and writes the same files, in the same order."""
    one, two = tmp_path / "one", tmp_path / "two"
    for run in (one, two):
        shutil.copytree(trained_run, run)
        shutil.rmtree(run / "eval", ignore_errors=True)
    argv = ["--beams", "1,2", "--quiet", "--samples", "1",  # one report card: the files compared are the same
            "--set", "decode.threads=1", "--set", "decode.eval_batch_size=4"]
    assert main(["evaluate", "--run", str(one), *argv]) == 0
    done = torchrun(2, ["evaluate", "--run", str(two), *argv])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("Split test") == 1  # the table, printed by rank 0 alone
    for name in ("results_test_beam1.json", "results_test_beam2.json", "captions_test.json", "scores.json"):
        assert (two / "eval" / name).read_bytes() == (one / "eval" / name).read_bytes(), name
