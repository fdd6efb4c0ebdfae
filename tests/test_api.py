"""The Python API: `attncap.load(...)` on a run and an export, called on every kind of input."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

import attncap
from attncap.api import Caption, ImageCaptioner
from attncap.errors import AttncapError
from attncap.export import export_folder
from attncap.images import load_image
from attncap.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cap(trained_run) -> ImageCaptioner:
    return attncap.load(trained_run, device="cpu")


@pytest.fixture(scope="module")
def paths(trained_run) -> list[Path]:
    return sorted((trained_run / "dataset" / "images").glob("*.jpg"))[:5]


@pytest.fixture(scope="module")
def expected(cap, paths) -> list[str]:
    """The engine's own best captions of the five images (Predictor.caption, one batch)."""
    return [p[0].caption for p in Predictor.caption(cap, [load_image(p) for p in paths])]


def texts(results) -> list[str]:
    return [r.text for r in results]


def test_load_gives_a_typed_captioner_that_is_still_a_predictor(cap, trained_run):
    assert isinstance(cap, ImageCaptioner) and isinstance(cap, Predictor)
    assert attncap.ImageCaptioner is ImageCaptioner and attncap.Caption is Caption
    assert cap.batch_size == 16 and cap.device.type == "cpu"
    assert attncap.load(trained_run / "checkpoints" / "latest", batch_size=3).batch_size == 3
    assert (importlib.resources.files("attncap") / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in data["attncap"]


def test_every_single_input_kind_gives_the_same_caption(cap, paths, expected):
    image = load_image(paths[0])
    array = np.array(image)                                     # (H, W, 3) uint8
    tensor = torch.from_numpy(array).permute(2, 0, 1)           # (3, H, W) uint8
    kinds = {"path": paths[0], "str": str(paths[0]), "PIL": image, "numpy uint8": array,
             "numpy float": array / 255.0, "numpy int64": array.astype(np.int64),
             "tensor uint8": tensor, "tensor float": tensor.float() / 255,
             "tensor bfloat16 exact": torch.zeros(3, 40, 40, dtype=torch.bfloat16)}
    for name, given in kinds.items():
        result = cap(given)
        assert isinstance(result, Caption), name
        if name.endswith("exact"):
            assert result.text == cap(Image.new("RGB", (40, 40))).text
            continue
        assert result.text == expected[0], name
        assert result.image.size == image.size and result.image.mode == "RGB"
    best = cap(image)
    assert best.words == best.text.split() and best.attention.shape[0] == len(best.words)
    assert best.attention.ndim == 3 and best.attention.shape[1] == best.attention.shape[2]
    np.testing.assert_allclose(best.attention.sum(axis=(1, 2)), 1.0, atol=1e-4)
    assert best.score < 0 and str(best) == best.text


def test_grey_and_transparent_arrays_caption_like_their_pil_images(cap, paths):
    image = load_image(paths[1])
    grey = image.convert("L")
    expected_grey = cap(grey.convert("RGB")).text
    g = np.array(grey)                                                        # (H, W)
    assert cap(g).text == cap(g[:, :, None]).text == expected_grey
    assert cap(torch.from_numpy(g)[None]).text == cap(torch.from_numpy(g)).text == expected_grey
    rgba = np.dstack([np.asarray(image), np.full(g.shape, 255, np.uint8)])    # (H, W, 4) opaque
    assert cap(rgba).text == cap(image).text
    clear = rgba.copy()
    clear[:, :, 3] = 0                                                        # transparent: white
    assert cap(clear).text == cap(Image.new("RGB", image.size, "white")).text
    assert cap(torch.from_numpy(clear).permute(2, 0, 1)).text == cap(clear).text


def test_lists_and_batches_give_one_result_per_image_in_order(cap, paths, expected):
    images = [load_image(p) for p in paths]
    arrays = [np.array(im) for im in images]
    mixed = [paths[0], images[1], arrays[2], torch.from_numpy(arrays[3]).permute(2, 0, 1), str(paths[4])]
    assert texts(cap(mixed)) == expected
    assert texts(cap(tuple(paths))) == expected
    one = cap([paths[0]])
    assert isinstance(one, list) and len(one) == 1 and one[0].text == expected[0]
    same_size = [a for a in arrays if a.shape == arrays[0].shape]
    batch = torch.from_numpy(np.stack(same_size)).permute(0, 3, 1, 2)      # (B, 3, H, W)
    assert texts(cap(batch)) == expected[:len(same_size)]
    assert texts(cap(np.stack(same_size))) == expected[:len(same_size)]   # (B, H, W, 3)
    assert texts(cap([batch, paths[0]])) == expected[:len(same_size)] + expected[:1]


def test_batches_of_batch_size_give_the_captions_of_one_by_one(cap, paths, monkeypatch):
    alone = [cap(p) for p in paths]
    sizes = []
    engine = cap.caption
    monkeypatch.setattr(cap, "caption", lambda images, *a: sizes.append(len(images)) or engine(images, *a))
    batched = cap(paths, batch_size=2)
    assert sizes == [2, 2, 1]
    assert texts(batched) == texts(alone)
    np.testing.assert_allclose([c.score for c in batched], [c.score for c in alone], atol=1e-5)
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b.attention, a.attention, atol=1e-5)
    sizes.clear()
    cap(paths)                                            # the captioner's own batch_size (16)
    assert sizes == [5]


