"""`attncap caption DIR --out results.json`: batched captions in COCO results format, GIFs, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from attncap.cli import main
from attncap.errors import AttncapError
from attncap.images import load_image
from attncap.predict import Predictor, coco_image_ids, find_images


@pytest.fixture()
def folder(trained_run, tmp_path) -> Path:
    """Five shapes-world pictures, one of them in a subfolder, and a text file named like a JPEG."""
    src = sorted((trained_run / "dataset" / "images").glob("*.jpg"))[:5]
    dst = tmp_path / "pictures"
    (dst / "more").mkdir(parents=True)
    for i, path in enumerate(src):
        shutil.copy(path, dst / ("more" if i == 4 else "") / path.name)
    (dst / "notes.jpg").write_text("not a picture\n")
    (dst / "readme.txt").write_text("ignored: not an image extension\n")
    return dst


def test_folder_is_captioned_in_batches_into_coco_results_and_gifs(trained_run, folder, tmp_path, capsys):
    out, plots = tmp_path / "results.json", tmp_path / "plots"
    code = main(["caption", str(folder), "--run", str(trained_run), "--out", str(out),
                 "--plot-dir", str(plots), "--batch-size", "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 2  # one unreadable file; the others are still captioned
    assert "notes.jpg" in captured.err and "not an image" in captured.err
    results = json.loads(out.read_text())
    images = sorted(folder.rglob("shapes_*.jpg"))
    assert len(results) == 5 and {"image_id", "caption", "file_name"} <= set(results[0])
    by_file = {Path(r["file_name"]).name: r for r in results}
    assert {by_file[p.name]["image_id"] for p in images} == {int(p.stem.split("_")[1]) for p in images}
    single = Predictor.from_run(trained_run)
    for path in images:  # batches of 2 give the captions of one image at a time
        assert by_file[path.name]["caption"] == single.caption([load_image(path)])[0][0].caption
        assert f"{path}: {by_file[path.name]['caption']}" in captured.out
    for path in images:
        words = by_file[path.name]["caption"].split()
        with Image.open(plots / f"{path.stem}.gif") as gif:
            assert gif.n_frames == len(words)
        assert (plots / f"{path.stem}_attention.png").is_file()


def test_results_path_that_is_a_folder_is_refused(trained_run, folder, tmp_path, capsys):
    assert main(["caption", str(folder), "--run", str(trained_run), "--out", str(tmp_path)]) == 2
    assert "--plot-dir" in capsys.readouterr().err


def test_image_ids_come_from_file_names_when_they_are_unique_numbers():
    assert coco_image_ids([Path("COCO_val2014_000000391895.jpg"), Path("b/x_42.png")]) == [391895, 42]
    assert coco_image_ids([Path("cat.jpg"), Path("dog.jpg")]) == [1, 2]  # no numbers: positions
    # mixed or repeated numbers are errors (tests/test_predict_inputs.py)


def test_find_images_expands_folders_and_keeps_named_files(folder, tmp_path):
    found = find_images([folder, tmp_path / "given.dat"])
    assert found[:-1] == sorted(p for p in folder.rglob("*.jpg"))  # readme.txt left out
    assert folder / "notes.jpg" in found and len(found) == 7
    assert found[-1] == tmp_path / "given.dat"  # named explicitly: its content will decide
    (tmp_path / "empty").mkdir()
    with pytest.raises(AttncapError, match="no image files"):
        find_images([tmp_path / "empty"])
