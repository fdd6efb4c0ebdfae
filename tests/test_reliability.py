"""The defects of issue 10 that are about files and resuming, each as a test that failed before its fix.

The kill-at-every-write suites are tests/test_fault_injection.py and tests/test_data_faults.py;
config values are swept in tests/test_config_sweep.py; serving bounds are tests/test_serve_bounds.py.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from attncap import files
from attncap.checkpoint import load_model, load_state
from attncap.cli import main
from attncap.errors import AttncapError
from attncap.export import MARKER, export_model
from attncap.features import FeatureStore, pinned_precision
from attncap.files import atomic_folder, atomic_path, read_jsonl, recover_folder
from attncap.prepare import split_ids
from attncap.train import MetricsLog, train
from attncap.vocab import Vocab
from conftest import tiny_config


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# 1. export never deletes what it did not write -----------------------------------------------------

def test_export_refuses_a_users_folder_and_the_run_itself_but_replaces_its_own_export(trained_run, tmp_path,
                                                                                    capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "thesis.tex").write_text("months of work")
    before = _tree(models)
    assert main(["export", str(trained_run), "--format", "folder", "--out", str(models)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an attncap export" in err and str(models) in err
    assert _tree(models) == before
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    run_before = _tree(run)
    assert main(["export", str(run), "--format", "folder", "--out", str(run)]) == 2
    assert _tree(run) == run_before
    out = models / "shapes"
    export_model(run, out, "folder")
    assert json.loads((out / MARKER).read_text())["format"] == "folder"
    (out / "README.md").write_text("an older card")
    export_model(run, out, "folder")  # its own earlier export: replaced
    assert (out / "README.md").read_text().startswith("# attncap captioning model")
    assert (models / "thesis.tex").read_text() == "months of work"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(AttncapError, match="is a file"):
        export_model(run, tmp_path / "afile", "folder")


# 3. the checkpoint swap: durable, never a moment without `latest` ----------------------------------

def test_folder_swap_fsyncs_before_renaming_and_keeps_the_path_present(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    with atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    events = []

    def record(name, real):
        def wrapped(*args):
            events.append(name)
            return real(*args)
        return wrapped
    monkeypatch.setattr(os, "fsync", record("fsync", os.fsync))
    monkeypatch.setattr(os, "replace", record("swap", os.replace))
    monkeypatch.setattr(files, "_exchange", record("swap", files._exchange))
    seen = []
    monkeypatch.setattr(files, "fault_point", lambda label: seen.append((target / "a.bin").read_bytes()))
    with atomic_folder(target) as tmp:
        (tmp / "a.bin").write_bytes(b"new")
    assert (target / "a.bin").read_bytes() == b"new"
    first_swap = events.index("swap")
    assert events[:first_swap].count("fsync") >= 2  # the file and its folder, before the swap
    assert "fsync" in events[first_swap:]            # and the parent folder after it
    assert seen and set(seen) <= {b"old", b"new"}     # `latest` readable at every fault point
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_fallback_swap_killed_between_its_renames_is_recovered_by_the_next_reader(trained_run, tmp_path,
                                                                                  monkeypatch):
    """Where the file system cannot exchange two folders, a kill between the two renames used to
    leave no `latest`: the next `train` started from scratch without a word."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    latest = run / "checkpoints" / "latest"
    step = json.loads(load_state(latest)["train_state"])["step"]
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)

    def die(label):
        if label.startswith("aside"):
            raise KeyboardInterrupt("killed")  # stands in for SIGKILL between the renames
    monkeypatch.setattr(files, "fault_point", die)
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(latest) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
    assert not latest.exists()  # the moment the old code had no way back from
    monkeypatch.setattr(files, "fault_point", lambda label: None)
    load_model(latest)  # recovered
    assert json.loads(load_state(latest)["train_state"])["step"] == step
    state = train(run, tiny_config(train={"epochs": 3}), progress=False)
    assert state.epoch == 3 and state.step > step  # resumed, not restarted
    assert not any(p.name.startswith(".latest") for p in latest.parent.iterdir())


# 4. a torn last line of metrics.jsonl ---------------------------------------------------------------

