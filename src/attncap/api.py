"""The Python API: ``attncap.load(source)`` gives a captioner that is called on images.

    import attncap
    cap = attncap.load("runs/demo")            # a run, checkpoint, exported folder or "org/name" on the Hub
    best = cap("photo.jpg")                    # a Caption: .text .words .score .attention .image
    best.plot("photo_attention.png"); best.gif("photo.gif")
    many = cap(["a.jpg", pil_image, array, tensor], beam=5, n_best=3)   # one list of 3 per image

Like Hugging Face's ``pipeline("image-to-text")``: one image in, one result out; a list (or a 4-D
batch) in, a list out, in order. A result is a :class:`Caption`, or with ``n_best > 1`` the list of
the ``n_best`` best captions, best first. :class:`ImageCaptioner` is a
:class:`~attncap.predict.Predictor` (the engine that the CLI and the server use too), so everything
a Predictor does (``caption``, ``features``, ``describe``, serving) works on it as well.

Inputs, each of which may be one item of a list (see ``docs/api.md``):

* a path (``str`` or ``os.PathLike``), read with :func:`attncap.images.load_image`;
* a PIL image (any mode; transparency is composited on white, as for files);
* a numpy array in image order: (H, W) grey, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA, or a
  batch (B, H, W, C);
* a torch tensor in torchvision's order: (C, H, W) with C 1, 3 or 4, (H, W) grey, or a batch
  (B, C, H, W).

Arrays and tensors are ``uint8`` (0-255), another integer type with values in 0-255, or floating
point with values in [0, 1] (torchvision's ``ToTensor`` convention), scaled by 255 and rounded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from . import hub
from .errors import AttncapError
from .files import atomic_path
from .images import to_rgb, load_image
from .predict import Predictor, type_name, resolve_model_dir
from .report import attention_gif, attention_overlays

DEFAULT_BATCH_SIZE = 16
SINGLE = (str, os.PathLike, Image.Image, np.ndarray, torch.Tensor)
ACCEPTED = ("a path, a PIL image, a numpy array (H, W[, C]), a tensor (C, H, W), a batch (B, ...) "
            "or a list of them")

Input = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
Inputs = Union[Input, Sequence[Input]]


@dataclass
class Caption:
    """One caption of one image, with what the model looked at for each word."""

    text: str
    words: list[str]
    score: float                          # log-probability of the caption under the model
    attention: np.ndarray                 # (len(words), g, g): word i's weights over the g x g grid
    image: Image.Image = field(repr=False)  # the RGB image captioned, for plotting

    def __str__(self) -> str:
        return self.text

    def plot(self, path: str | os.PathLike | None = None, cols: int = 5) -> Figure:
        """A matplotlib figure: the image titled with the caption, then one overlay per word.

        With ``path`` it is also written there as a PNG. The figure is not attached to pyplot:
        show it in a notebook by leaving it as a cell's value, or ``fig.savefig(...)`` it.
        """
        fig = attention_overlays(self.image, self._words("plot"), self.attention, cols, None)
        if path is not None:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png")
        return fig

    def gif(self, path: str | os.PathLike, ms_per_word: int = 800) -> Path:
        """An animated GIF at ``path``, one frame per word (its attention and the caption so far)."""
        return attention_gif(self.image, self._words("gif"), self.attention, path, ms_per_word)

    def _words(self, what: str) -> list[str]:
        if not self.words:
            raise AttncapError(f"Caption.{what}: the caption is empty, so there is no attention to "
                               "draw; caption with a larger max_len or another beam")
        return self.words


Result = Union[Caption, list[Caption]]


class ImageCaptioner(Predictor):
    """A :class:`~attncap.predict.Predictor` that is called on images (see the module docstring).

    ``batch_size``: how many images go through the encoder and beam search at once.
    """

    def __init__(self, checkpoint: str | Path, device: str | None = None,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__(checkpoint, device)
        self.batch_size = _positive("batch_size", batch_size)

    def __call__(self, images: Inputs, *, beam: int | None = None, n_best: int = 1,
                 max_len: int | None = None, batch_size: int | None = None
                 ) -> Result | list[Result]:
        """Caption one image or many.

        images: one input, or a list/tuple of inputs, or a 4-D batch: (B, C, H, W) tensor or
        (B, H, W, C) array. beam: beam size (default the model's ``decode.beam_size``); n_best:
        captions kept per image (at most ``beam``); max_len: most words per caption.

        Returns for one image a :class:`Caption` (``n_best == 1``) or a list of ``n_best`` of them,
        best first; for a list or batch, a list with one such result per image, in order.
        """
        pil, batched = to_images(images)
        step = _positive("batch_size", self.batch_size if batch_size is None else batch_size)
        results: list[Result] = []
        for first in range(0, len(pil), step):
            chunk = pil[first:first + step]
            for image, preds in zip(chunk, self.caption(chunk, beam, n_best, max_len)):
                caps = [Caption(p.caption, p.words, p.score, p.attention, image) for p in preds]
                results.append(caps if n_best > 1 else caps[0])
        return results if batched else results[0]


def load(source: str | os.PathLike, device: str | None = None, *,
         batch_size: int = DEFAULT_BATCH_SIZE, revision: str | None = None,
         cache_dir: str | os.PathLike | None = None) -> ImageCaptioner:
    """A ready :class:`ImageCaptioner` from a run directory, a checkpoint folder, an exported
    folder (``attncap export --format folder|hub``) or a Hugging Face Hub repo id ``"org/name"``.

    A string that is not an existing path and looks like ``org/name`` is fetched with
    ``huggingface_hub.snapshot_download`` (``revision``, ``cache_dir``; ``HF_HOME``, ``HF_ENDPOINT``
    and ``HF_HUB_OFFLINE=1`` apply as usual). device: ``"cpu"``, ``"cuda"``...; default cuda
    when available. Weights are read from safetensors and JSON only, never unpickled.
    """
    folder = hub.download(source, revision, cache_dir) if hub.is_repo_id(source) else source
    return ImageCaptioner(resolve_model_dir(folder), device, batch_size)


# --- inputs --------------------------------------------------------------------------------------

def to_images(images: Inputs) -> tuple[list[Image.Image], bool]:
    """What the captioner was given -> (non-empty list of RGB images, whether it was a list or batch).

    Every item's type, shape and dtype is checked before any file is read.
    """
    batched = isinstance(images, (list, tuple)) or (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise AttncapError(f"ImageCaptioner got an empty {type(images).__name__}; pass {ACCEPTED}")
    for i, item in enumerate(items):
        where = f"item {i}" if isinstance(images, (list, tuple)) else "the input"
        if not isinstance(item, SINGLE):
            raise AttncapError(f"ImageCaptioner: {where} has type {type_name(item)}; pass {ACCEPTED}")
        if isinstance(item, torch.Tensor):
            items[i] = _tensor_as_array(item, where)
        if isinstance(items[i], np.ndarray):
            items[i] = _checked_array(items[i], where)
    out: list[Image.Image] = []
    for item in items:
        if isinstance(item, (str, os.PathLike)):
            out.append(load_image(item))
        elif isinstance(item, Image.Image):
            out.append(to_rgb(item, "the PIL image"))
        else:
            out.extend(_array_image(a) for a in (item if item.ndim == 4 else [item]))
    return out, batched


def _tensor_as_array(tensor: torch.Tensor, where: str) -> np.ndarray:
    """A (C, H, W), (H, W) or (B, C, H, W) tensor -> the numpy array in image order (channels last)."""
    shape = tuple(tensor.shape)
    if tensor.ndim == 2 or (tensor.ndim in (3, 4) and shape[-3] in (1, 3, 4)):
        t = tensor.detach().cpu()
        t = t.float() if t.is_floating_point() else t  # numpy has no bfloat16
        return (t if t.ndim == 2 else t.movedim(-3, -1)).numpy()  # (H, W) or (..., H, W, C)
    hint = (f"; it looks channels-last: use tensor.permute({'2, 0, 1' if tensor.ndim == 3 else '0, 3, 1, 2'})"
            if tensor.ndim in (3, 4) and shape[-1] in (1, 3, 4) else "")
    raise AttncapError(f"ImageCaptioner: {where} is a tensor of shape {shape}; tensors are (C, H, W) "
                       f"with C 1, 3 or 4 (torchvision's order), (H, W) or a batch (B, C, H, W){hint}")


def _checked_array(array: np.ndarray, where: str) -> np.ndarray:
    """Check shape and values; return uint8 with the same shape (floats in [0, 1] scaled by 255)."""
    shape = array.shape
    channels_ok = array.ndim == 2 or (array.ndim in (3, 4) and shape[-1] in (1, 3, 4))
    if not channels_ok:
        hint = ("; for channels-first data pass a torch tensor or use array.transpose(1, 2, 0)"
                if array.ndim == 3 and shape[0] in (1, 3, 4) else "")
        raise AttncapError(f"ImageCaptioner: {where} is an array of shape {shape}; arrays are (H, W), "
                           f"(H, W, 3), (H, W, 4), (H, W, 1) or a batch (B, H, W, C){hint}")
    if array.size == 0:
        raise AttncapError(f"ImageCaptioner: {where} has shape {shape}: no pixels (an empty image or batch)")
    kind = array.dtype.kind
    if kind == "u" and array.dtype.itemsize == 1:
        return array
    if kind == "f":
        return _scaled_floats(array, where)
    if kind in "iu" and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    if kind in "iu":
        raise AttncapError(f"ImageCaptioner: {where} has {array.dtype} values {array.min()}..{array.max()}; "
                           "integer pixels must be 0-255 (scale 16-bit data to 8 bits first)")
    raise AttncapError(f"ImageCaptioner: {where} has dtype {array.dtype}; pass uint8 (0-255) or "
                       "floating point in [0, 1]")


def _scaled_floats(array: np.ndarray, where: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise AttncapError(f"ImageCaptioner: {where} holds NaN or infinite values; pass finite "
                           "values in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise AttncapError(f"ImageCaptioner: {where} is floating point with values {low:.4g}..{high:.4g}; "
                           "floats must be in [0, 1] (divide 0-255 data by 255, or pass uint8)")
    return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)


def _array_image(array: np.ndarray) -> Image.Image:
    """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> an RGB image (RGBA composited on white)."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)), "the array")  # mode L, RGB or RGBA


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttncapError(f"ImageCaptioner: {name} must be a whole number of at least 1, got {value!r}")
    return value
