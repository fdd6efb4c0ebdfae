"""The command line end to end: demo on a tiny world, caption, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from attncap.cli import main
from conftest import TINY

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
           "attribute_recall", "attribute_precision", "grounding", "grounding_chance"]


def tiny_args():
    return [f"--set={section}.{k}={v}" for section, values in TINY.items() for k, v in values.items()]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--run", str(run), "--quiet", *tiny_args()]) == 0
    return run


def test_demo_writes_scores_results_and_report(demo_run, capsys):
    scores = json.loads((demo_run / "eval" / "scores.json").read_text())
    assert set(METRICS) <= scores.keys()
    assert all(0.0 <= scores[k] for k in METRICS) and scores["grounding_chance"] < 1
    results = json.loads((demo_run / "eval" / "results_test.json").read_text())
    assert len(results) == 12 and {"image_id", "caption"} == set(results[0])
    html = (demo_run / "eval" / "report" / "index.html").read_text()
    assert "BLEU-4" in html and ".gif" in html and "loss.png" in html
    assert list((demo_run / "eval" / "report").glob("*_attention.png"))
    config = json.loads((demo_run / "config.json").read_text())
    assert config["train"]["epochs"] == 2 and config["model"]["hidden_dim"] == 48


def test_evaluate_samples_sets_how_many_images_the_report_shows(demo_run, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("eval"))
    assert main(["evaluate", "--run", str(run), "--quiet", "--samples", "2"]) == 0
    html = (run / "eval" / "report" / "index.html").read_text()
    assert html.count('<div class="card">') == 2 and len(list((run / "eval" / "report").glob("*.gif"))) == 2
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores == json.loads((demo_run / "eval" / "scores.json").read_text())  # the report alone changes
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--quiet", "--samples", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--samples" in err[0] and "Traceback" not in err[0]


def test_stages_rerun_reuse_artifacts(demo_run):
    store = demo_run / "features" / "train.npy"
    before = store.stat().st_mtime_ns
    assert main(["features", "--run", str(demo_run), "--quiet"]) == 0
    assert store.stat().st_mtime_ns == before
    assert main(["features", "--run", str(demo_run), "--verify"]) == 0


def test_caption_prints_captions_and_plots(demo_run, tmp_path, capsys):
    image = demo_run / "dataset" / "images" / "shapes_000001.jpg"
    rgba = tmp_path / "rgba.png"
    Image.open(image).convert("RGBA").save(rgba)
    gray16 = tmp_path / "gray16.png"
    Image.open(image).convert("L").point(lambda v: v * 256, "I").convert("I;16").save(gray16)
    code = main(["caption", "--run", str(demo_run), str(image), str(rgba), str(gray16), "--plot",
                 "--n-best", "2", "--plot-dir", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count(f"{image}:") == 1 and out.count(f"{rgba}:") == 1 and out.count(f"{gray16}:") == 1
    assert (tmp_path / "plots" / "shapes_000001.gif").is_file()
    assert (tmp_path / "plots" / "rgba_attention.png").is_file()


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    return subprocess.run([sys.executable, "-m", "attncap.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_bad_images_get_one_line_and_exit_2(demo_run, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    good = demo_run / "dataset" / "images" / "shapes_000002.jpg"
    trunc = tmp_path / "cut.jpg"
    trunc.write_bytes(good.read_bytes()[:500])
    result = run_cli("caption", "--run", str(demo_run), str(tmp_path / "missing.png"), str(text),
                     str(trunc), str(good))
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in result.stderr
    assert "missing.png" in errors[0] and "not found" in errors[0]
    assert "notes.jpg" in errors[1] and "cut.jpg" in errors[2]
    assert result.stdout.startswith(f"{good}:")  # the good image is still captioned


def test_missing_or_corrupt_run_is_a_clear_error(tmp_path, demo_run):
    result = run_cli("caption", "--run", str(tmp_path / "nowhere"), "x.jpg")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "nowhere" in result.stderr and "train first" in result.stderr
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(demo_run / "checkpoints", broken / "checkpoints")
    (broken / "checkpoints" / "best" / "config.json").write_text("{truncated")
    result = run_cli("caption", "--run", str(broken), "x.jpg")
    assert result.returncode == 2 and "config.json" in result.stderr and "Traceback" not in result.stderr