def test_n_best_gives_a_list_of_captions_best_first(cap, paths):
    best = cap(paths[0], beam=3, n_best=3)
    engine = Predictor.caption(cap, paths[0], beam_size=3, n_best=3)[0]
    assert [c.text for c in best] == [p.caption for p in engine]
    assert [c.score for c in best] == [p.score for p in engine]
    assert all(isinstance(c, Caption) for c in best) and len(best) == 3
    assert cap(paths[0], beam=3).text == best[0].text
    many = cap(paths[:2], beam=2, n_best=2)
    assert [len(r) for r in many] == [2, 2] and many[0][0].text == cap(paths[0], beam=2).text
    short = cap(paths[0], max_len=2)
    assert 1 <= len(short.words) <= 2


def test_plot_and_gif_draw_every_word(cap, paths, tmp_path):
    best = cap(paths[0])
    fig = best.plot()
    assert isinstance(fig, Figure) and len(fig.axes) >= len(best.words) + 1
    assert [ax.get_title() for ax in fig.axes[1:len(best.words) + 1]] == best.words
    png = tmp_path / "attention.png"
    assert isinstance(best.plot(png), Figure)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100
    gif = best.gif(tmp_path / "attention.gif")
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == len(best.words)
    empty = Caption("", [], -1.0, np.zeros((0, 7, 7)), best.image)
    with pytest.raises(AttncapError, match="Caption.plot: the caption is empty"):
        empty.plot()


def test_an_exported_folder_loads_and_captions_the_same(trained_run, tmp_path, paths, expected):
    folder = export_folder(trained_run, tmp_path / "folder")
    loaded = attncap.load(folder, device="cpu")
    assert isinstance(loaded, ImageCaptioner)
    assert texts(loaded(paths)) == expected
    assert "captioner(\"picture.jpg\"" in (folder / "README.md").read_text()


BAD = {
    "float over 1": (np.full((8, 8, 3), 200.0), "the input is floating point with values 200..200; "
                     "floats must be in [0, 1] (divide 0-255 data by 255"),
    "NaN": (np.full((8, 8), np.nan, np.float32), "holds NaN or infinite values"),
    "16-bit": (np.full((8, 8), 4000, np.uint16),
               "has uint16 values 4000..4000; integer pixels must be 0-255"),
    "bool": (np.zeros((8, 8), bool), "has dtype bool; pass uint8 (0-255) or floating point in [0, 1]"),
    "channels first array": (np.zeros((3, 8, 8), np.uint8), "shape (3, 8, 8); arrays are (H, W), "
                             "(H, W, 3), (H, W, 4), (H, W, 1) or a batch (B, H, W, C); for channels-first"),
    "1-D array": (np.zeros(8, np.uint8), "an array of shape (8,)"),
    "5-D array": (np.zeros((1, 1, 8, 8, 3), np.uint8), "an array of shape (1, 1, 8, 8, 3)"),
    "no pixels": (np.zeros((0, 8, 3), np.uint8), "has shape (0, 8, 3): no pixels"),
    "channels last tensor": (torch.zeros(8, 8, 3), "tensors are (C, H, W) with C 1, 3 or 4 (torchvision's "
                             "order), (H, W) or a batch (B, C, H, W); it looks channels-last: use "
                             "tensor.permute(2, 0, 1)"),
    "complex tensor": (torch.zeros(3, 8, 8, dtype=torch.complex64), "has dtype complex64"),
    "empty list": ([], "ImageCaptioner got an empty list; pass a path, a PIL image"),
    "empty batch": (torch.zeros(0, 3, 8, 8), "has shape (0, 8, 8, 3): no pixels"),
    "a number": (3, "the input has type int; pass a path, a PIL image, a numpy array"),
    "a dict in a list": (["x.jpg", {"image": "x.jpg"}], "item 1 has type dict"),
    "a bad item after a good one": ([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3))  + 2],
                                    "item 1 is floating point"),
    "a missing file": ("nowhere/missing.jpg", "cannot read image nowhere/missing.jpg: file not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_saying_what_was_given_and_what_to_do(cap, case):
    given, message = BAD[case]
    with pytest.raises(AttncapError) as err:
        cap(given)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_options_are_one_line(cap, paths):
    for kwargs, message in [({"batch_size": 0}, "batch_size must be a whole number of at least 1, got 0"),
                            ({"n_best": 3, "beam": 2}, "need 1 <= n_best <= beam_size")]:
        with pytest.raises(AttncapError, match=message.replace("(", r"\(").replace(")", r"\)")):
            cap(paths[0], **kwargs)
    with pytest.raises(AttncapError, match="batch_size must be a whole number"):
        ImageCaptioner(cap.folder, "cpu", batch_size=True)
