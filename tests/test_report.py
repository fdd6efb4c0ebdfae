"""Tests for attncap.report: attention pictures, loss curves and the HTML report."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from attncap.errors import AttncapError
from attncap.report import (attention_figure, attention_gif, overlay_attention, plot_loss_curves,
                            upsample_attention, write_html_report)


def _one_hot(row: int, col: int, grid: int = 7) -> np.ndarray:
    alpha = np.zeros((grid, grid), dtype=np.float32)
    alpha[row, col] = 1.0
    return alpha


def _square_scene() -> Image.Image:
    """Grey picture 224x160 with a red square in grid cell (row 1, col 4) of a 7x5 grid of 32 px."""
    pixels = np.full((160, 224, 3), 128, dtype=np.uint8)
    pixels[32:64, 128:160] = (220, 30, 30)
    return Image.fromarray(pixels)


def _alphas(n_words: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((n_words, 5, 7)).astype(np.float32)


def test_upsample_shape_range_and_smoothness():
    heat = upsample_attention(_one_hot(2, 5), (224, 224))
    assert heat.shape == (224, 224) and heat.dtype == np.float32
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    # Nearest-neighbour upsampling would jump by 1.0 at a cell edge; smooth stays well below.
    assert np.abs(np.diff(heat, axis=0)).max() < 0.06
    assert np.abs(np.diff(heat, axis=1)).max() < 0.06
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert (row // 32, col // 32) == (2, 5)


def test_upsample_height_first_flat_and_zero():
    heat = upsample_attention(_one_hot(0, 6), (70, 140))
    assert heat.shape == (70, 140)
    row, col = np.unravel_index(np.argmax(heat), heat.shape)
    assert row < 10 and col >= 120  # top right cell
    flat = upsample_attention(_one_hot(3, 3).ravel(), (49, 49))  # (R,) with R = 7 * 7
    assert np.unravel_index(np.argmax(flat), flat.shape) == (24, 24)
    assert not upsample_attention(np.zeros((7, 7)), (10, 10)).any()
    with pytest.raises(ValueError, match="square grid"):
        upsample_attention(np.ones(10), (10, 10))


def test_overlay_keeps_size_and_highlights_attended_region():
    image = _square_scene()
    alpha = np.zeros((5, 7), dtype=np.float32)
    alpha[1, 4] = 1.0
    out = overlay_attention(image, alpha)
    assert out.size == image.size and out.mode == "RGB"
    lit = np.asarray(out, dtype=np.float32)
    src = np.asarray(image, dtype=np.float32)
    attended, elsewhere = (48, 144), (140, 20)  # (row, col): inside the red square, far corner
    assert lit[attended].sum() >= 0.8 * src[attended].sum()  # the object stays visible
    assert lit[elsewhere].sum() < 0.6 * src[elsewhere].sum()  # the rest is dimmed
    assert lit[attended][0] > lit[attended][1] + 60  # still recognisably red
    untouched = overlay_attention(image, alpha, strength=0.0)
    assert np.array_equal(np.asarray(untouched), np.asarray(image))


def test_attention_figure_writes_png(tmp_path):
    words = ["a", "red", "square", "<end>"]
    out = attention_figure(_square_scene(), words, _alphas(4), tmp_path / "figs" / "att.png", cols=3)
    assert out == tmp_path / "figs" / "att.png"
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > img.height > 100
    assert [p.name for p in out.parent.iterdir()] == ["att.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="one attention map per word"):
        attention_figure(_square_scene(), words, _alphas(3), tmp_path / "bad.png")


def test_attention_gif_has_one_frame_per_word(tmp_path):
    words = ["a", "a", "a", "$5", "<unk>"]  # repeated words and identical maps stay separate frames
    alphas = np.repeat(_alphas(1), len(words), axis=0)
    out = attention_gif(_square_scene(), words, alphas, tmp_path / "att.gif", ms_per_word=500)
    with Image.open(out) as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == len(words)
        assert gif.info.get("loop") == 0 and gif.info.get("duration") == 500
        assert gif.height > _square_scene().height  # room for the caption text


def test_plot_loss_curves_mixed_records(tmp_path):
    records = [{"step": s, "train_loss": 3.0 / (1 + s / 100)} for s in range(0, 400, 10)]
    records += [{"epoch": e, "step": 100 * e, "train_loss": 2.0 / e, "val_loss": 2.1 / e,
                 "val_CIDEr": 0.3 * e, "lr": 1e-3, "time_s": 12.3} for e in (1, 2, 3)]
    records.append({"epoch": 4, "step": 400, "val_loss": None})  # incomplete line: skipped
    out = plot_loss_curves(records, tmp_path / "loss.png")
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 300
    epochs_only = [{"epoch": 1, "train_loss": 2.0, "val_loss": 2.2}, {"epoch": 2, "val_loss": 1.9}]
    assert plot_loss_curves(epochs_only, tmp_path / "loss2.png").is_file()
    with pytest.raises(AttncapError, match="nothing|no 'train_loss'"):
        plot_loss_curves([{"epoch": 1, "lr": 0.1}], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def _report(tmp_path, **overrides):
    args = dict(
        title="Run <b>7</b>",
        scores={"BLEU-4": 0.23456, "CIDEr": 1.0},
        samples=[{"image": "imgs/cat 1.jpg", "caption": "a cat <script>alert(1)</script>",
                  "references": ["a cat & a dog", "two \"pets\""], "figure": "att/cat.png",
                  "gif": "att/cat.gif", "scores": {"CIDEr": 0.5}}],
        figures={"Loss curves": "loss.png"},
        notes=["trained on <synthetic> data"],
    )
    args.update(overrides)
    return write_html_report(tmp_path / "report", **args)


def test_html_report_escapes_and_is_self_contained(tmp_path):
    out = _report(tmp_path)
    assert out == tmp_path / "report" / "index.html"
    page = out.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;7&lt;/b&gt;" in page and "&lt;synthetic&gt;" in page
    assert "a cat &amp; a dog" in page and "&quot;pets&quot;" in page
    assert "0.235" in page and "1.000" in page and "0.500" in page
    assert "http://" not in page and "https://" not in page
    assert 'src="att/cat.gif"' in page and 'href="att/cat.png"' in page and 'src="loss.png"' in page


def test_html_report_links_are_relative(tmp_path):
    page = _report(tmp_path, samples=[{"image": "imgs/cat 1.jpg", "caption": "x"}]).read_text()
    assert 'src="imgs/cat%201.jpg"' in page
    for bad in ("https://cdn.example.com/x.png", "/etc/passwd"):
        with pytest.raises(AttncapError, match="relative"):
            _report(tmp_path, figures={"Loss": bad})


def test_grounded_word_gets_its_box_in_figure_and_gif(tmp_path):
    """A box [x, y, w, h] in the original image's pixels is outlined on that word's overlay only,
    scaled to the 320-px display copy (the 640x480 image is shown at 320x240: half size)."""
    from matplotlib.patches import Rectangle

    from attncap.report import attention_overlays

    image = _square_scene().resize((640, 480))  # the red square: x 384..480, y 96..192
    words, alphas, box = ["a", "red", "square"], _alphas(3), [384.0, 96.0, 96.0, 96.0]
    fig = attention_overlays(image, words, alphas, 5, {2: [box]})
    patches = [[p for p in ax.patches if isinstance(p, Rectangle)] for ax in fig.axes]
    assert [len(p) for p in patches[:4]] == [0, 0, 0, 1]  # axes 0 is the plain image, 3 the word "square"
    (rect,) = patches[3]
    assert rect.get_xy() == (191.5, 47.5) and (rect.get_width(), rect.get_height()) == (48.0, 48.0)

    plain = attention_gif(image, words, alphas, tmp_path / "plain.gif")
    boxed = attention_gif(image, words, alphas, tmp_path / "boxed.gif", boxes={2: [box]})
    with Image.open(plain) as a, Image.open(boxed) as b:
        for frame in range(3):
            a.seek(frame)
            b.seek(frame)
            pa, pb = np.asarray(a.convert("RGB"), np.int32), np.asarray(b.convert("RGB"), np.int32)
            edge, centre = pb[70, 192], pb[70, 215]  # the box's left edge; inside it
            if frame == 2:
                assert abs(edge - (0, 229, 255)).max() < 40 and (pa[70, 192] != pb[70, 192]).any()
                assert abs(centre - pa[70, 215]).max() < 8  # only the outline is drawn (GIF palettes differ)
            else:
                assert abs(pa - pb).max() < 8
    with pytest.raises(ValueError, match="caption has 3 words"):
        attention_figure(image, words, alphas, tmp_path / "bad.png", boxes={3: [box]})
    with_box = attention_figure(image, words, alphas, tmp_path / "boxed.png", boxes={2: [box]})
    without = attention_figure(image, words, alphas, tmp_path / "plain.png")
    with Image.open(with_box) as a, Image.open(without) as b:
        assert a.size == b.size and not np.array_equal(np.asarray(a), np.asarray(b))


def test_html_report_marks_hallucinated_words_with_a_legend(tmp_path):
    samples = [{"image": "a.jpg", "caption": "a dog next to a teddy bear <b>", "hallucinated": [5, 6]},
               {"image": "b.jpg", "caption": "a cat", "hallucinated": []}]
    page = _report(tmp_path, samples=samples).read_text(encoding="utf-8")
    mark = '<mark class="hallucinated" title="not in the image">'
    assert f'a dog next to a {mark}teddy</mark> {mark}bear</mark> &lt;b&gt;' in page
    assert page.count(mark) == 2 and 'class="small legend"' in page and "mark.hallucinated{" in page
    assert '<p class="caption">a cat</p>' in page
    assert "legend" not in _report(tmp_path, samples=[{"image": "a.jpg", "caption": "a dog"}]).read_text()


def test_evaluate_report_marks_every_name_of_a_hallucinated_object_and_draws_grounded_boxes(tmp_path,
                                                                                             monkeypatch):
    """evaluate.write_report turns score_split's notes into cards: "dog" and "puppies" (one absent
    category; CHAIR lists its first phrase only) marked, the "dog" of "hot dog" not; the grounded
    token's boxes reach the figure and the GIF."""
    from attncap import evaluate, report

    _square_scene().save(tmp_path / "img.jpg")
    words = ["a", "dog", "eats", "a", "hot", "dog", "near", "puppies"]
    decoded = {7: {"caption": " ".join(words), "words": words, "attention": _alphas(len(words))}}
    records = [{"id": 7, "file": str(tmp_path / "img.jpg"), "captions": ["a hot dog"]}]
    notes = {7: {"hallucinated": ["dog"], "grounded": [{"token": 5, "boxes": [[128.0, 32.0, 32.0, 32.0]]}]}}
    drawn = {}
    for name in ("attention_figure", "attention_gif"):
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _real=real, _name=name, **k: (
            drawn.__setitem__(_name, k.get("boxes")), _real(*a, **k))[1])
    page = evaluate.write_report(tmp_path / "run", {"CHAIRs": 1.0}, decoded, records, 1, 3, notes).read_text()
    mark = '<mark class="hallucinated" title="not in the image">'
    assert f"a {mark}dog</mark> eats a hot dog near {mark}puppies</mark>" in page and "legend" in page
    assert drawn == {"attention_figure": {5: [[128.0, 32.0, 32.0, 32.0]]},
                     "attention_gif": {5: [[128.0, 32.0, 32.0, 32.0]]}}
