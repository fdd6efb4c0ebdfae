"""What `Predictor.caption` accepts, and the COCO image ids `attncap caption --out` writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attncap.cli import main
from attncap.errors import AttncapError
from attncap.images import load_image
from attncap.predict import Predictor, coco_image_ids


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor.from_run(trained_run)


@pytest.fixture(scope="module")
def paths(trained_run) -> list[Path]:
    return sorted((trained_run / "dataset" / "images").glob("*.jpg"))[:2]


def _captions(result) -> list[str]:
    return [preds[0].caption for preds in result]


def test_one_image_a_path_or_a_mixed_list_all_caption_like_a_list_of_images(predictor, paths):
    images = [load_image(p) for p in paths]
    expected = _captions(predictor.caption(images))
    assert _captions(predictor.caption(images[0])) == expected[:1]  # one image: a one-element list
    assert _captions(predictor.caption(paths[0])) == expected[:1]
    assert _captions(predictor.caption(str(paths[1]))) == expected[1:]
    assert _captions(predictor.caption((paths[0], images[1]))) == expected
    assert _captions(predictor.caption([images[0].convert("L")])) == _captions(
        predictor.caption([images[0].convert("L").convert("RGB")]))
    pixels = torch.stack([predictor.pixels(im) for im in images])  # (2, 3, S, S) uint8
    assert _captions(predictor.caption_pixels(pixels)) == expected


BAD_INPUTS = {
    "empty list": ([], "got an empty list; pass a PIL image, a path, or a list of them"),
    "numpy array": (np.zeros((8, 8, 3), np.uint8), "got numpy.ndarray (convert it with PIL.Image.fromarray)"),
    "a number in the list": (["x.jpg", 3], "item 1 has type int; each item must be a PIL image or a path"),
    "a dict": ({"image": "x.jpg"}, "takes a PIL image, a path, or a list of them; got dict"),
    "a missing file": ("nowhere/missing.jpg", "cannot read image nowhere/missing.jpg: file not found"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_saying_what_was_given_and_what_is_accepted(predictor, case):
    given, message = BAD_INPUTS[case]
    with pytest.raises(AttncapError) as err:
        predictor.caption(given)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_caption_pixels_refuses_what_pixels_did_not_make(predictor):
    s = predictor.image_size
    with pytest.raises(AttncapError, match=rf"uint8 \(B, 3, {s}, {s}\).*float32 \(1, 3, {s}, {s}\)"):
        predictor.caption_pixels(torch.zeros(1, 3, s, s))


def test_image_ids_are_the_numbers_in_names_or_positions_when_no_name_has_one():
    assert coco_image_ids([Path("COCO_val2014_000000391895.jpg"), Path("b/x_42.png")]) == [391895, 42]
    assert coco_image_ids([Path("cat.jpg"), Path("dog.png")]) == [1, 2]
    assert coco_image_ids([]) == []


def test_mixed_or_repeated_numbers_name_the_files_instead_of_writing_wrong_ids():
    with pytest.raises(AttncapError, match=r"cat\.jpg has no number in its name \(1 of 3 files "
                                           r"have none\) while dog_7\.jpg has one; rename"):
        coco_image_ids([Path("dog_7.jpg"), Path("cat.jpg"), Path("cow_8.jpg")])
    with pytest.raises(AttncapError, match=r"a/img_1\.jpg and b/img_001\.jpg both have the number 1; "
                                           "rename one"):
        coco_image_ids([Path("a/img_1.jpg"), Path("c/img_2.jpg"), Path("b/img_001.jpg")])


def test_caption_out_notes_position_ids_and_refuses_mixed_names(trained_run, paths, tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    for name, path in zip(("cat.jpg", "dog.jpg"), paths):
        shutil.copy(path, plain / name)
    out = tmp_path / "results.json"
    assert main(["caption", str(plain), "--run", str(trained_run), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("note: no file name holds a number, so each image_id is the file's position") == 1
    assert [r["image_id"] for r in json.loads(out.read_text())] == [1, 2]

    shutil.copy(paths[0], plain / "cow_5.jpg")
    mixed = tmp_path / "mixed.json"
    assert main(["caption", str(plain), "--run", str(trained_run), "--out", str(mixed), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cat.jpg has no number in its name" in err and "rename the files" in err
    assert not mixed.exists()


def test_unk_is_never_written_unless_allowed_and_trigrams_can_be_blocked(trained_run, paths, monkeypatch):
    biased = Predictor.from_run(trained_run)
    assert biased.cfg.decode.allow_unk is False and biased.cfg.decode.block_trigrams is False
    unk = biased.vocab.unk
    with torch.no_grad():
        biased.model.fc2.bias[unk] += 50.0  # <unk> is by far the likeliest word at every step
    images = [load_image(p) for p in paths]
    for beam in (1, 3):
        default = biased.caption(images, beam_size=beam)
        assert all("<unk>" not in p.words and p.words for preds in default for p in preds)
        allowed = biased.caption(images, beam_size=beam, allow_unk=True)
        assert all("<unk>" in preds[0].words for preds in allowed)
        blocked = biased.caption(images, beam_size=beam, allow_unk=True, block_trigrams=True)
        for preds in blocked:
            grams = list(zip(preds[0].words, preds[0].words[1:], preds[0].words[2:]))
            assert len(grams) == len(set(grams)), preds[0].words

    seen, original = [], Predictor.caption

    def recorded(self, images, *args):
        seen.append(args[-2:])
        return original(self, images, *args)
    monkeypatch.setattr(Predictor, "caption", recorded)
    argv = ["caption", str(paths[0]), "--run", str(trained_run), "--quiet"]
    assert main(argv + ["--allow-unk", "--block-trigrams"]) == 0 and main(argv + ["--no-allow-unk"]) == 0
    assert main(argv) == 0
    assert seen == [(True, True), (False, None), (None, None)]  # the CLI flags reach the predictor
