"""Pictures of what the model looked at, loss curves, and the self-contained HTML report.

Matplotlib is used through :class:`matplotlib.figure.Figure` and the Agg canvas only, never pyplot,
so nothing here touches global plotting state or needs a display. Every file is written atomically.
"""

from __future__ import annotations

import html
import math
import os
import textwrap
from pathlib import Path
from urllib.parse import quote, urlsplit

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont

from .errors import AttncapError
from .files import atomic_path

_PANEL_SIDE = 320  # pixels: figures and GIFs show a downscaled copy, attention is coarse anyway
_GIF_FONT_SIZE = 15


# --- attention maps -------------------------------------------------------------------------

def _as_grid(alpha: np.ndarray) -> np.ndarray:
    """Return alpha as a (gh, gw) float array; a flat vector of a square number of regions is reshaped."""
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim == 1:
        side = math.isqrt(alpha.size)
        if side * side != alpha.size:
            raise ValueError(f"attention of {alpha.size} regions is not a square grid; pass it as (gh, gw)")
        alpha = alpha.reshape(side, side)
    if alpha.ndim != 2 or alpha.size == 0:
        raise ValueError(f"attention must be a (gh, gw) grid, got shape {alpha.shape}")
    return np.nan_to_num(alpha, nan=0.0, posinf=0.0, neginf=0.0)


def upsample_attention(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Upsample one attention grid smoothly (bicubic) to an image.

    alpha: (gh, gw) non-negative weights (or a flat vector of gh * gw with gh == gw).
    size: (H, W), numpy order: height first (``image.size[::-1]`` for a PIL image).
    Returns (H, W) float32 in [0, 1], scaled so its maximum is 1 (all zeros stays all zeros).
    """
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size must be positive (H, W), got {size}")
    grid = np.clip(_as_grid(alpha), 0.0, None).astype(np.float32)  # (gh, gw)
    up = Image.fromarray(grid, "F").resize((width, height), Image.Resampling.BICUBIC)
    heat = np.clip(np.asarray(up, dtype=np.float32), 0.0, None)  # bicubic rings below zero
    peak = float(heat.max())
    return heat / peak if peak > 0 else np.zeros((height, width), np.float32)


def overlay_attention(image: Image.Image, alpha: np.ndarray, cmap: str = "inferno",
                      strength: float = 0.6) -> Image.Image:
    """Show where the model looked: dim the image where attention is low and tint it with ``cmap``.

    image: any PIL image (converted to RGB). alpha: (gh, gw). strength in [0, 1]: 0 leaves the image
    unchanged, 1 blacks out unattended regions. Returns an RGB image of the same size.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from None
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    heat = upsample_attention(alpha, rgb.shape[:2])[..., None]  # (H, W, 1)
    tint = colormap(heat[..., 0])[..., :3].astype(np.float32)  # (H, W, 3)
    lit = rgb * (1.0 - strength * (1.0 - heat))  # attended pixels keep their brightness
    out = lit * (1.0 - 0.5 * strength) + tint * heat * (0.5 * strength)  # colour only where attended
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")


def _check_words(words: list[str], alphas: np.ndarray) -> np.ndarray:
    """Return alphas as an array with one attention map per word."""
    alphas = np.asarray(alphas)
    if not words:
        raise ValueError("no words to draw attention for")
    if alphas.ndim not in (2, 3) or alphas.shape[0] != len(words):
        raise ValueError(f"need one attention map per word: {len(words)} words, alphas {alphas.shape}")
    return alphas


def _display_copy(image: Image.Image) -> Image.Image:
    """An RGB copy no larger than _PANEL_SIDE on its long side."""
    small = image.convert("RGB")
    small.thumbnail((_PANEL_SIDE, _PANEL_SIDE), Image.Resampling.LANCZOS)
    return small


def _mpl_text(text: str) -> str:
    """Matplotlib reads ``$...$`` as math; captions are plain text."""
    return text.replace("$", r"\$")


_BOX_COLOUR = "#00e5ff"  # cyan: visible over the inferno overlay's blacks, reds and yellows


def _display_boxes(boxes, n_words: int, original: tuple[int, int], shown: tuple[int, int]
                   ) -> dict[int, list[tuple[float, float, float, float]]]:
    """{word index: [(x, y, w, h)]} scaled from the original image's pixels to the display copy's.

    boxes: None, or {word index: [[x, y, w, h], ...]} in the original image's pixels (COCO's bbox).
    """
    if not boxes:
        return {}
    sx, sy = shown[0] / original[0], shown[1] / original[1]
    out = {}
    for index, word_boxes in boxes.items():
        if not 0 <= int(index) < n_words:
            raise ValueError(f"boxes given for word {index}, but the caption has {n_words} words")
        out[int(index)] = [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in word_boxes]
    return out


def attention_figure(image: Image.Image, words: list[str], alphas: np.ndarray, out_path,
                     cols: int = 5, boxes: dict[int, list] | None = None) -> Path:
    """One PNG: the image titled with the caption, then one attention overlay per word.

    alphas: (n_words, gh, gw). boxes: {word index: [[x, y, w, h], ...]} in the original image's
    pixels, outlined over that word's overlay (the objects a grounded word names). Returns the path.
    """
    fig = attention_overlays(image, words, alphas, cols, boxes)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_path)