def test_a_torn_metrics_line_neither_stops_resume_nor_the_report(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    log = run / "train" / "metrics.jsonl"
    whole = log.read_text()
    with open(log, "a") as f:
        f.write('{"step": 99, "train_lo')  # a kill in the middle of an append
    assert read_jsonl(log) == [json.loads(line) for line in whole.splitlines()]
    state = train(run, tiny_config(train={"epochs": 3}), progress=False)
    assert state.epoch == 3
    records = read_jsonl(log)
    assert [r["epoch"] for r in records if "epoch" in r] == [1, 2, 3]
    assert log.read_text().endswith("}\n")
    assert main(["evaluate", "--run", str(run), "--quiet", "--samples", "0"]) == 0
    assert (run / "eval" / "report" / "loss.png").is_file()


def test_appending_after_a_torn_line_cuts_it_and_a_bad_middle_line_is_named(tmp_path):
    log = tmp_path / "m.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "tr')
    files.append_line(log, json.dumps({"step": 3}))
    assert log.read_text() == '{"step": 1}\n{"step": 3}\n'
    log.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(AttncapError, match="line 2"):
        read_jsonl(log)
    MetricsLog(tmp_path / "fresh", 0).close()  # a missing log is an empty one


# 6. the feature store: precision=auto on another node -------------------------------------------

def test_a_partial_store_made_with_auto_is_continued_where_auto_chooses_otherwise(prepared_run, tmp_path,
                                                                                monkeypatch):
    from attncap import encoders, features, pipeline

    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    shutil.rmtree(run / "features")
    cfg = tiny_config(encoder={"precision": "auto", "batch_size": 4})
    monkeypatch.setattr(encoders, "resolve_precision", lambda p, d="cpu": "bf16" if p in ("auto", "bf16") else p)
    batches = []

    def stop_at_the_second_batch(label):
        batches.append(label)
        if len(batches) == 2:  # the first batch's rows and progress are saved by then
            raise KeyboardInterrupt("killed")
    monkeypatch.setattr(features, "fault_point", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        pipeline.features_stage(run, cfg, progress=False)
    partial = json.loads((run / "features" / "train.partial.json").read_text())
    assert partial["precision"] == "bf16" and partial["batches"] == [0]
    # requeued on a node whose CPU has no bf16: auto would now choose fp32
    monkeypatch.setattr(encoders, "resolve_precision", lambda p, d="cpu": "fp32" if p in ("auto", "fp32") else p)
    monkeypatch.setattr(features, "fault_point", lambda label: None)
    assert pinned_precision(run / "features", "auto") == "bf16"
    real_fill, todo = features._fill, []

    def fill(encoder, items, features_dir, split, key, batch_size, batches, *args):
        todo.append(list(batches))
        real_fill(encoder, items, features_dir, split, key, batch_size, batches, *args)
    monkeypatch.setattr(features, "_fill", fill)
    pipeline.features_stage(run, cfg, progress=False)
    assert todo[0][0] == 1  # continued after the saved batch, not thrown away
    store = FeatureStore.open(run / "features", "train")
    assert store.manifest["precision"] == "bf16" and store.manifest["requested_precision"] == "auto"


def test_a_store_whose_data_was_renamed_but_manifest_not_written_is_finished(prepared_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    features = run / "features"
    manifest = json.loads((features / "val.json").read_text())
    (features / "val.json").unlink()  # the kill came after the rename, before the manifest
    key = {k: manifest[k] for k in ("format", "encoder", "requested_precision", "image_ids", "files")}
    from attncap.features import _digest
    batch = tiny_config().encoder.batch_size
    batches = list(range(-(-len(key["image_ids"]) // batch)))
    (features / "val.partial.json").write_text(json.dumps({"key": _digest(key), "batch_size": batch,
                                                           "batches": batches, "failed": []}))
    data = (features / "val.npy").read_bytes()
    assert main(["features", "--run", str(run), "--quiet"]) == 0
    assert (features / "val.npy").read_bytes() == data  # committed, not recomputed
    assert json.loads((features / "val.json").read_text())["image_ids"] == manifest["image_ids"]
    assert not (features / "val.partial.json").exists()


# 7. prepare's outputs are replaced together -------------------------------------------------------

def test_prepare_that_fails_half_way_leaves_the_previous_data_whole(prepared_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run)
    before = _tree(run / "data")

    def broken(self, path):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Vocab, "save", broken)  # after the split files, before vocab and manifest
    with pytest.raises(OSError):
        main(["prepare", "--run", str(run), "--set", "data.top_k=20", "--quiet"])
    assert _tree(run / "data") == before
    assert not [p for p in run.iterdir() if p.name.startswith(".data")]


# 8. resuming with settings it cannot honour -----------------------------------------------------

@pytest.mark.parametrize("setting", ["train.lr=0.01", "train.weight_decay=0.1", "train.batch_size=8",
                                     "train.captions_per_image=2", "train.seed=3"])
def test_resume_with_a_setting_it_would_ignore_is_refused_until_no_resume(trained_run, tmp_path, capsys, setting):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config, latest = (run / "config.json").read_bytes(), _tree(run / "checkpoints" / "latest")
    argv = ["train", "--run", str(run), "--epochs", "3", "--set", setting, "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    key, value = setting.split("=")
    assert err.count("\n") == 1 and key in err and "--no-resume" in err
    assert (run / "config.json").read_bytes() == config  # the refused setting was not saved either
    assert _tree(run / "checkpoints" / "latest") == latest
    if key == "train.lr":
        assert main([*argv, "--no-resume"]) == 0
        assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.01


def test_resume_with_more_epochs_says_the_run_is_no_longer_exact(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train", "--run", str(run), "--epochs", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "note: resuming with train.epochs 2 -> 3" in out


# 9. patience 0, split files, missing ids -------------------------------------------------------

def test_patience_zero_means_no_early_stopping(run_copy):
    state = train(run_copy, tiny_config(train={"epochs": 2, "patience": 0}), progress=False)
    assert state.epoch == 2 and not state.stopped


def test_split_files_whose_splits_share_an_image_are_refused(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [1, 2, 3], "val": [3], "test": [4]}))
    with pytest.raises(AttncapError, match=r"1 image\(s\) are in both 'train' and 'val' \(e.g. 3\)"):
        split_ids([1, 2, 3, 4], str(path), 0, 1, 1)


def test_split_file_ids_missing_from_the_data_are_listed(tmp_path):
    from attncap.prepare import Skipped

    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [1, 2, 77], "val": [3], "test": [4, 88]}))
    skipped = Skipped()
    out = split_ids([1, 2, 3, 4], str(path), 0, 1, 1, skipped)
    assert out == {"train": [1, 2], "val": [3], "test": [4]}
    assert [(i["image_id"], i["split"]) for i in skipped.items] == [(77, "train"), (88, "test")]


# 10. a mistyped --run creates nothing ---------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "features", "evaluate"])
def test_a_mistyped_run_directory_is_an_error_that_creates_nothing(tmp_path, capsys, command):
    typo = tmp_path / "rnus" / "demo"
    assert main([command, "--run", str(typo), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and str(typo) in err
    assert not (tmp_path / "rnus").exists()


def test_atomic_path_leaves_no_temporary_file_of_a_dead_writer(tmp_path):
    target = tmp_path / "x.json"
    stale = tmp_path / f".x.json{files.TMP_TAG}{os.uname().nodename}-999999999-abc.tmp"
    stale.write_text("half")
    live = tmp_path / f".x.json{files.TMP_TAG}{os.uname().nodename}-{os.getpid()}-def.tmp"
    live.write_text("being written by a live process")
    with atomic_path(target) as tmp:
        tmp.write_text("{}")
    assert not stale.exists() and live.exists() and target.read_text() == "{}"
    assert recover_folder(tmp_path / "missing") == tmp_path / "missing"


def test_the_shapes_world_sweeps_dead_temporaries_once_and_syncs_before_its_manifest(tmp_path, monkeypatch):
    """Thousands of images are not each fsynced beside a look at their folder (6 of 20 ms an image
    with 9,000 in it): the world sweeps dead writers' temporaries once, writes its images by
    rename, makes them durable with one sync, and only then writes the manifest that commits them."""
    from attncap.data import shapes

    images = tmp_path / "world" / "images"
    images.mkdir(parents=True)
    stale = images / f".shapes_000001.jpg{files.TMP_TAG}{os.uname().nodename}-999999999-abc.tmp"
    stale.write_text("half")
    live = images / f".other.jpg{files.TMP_TAG}{os.uname().nodename}-{os.getpid()}-def.tmp"
    live.write_text("being written by a live process")
    events = []
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync"))
    monkeypatch.setattr(os, "sync", lambda: events.append("sync"))
    real_write = shapes.write_json
    monkeypatch.setattr(shapes, "write_json", lambda path, *a, **k: (events.append(Path(path).name),
                                                                     real_write(path, *a, **k)))
    world = shapes.generate_shapes_world(tmp_path / "world", 6, 2, 2, image_size=64, workers=1, progress=False)
    assert not stale.exists() and live.exists()
    assert len(list(world.images_dir.glob("*.jpg"))) == 10
    assert events.index("sync") < events.index("manifest.json")
    assert events.count("fsync") < 10                  # not one (or two) per image
