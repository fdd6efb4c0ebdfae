"""``benchmarks/gpu_suite.sh --cpu``: every step of the GPU suite runs here and reports sane figures.

The CUDA run is the same script with only the device-dependent sizes and settings changed
(docs/performance.md, "GPU suite"), so this run covers nearly all of it.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = ["env", "prepare", "features", "train", "train_ddp", "evaluate", "serve", "peak",
         "train_throughput", "decode_throughput", "feature_throughput", "load_test", "suite"]


def run_suite(out: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUITE), "--cpu", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHON": python})


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = run_suite(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(text) for text in proc.stdout.splitlines()]  # every line is JSON
    return {line["step"]: line for line in lines}, [line["step"] for line in lines], proc.stderr, out


def test_every_step_prints_one_json_line_in_order(suite):
    lines, order, _, out = suite
    assert order == STEPS
    summary = lines["suite"]
    assert summary["device"] == "cpu" and summary["steps"] == len(STEPS) - 1
    assert list(summary["step_seconds"]) == STEPS[:-1] and all(s > 0 for s in summary["step_seconds"].values())
    assert summary["seconds"] >= sum(summary["step_seconds"].values()) - 1
    for step in STEPS[1:-1]:
        assert (out / "logs" / f"{step}.log").is_file(), step  # each step's output kept in the folder
    assert (out / "run" / "checkpoints" / "best").is_dir() and (out / "run_ddp" / "checkpoints").is_dir()


def test_the_pipeline_ran_on_cpu_with_bf16_training_torchrun_and_beam_scores(suite):
    lines = suite[0]
    assert lines["env"]["device"] == "cpu" and lines["env"]["scores"] is True
    for step in ("prepare", "features", "train", "train_ddp", "evaluate"):
        assert lines[step]["wall_s"] > 0 and lines[step]["peak_rss_mb"] > 50, lines[step]
        assert "peak_gpu_mb" not in lines[step]  # no CUDA was touched
    assert lines["features"]["items_per_s"] > 0
    train, ddp = lines["train"], lines["train_ddp"]
    assert (train["precision"], train["train_device"], train["processes"], train["epochs"]) == ("bf16", "cpu", 1, 2)
    assert train["steps"] == 6 and train["steps_per_s"] > 0 and 0 <= train["best_val_cider"] <= 10
    assert (ddp["precision"], ddp["train_device"], ddp["processes"], ddp["epochs"]) == ("fp32", "cpu", 1, 1)
    assert ddp["backend"] in ("gloo", "no process group")  # attncap joins no group for one process
    scores = lines["evaluate"]
    assert 0 <= scores["BLEU-4"] <= 1 and 0 <= scores["CIDEr"] <= 10 and 0 <= scores["METEOR"] <= 1


def test_the_server_answered_one_image_and_was_stopped(suite):
    serve, stderr = suite[0]["serve"], suite[2]
    assert serve["status"] == 200 and serve["server_device"] == "cpu" and serve["caption"].strip()
    assert 0 < serve["startup_s"] < 120 and serve["first_request_ms"] > 0 and serve["request_ms"] > 0
    pid = int(re.search(r"server pid (\d+)", stderr).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_every_benchmark_reports_its_figures(suite):
    lines = suite[0]
    peak = lines["peak"]["fp32_gflops_per_s"]
    assert peak > 0
    assert lines["train_throughput"]["captions_per_s"] > 0 and lines["train_throughput"]["useful_gflops_per_s"] > 0
    decode = lines["decode_throughput"]
    assert decode["peak_fp32_gflops_per_s"] == peak  # the shares are of the suite's own peak figure
    # each share is its GFLOP/s over that peak (not bounded by 1: the suite's peak step ran at another
    # moment, and on a shared 2-core machine the load between the two moments differs)
    for way in ("batched", "one_by_one"):
        share = decode[f"{way}_useful_gflops_per_s"] / peak
        rounding = 5e-4 + 0.05 * (1 + share) / peak  # figures printed to 0.1, the share to 0.001
        assert decode[f"{way}_share_of_peak"] == pytest.approx(share, abs=rounding) and share > 0
    assert decode["batched_captions_per_s"] > 0 and decode["batched_useful_gflops_per_s"] > 0
    assert 0 < decode["useful_rows_per_caption"] <= 3 * 5 - 2  # K * max_len less the first step's copies
    assert lines["feature_throughput"]["images"] == 16 and lines["feature_throughput"]["images_per_s"] > 0
    load = lines["load_test"]
    assert load["ok"] == load["requests"] > 0 and load["errors"] == 0 and load["lost"] == 0


def test_a_failing_step_stops_the_suite_loudly_and_by_name(tmp_path):
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\ncase "$*" in *" features cli "*) echo "boom" >&2; exit 3 ;; esac\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    proc = run_suite(tmp_path / "out", str(python))
    assert proc.returncode == 1
    assert "step 'features' failed: exit status 3" in proc.stderr and "boom" in proc.stderr
    assert [json.loads(text)["step"] for text in proc.stdout.splitlines()] == ["env", "prepare"]
    assert f"everything is in {tmp_path / 'out'}" in proc.stderr