def attention_overlays(image: Image.Image, words: list[str], alphas: np.ndarray, cols: int,
                       boxes) -> Figure:
    """The figure :func:`attention_figure` saves and ``Caption.plot`` returns: axes 0 the image,
    axes 1 + i word i's overlay."""
    alphas = _check_words(words, alphas)
    small = _display_copy(image)
    shown = _display_boxes(boxes, len(words), image.size, small.size)
    cols = max(1, min(cols, len(words) + 1))
    rows = math.ceil((len(words) + 1) / cols)
    aspect = small.height / small.width
    cell, band = 2.6 * aspect, 0.5  # inches: an overlay's height, the title band above it
    fig = Figure(figsize=(2.6 * cols, (cell + band) * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    caption = "\n".join(textwrap.wrap(" ".join(words), 34)[:3])
    axes[0].imshow(small)
    axes[0].set_title(_mpl_text(caption), fontsize=8)
    for i, (ax, word, alpha) in enumerate(zip(axes[1:], words, alphas)):
        ax.imshow(overlay_attention(small, alpha))
        ax.set_title(_mpl_text(word), fontsize=11)
        for x, y, w, h in shown.get(i, ()):  # imshow puts pixel edges at -0.5
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=_BOX_COLOUR, linewidth=1.5))
    for ax in axes:
        ax.axis("off")
    # Fixed margins, not tight_layout: that lays out by drawing the figure once more, which was
    # half the time of a report figure for a 30-word caption.
    height = (cell + band) * rows
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - band / height, wspace=0.05,
                        hspace=band / cell)
    return fig


# --- animated GIF ---------------------------------------------------------------------------

def _layout_words(words: list[str], font, width: int, pad: int) -> tuple[list[tuple[int, int]], int]:
    """Place the words left to right, wrapping at ``width``; return top-left corners and line height."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(font.getbbox("Ag")[3]) + 6
    space = probe.textlength(" ", font=font)
    x, y, spots = pad, pad, []
    for word in words:
        length = probe.textlength(word, font=font)
        if x > pad and x + length > width - pad:
            x, y = pad, y + line_height
        spots.append((int(x), y))
        x += length + 1.5 * space + 2
    return spots, line_height


def _gif_frame(overlay: Image.Image, words: list[str], index: int, font, spots, band: int,
               line_height: int) -> Image.Image:
    """One frame: the overlay above a dark band with the caption so far, the current word highlighted."""
    frame = Image.new("RGB", (overlay.width, overlay.height + band), (24, 24, 24))
    frame.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(frame)
    top = overlay.height
    for i, (word, (x, y)) in enumerate(zip(words[: index + 1], spots)):
        if i == index:
            right = x + draw.textlength(word, font=font)
            draw.rectangle((x - 3, top + y - 2, right + 3, top + y + line_height - 4), fill=(255, 214, 10))
        draw.text((x, top + y), word, font=font, fill=(0, 0, 0) if i == index else (235, 235, 235))
    progress = round(frame.width * (index + 1) / len(words))  # also keeps every frame distinct
    draw.rectangle((0, frame.height - 3, progress, frame.height), fill=(255, 214, 10))
    return frame


def attention_gif(image: Image.Image, words: list[str], alphas: np.ndarray, out_path,
                  ms_per_word: int = 800, boxes: dict[int, list] | None = None) -> Path:
    """An animated GIF, one frame per word: its attention overlay and the caption so far.

    alphas: (n_words, gh, gw). boxes: as for :func:`attention_figure`, outlined on that word's
    frame. The GIF loops forever. Returns the written path.
    """
    alphas = _check_words(words, alphas)
    small = _display_copy(image)
    shown = _display_boxes(boxes, len(words), image.size, small.size)
    font = ImageFont.load_default(size=_GIF_FONT_SIZE)
    spots, line_height = _layout_words(words, font, small.width, pad=8)
    band = spots[-1][1] + line_height + 10
    frames = []
    for i, alpha in enumerate(alphas):
        overlay = overlay_attention(small, alpha)
        pen = ImageDraw.Draw(overlay)
        for x, y, w, h in shown.get(i, ()):
            pen.rectangle((x, y, max(x, x + w - 1), max(y, y + h - 1)), outline=_BOX_COLOUR, width=2)
        frames.append(_gif_frame(overlay, words, i, font, spots, band, line_height))
    with atomic_path(out_path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:],
                       duration=int(ms_per_word), loop=0, optimize=False)
    return Path(out_path)


# --- loss curves ----------------------------------------------------------------------------

def _series(records: list[dict], x_key: str, y_key: str, keep) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the records that have both numeric keys and pass ``keep``, sorted by x."""
    points = sorted((float(r[x_key]), float(r[y_key])) for r in records
                    if keep(r) and _is_number(r.get(x_key)) and _is_number(r.get(y_key)))
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _is_number(value) -> bool:
    """True for ints and floats (JSON numbers), False for bools, None and strings."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Centred moving average over about 1/15 of the run: no lag, unlike an EMA."""
    window = max(1, len(values) // 15) | 1  # odd, so it centres on each point
    kernel = np.ones(window)
    counts = np.convolve(np.ones(len(values)), kernel, mode="same")  # shorter windows at the ends
    return np.convolve(values, kernel, mode="same") / counts


def _cider_key(records: list[dict]) -> str | None:
    """The validation CIDEr key used by the log, whatever its case."""
    keys = {k for r in records for k in r if k.lower() == "val_cider"}
    return min(keys) if keys else None


def plot_loss_curves(records: list[dict], out_path) -> Path:
    """Plot a training metrics log (one dict per JSONL line) to a PNG.

    Train loss against step (light raw line plus a smoothed one) from step-level records
    (no "epoch"), else from epoch records; validation loss per epoch on the same axes;
    validation CIDEr on a second y axis when logged. Returns the written path.
    """
    x_key = "step" if any("step" in r for r in records) else "epoch"
    steps_x, steps_y = _series(records, x_key, "train_loss", lambda r: "epoch" not in r)
    epoch_x, epoch_y = _series(records, x_key, "train_loss", lambda r: "epoch" in r)
    val_x, val_y = _series(records, x_key, "val_loss", lambda r: True)
    if not (len(steps_x) or len(epoch_x) or len(val_x)):
        raise AttncapError("metrics log has no 'train_loss' or 'val_loss' values to plot; "
                           "check the metrics JSONL file")
    fig = Figure(figsize=(8, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if len(steps_x):
        ax.plot(steps_x, steps_y, color="tab:blue", alpha=0.25, linewidth=1, label="train loss")
        ax.plot(steps_x, _smooth(steps_y), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    if len(epoch_x):
        style = dict(linestyle="none") if len(steps_x) else dict(linewidth=1.5)
        ax.plot(epoch_x, epoch_y, marker="o", color="tab:cyan", label="train loss (epoch)", **style)
    if len(val_x):
        ax.plot(val_x, val_y, marker="s", color="tab:orange", linewidth=1.5, label="val loss")
    ax.set_xlabel(x_key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    cider = _cider_key(records)
    if cider is not None:
        cider_x, cider_y = _series(records, x_key, cider, lambda r: True)
        twin = ax.twinx()
        twin.plot(cider_x, cider_y, marker="^", color="tab:green", linewidth=1.5, label="val CIDEr")
        twin.set_ylabel("CIDEr")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(out_path)


# --- HTML report ----------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
 background:#f6f6f4;color:#1d1d1d;line-height:1.45}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 16px}h2{font-size:1.2em;margin:28px 0 10px}
table.scores{border-collapse:collapse;background:#fff}
table.scores td,table.scores th{padding:6px 14px;border-bottom:1px solid #ddd;text-align:left}
table.scores td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:0 0 16px}figure img{max-width:100%;border:1px solid #ddd;background:#fff}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(340px,1fr));gap:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px;overflow:hidden}
.card>img{width:100%;height:auto;border-radius:4px}
.caption{font-size:1.05em;font-weight:600;margin:8px 0}
.refs{font-size:.9em;color:#555;margin:4px 0 8px;padding-left:18px}
.small{font-size:.85em;color:#555}img.att{width:100%;margin-top:4px;border:1px solid #eee}
mark.hallucinated{background:#ffd6d6;color:#a00000;text-decoration:underline wavy #d00000;padding:0 2px}
.boxkey{display:inline-block;width:1.6em;height:.9em;border:2px solid #00e5ff;vertical-align:middle}
"""

_LEGEND = ('<p class="small legend"><mark class="hallucinated">word</mark> names an object the image does '
           'not hold (CHAIR: not in its instance annotations nor its references); <span class="boxkey">'
           '</span> in the attention pictures: the annotated boxes of the object a word names.</p>')


def _href(link, what: str) -> str:
    """A relative link, percent-encoded and HTML-escaped; absolute paths and URLs are refused."""
    text = str(link).replace(os.sep, "/")
    if urlsplit(text).scheme or urlsplit(text).netloc or text.startswith("/"):
        raise AttncapError(f"report {what} {text!r} must be a path relative to the report folder")
    return html.escape(quote(text, safe="/._-~"), quote=True)


def _score_text(value) -> str:
    """A score to 3 decimals, a count as an integer; anything that is not a number as its text."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.3f}" if _is_number(value) else str(value)


def _scores_table(scores: dict[str, float]) -> str:
    """The scores as a two-column HTML table (metric, value)."""
    rows = "".join(f"<tr><td>{html.escape(str(name))}</td><td class=\"num\">{html.escape(_score_text(v))}"
                   "</td></tr>" for name, v in scores.items())
    return f'<table class="scores"><tr><th>metric</th><th>value</th></tr>{rows}</table>'


def _sample_card(sample: dict) -> str:
    """One gallery card: picture (the GIF when there is one), caption, references, scores, figure."""
    caption = html.escape(str(sample.get("caption", "")))
    picture = sample.get("gif") or sample.get("image")
    parts = []
    if picture:
        parts.append(f'<img src="{_href(picture, "sample image")}" alt="{caption}" loading="lazy">')
    parts.append(f'<p class="caption">{_marked_caption(str(sample.get("caption", "")), sample)}</p>')
    refs = "".join(f"<li>{html.escape(str(ref))}</li>" for ref in sample.get("references") or [])
    if refs:
        parts.append(f'<div class="small">references</div><ol class="refs">{refs}</ol>')
    if sample.get("scores"):
        scored = ", ".join(f"{html.escape(str(k))} {html.escape(_score_text(v))}"
                           for k, v in sample["scores"].items())
        parts.append(f'<p class="small">{scored}</p>')
    if sample.get("figure"):
        link = _href(sample["figure"], "attention figure")
        parts.append(f'<div class="small">attention per word (click to enlarge)</div><a href="{link}">'
                     f'<img class="att" src="{link}" alt="attention per word" loading="lazy"></a>')
    return '<div class="card">' + "".join(parts) + "</div>"


def _marked_caption(caption: str, sample: dict) -> str:
    """The caption HTML-escaped, its words at ``sample["hallucinated"]`` (indices into
    ``caption.split()``) in ``<mark class="hallucinated">``."""
    marked = set(sample.get("hallucinated") or ())
    if not marked:
        return html.escape(caption)
    return " ".join(f'<mark class="hallucinated" title="not in the image">{html.escape(w)}</mark>'
                    if i in marked else html.escape(w) for i, w in enumerate(caption.split()))


def write_html_report(out_dir, title: str, scores: dict[str, float], samples: list[dict],
                      figures: dict[str, str] | None = None, notes: list[str] | None = None) -> Path:
    """Write ``out_dir/index.html``: one self-contained page (inline CSS, no scripts, relative links).

    scores: {metric: value}, shown to 3 decimals. figures: {heading: path relative to out_dir}.
    samples: dicts with "image", "caption", "references" and optionally "figure", "gif", "scores" and
    "hallucinated" (indices of the caption's space-separated words that CHAIR counts as hallucinated;
    the key's presence adds the legend).
    All text is HTML-escaped. Returns the path of index.html.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    if notes:
        body.append("<ul>" + "".join(f"<li>{html.escape(str(n))}</li>" for n in notes) + "</ul>")
    if scores:
        body += ["<h2>Scores</h2>", _scores_table(scores)]
    for heading, path in (figures or {}).items():
        body.append(f"<h2>{html.escape(str(heading))}</h2><figure><img src=\"{_href(path, 'figure')}\" "
                    f"alt=\"{html.escape(str(heading))}\"></figure>")
    if samples:
        legend = [_LEGEND] if any("hallucinated" in s for s in samples) else []
        body += [f"<h2>Samples ({len(samples)})</h2>", *legend,
                 '<div class="gallery">' + "".join(_sample_card(s) for s in samples) + "</div>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n"
            "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")
    out_path = Path(out_dir) / "index.html"
    with atomic_path(out_path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out_path
