"""Caption new images with a trained model: the frozen encoder and the decoder, loaded once.

The CLI's ``caption`` command, the server and :func:`attncap.load` all go through
:class:`Predictor`. It reads a checkpoint folder (``RUN/checkpoints/best``) or an exported model
folder (``attncap export --format folder``), which is the same layout plus the frozen encoder's
weights, so an export captions without the encoder's own package or a download.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from .checkpoint import load_model
from .decoding import beam_search, options
from .encoders import Encoder, build_encoder
from .errors import AttncapError
from .files import recover_folder
from .images import DEFAULT_MAX_PIXELS, load_image

ENCODER_WEIGHTS = "encoder.safetensors"  # present in exported folders only
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass
class Prediction:
    caption: str
    words: list[str]
    attention: np.ndarray  # (len(words), g, g)
    score: float           # log-probability


def resolve_model_dir(path: str | Path) -> Path:
    """The folder holding ``model.safetensors``: ``path`` itself, or a run directory's best checkpoint."""
    path = Path(path)
    for candidate in (path, recover_folder(path / "checkpoints" / "best") if path.is_dir() else path):
        if (candidate / "model.safetensors").is_file():
            return candidate
    raise AttncapError(f"no model in {path}: expected a run directory (with checkpoints/best), a "
                       "checkpoint folder or an exported model folder (with model.safetensors); "
                       "train first or check the path")


class Predictor:
    """Images in, captions with per-word attention out."""

    def __init__(self, checkpoint: str | Path, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.folder = Path(checkpoint)
        self.model, self.vocab, self.cfg, self.info = load_model(checkpoint, self.device)
        # A trainable encoder is part of the model; a frozen one is rebuilt exactly as for the store.
        self.encoder = None if self.info["trainable"] else _frozen_encoder(
            self.folder, self.info, self.device)
        self.image_size = self.info["image_size"]
        self._preprocess = (self.encoder if self.encoder is not None else self.model.encoder).preprocess

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best") -> "Predictor":
        return cls(Path(run_dir) / "checkpoints" / checkpoint)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """One PIL RGB image -> the encoder's input: uint8 (3, S, S) on the CPU (S = ``image_size``).

        The server keeps only this (not the full-size image) while a request waits for the model.
        """
        return self._preprocess(image)

    @torch.inference_mode()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> what the decoder reads: (B, R, D) features, or (B, 3, S, S) pixels."""
        return self._encode(torch.stack([self.pixels(im) for im in images]))  # (B, 3, S, S)

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> (B, R, D) features (frozen encoder), or the pixels on the device."""
        pixels = pixels.to(self.device)
        return pixels if self.encoder is None else self.encoder(pixels)

    def caption(self, images: ImageInput, beam_size: int | None = None, n_best: int = 1,
                max_len: int | None = None, allow_unk: bool | None = None,
                block_trigrams: bool | None = None) -> list[list[Prediction]]:
        """The ``n_best`` captions of every image, best first; all images in one batched beam search.

        Options left None are the model's ``decode.*`` settings (``allow_unk``: may ``<unk>`` be
        written; ``block_trigrams``: forbid repeating a trigram within a caption).

        ``images``: a PIL image (other modes than RGB are converted with ``convert("RGB")``), a path
        (read with :func:`attncap.images.load_image`), or a list or tuple of them. The result
        always has one list per image, so one image given alone gives a one-element outer list:
        ``caption(img)[0][0]`` is its best caption.
        """
        loaded = _as_images(images)
        return self.caption_pixels(torch.stack([self.pixels(im) for im in loaded]), beam_size,
                                   n_best, max_len, allow_unk, block_trigrams)

    def caption_pixels(self, pixels: torch.Tensor, beam_size: int | None = None, n_best: int = 1,
                       max_len: int | None = None, allow_unk: bool | None = None,
                       block_trigrams: bool | None = None) -> list[list[Prediction]]:
        """Like :meth:`caption`, for images already preprocessed by :meth:`pixels`: uint8 (B, 3, S, S)."""
        s = self.image_size
        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, s, s):
            raise AttncapError(f"caption_pixels takes uint8 (B, 3, {s}, {s}) from Predictor.pixels, "
                               f"got {pixels.dtype} {tuple(pixels.shape)}")
        d = self.cfg.decode
        max_len = max_len or d.max_len
        chosen = {"allow_unk": allow_unk, "block_trigrams": block_trigrams}
        d = dataclasses.replace(d, min_len=min(d.min_len, max_len),  # a short max_len from a request wins
                                **{k: v for k, v in chosen.items() if v is not None})
        results = beam_search(self.model, self._encode(pixels), self.vocab.start, self.vocab.end,
                              beam_size or d.beam_size, max_len, d.length_penalty, n_best,
                              **options(d, self.vocab.unk))
        out = []
        for hyps in results:
            preds = []
            for h in hyps:
                words = self.vocab.decode(h.tokens)
                preds.append(Prediction(" ".join(words), words, h.attention_grid(), h.score))
            out.append(preds)
        return out

    def describe(self) -> dict:
        """What this model is, for the server's /health and the exported model card."""
        m = self.cfg.model
        return {"encoder": self.info["name"], "colour_stats": bool(self.info.get("colour_stats")),
                "grid": self.info["grid"], "decoder": m.decoder, "hidden_dim": m.hidden_dim,
                "vocab_size": len(self.vocab), "beam_size": self.cfg.decode.beam_size,
                "max_len": self.cfg.decode.max_len, "device": self.device.type}


def _frozen_encoder(folder: Path, info: dict, device: torch.device) -> Encoder:
    """The frozen encoder: from the folder's own weights when an export ships them, else by name."""
    weights = folder / ENCODER_WEIGHTS
    shipped = weights.is_file()
    encoder = build_encoder(info["name"], pretrained=info["pretrained"] and not shipped,
                            colour_stats=info.get("colour_stats", False), allow_download=not shipped,
                            precision=info.get("precision", "fp32"), device=device.type,
                            blocks=info.get("blocks"), image_size=info.get("image_size", 0),
                            head=info.get("head", True))
    if shipped:
        try:
            encoder.load_state_dict(load_file(str(weights), device=device.type))
        except (SafetensorError, RuntimeError, OSError) as exc:
            reason = str(exc).splitlines()[0][:200]
            raise AttncapError(f"encoder weights {weights} are corrupt or do not match encoder "
                               f"{info['name']} ({reason}); export the model again") from None
    return encoder


ImageInput = Union[Image.Image, str, os.PathLike, Sequence[Union[Image.Image, str, os.PathLike]]]
ACCEPTED = "a PIL image, a path, or a list of them"


def _as_images(images: ImageInput) -> list[Image.Image]:
    """What :meth:`Predictor.caption` was given, as a non-empty list of loaded RGB images."""
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    elif not isinstance(images, (list, tuple)):
        raise AttncapError(f"Predictor.caption takes {ACCEPTED}; got {type_name(images)}"
                           + (" (convert it with PIL.Image.fromarray)" if isinstance(images, np.ndarray)
                              else ""))
    if not images:
        raise AttncapError(f"Predictor.caption got an empty {type(images).__name__}; pass {ACCEPTED}")
    for i, item in enumerate(images):  # every type first: a bad item fails before any file is read
        if not isinstance(item, (Image.Image, str, os.PathLike)):
            raise AttncapError(f"Predictor.caption: item {i} has type {type_name(item)}; each item must be a "
                               "PIL image or a path")
    loaded = [load_image(item) if isinstance(item, (str, os.PathLike)) else item for item in images]
    return [im if im.mode == "RGB" else im.convert("RGB") for im in loaded]


def type_name(value: object) -> str:
    """The type's name as a user would write it: ``int``, ``numpy.ndarray``."""
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# --- many files at once ------------------------------------------------------------------------

@dataclass
class FileCaptions:
    """The outcome for one input file: its predictions, or the one-line reason it was skipped."""

    path: Path
    predictions: list[Prediction] | None = None
    image: Image.Image | None = None  # kept for attention figures; None when unreadable
    error: str | None = None


def find_images(inputs: list[str | Path]) -> list[Path]:
    """Expand directories into the image files below them (by extension, sorted); files pass as given.

    Files named explicitly are always tried: their content, not their name, decides if they are images.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise AttncapError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {item}")
            found.extend(files)
        else:
            found.append(item)
    return found


def caption_files(predictor: Predictor, paths: list[Path], batch_size: int = 16,
                  beam_size: int | None = None, n_best: int = 1, max_len: int | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True, allow_unk: bool | None = None,
                  block_trigrams: bool | None = None) -> Iterator[FileCaptions]:
    """Caption ``paths`` in batches of ``batch_size`` images, yielding one result per path in order.

    Unreadable files are yielded with their error instead of stopping the run.
    """
    if batch_size < 1:
        raise AttncapError(f"batch size must be at least 1, got {batch_size}")
    # disable=None: no bar when stderr is not a terminal (logs, pipes), where it is only noise
    with tqdm(total=len(paths), unit="img", desc="caption", disable=None if progress else True,
              dynamic_ncols=True) as bar:
        for first in range(0, len(paths), batch_size):
            batch = [_read(path, max_pixels) for path in paths[first:first + batch_size]]
            readable = [item for item in batch if item.image is not None]
            if readable:
                preds = predictor.caption([item.image for item in readable], beam_size, n_best, max_len,
                                          allow_unk, block_trigrams)
                for item, p in zip(readable, preds):
                    item.predictions = p
            yield from batch
            bar.update(len(batch))


def _read(path: Path, max_pixels: int) -> FileCaptions:
    try:
        return FileCaptions(path, image=load_image(path, max_pixels))
    except AttncapError as exc:
        return FileCaptions(path, error=str(exc))


def image_number(path: Path) -> int | None:
    """The last number in a file name (``COCO_val2014_000000391895.jpg`` -> 391895), or None."""
    numbers = re.findall(r"\d+", Path(path).stem)
    return int(numbers[-1]) if numbers else None


def coco_image_ids(paths: list[Path]) -> list[int]:
    """COCO image ids for files: the number in each file name, or 1, 2, 3... when no name has one.

    A mix of named and unnumbered files, or two files with the same number, would write wrong ids
    into a results file, so it raises :class:`AttncapError` naming the files instead.
    """
    numbers = [image_number(p) for p in paths]
    if all(n is None for n in numbers):
        return list(range(1, len(paths) + 1))
    missing = [p for p, n in zip(paths, numbers) if n is None]
    if missing:
        numbered = next(p for p, n in zip(paths, numbers) if n is not None)
        raise AttncapError(f"cannot give COCO image ids: {missing[0]} has no number in its name "
                           f"({len(missing)} of {len(paths)} files have none) while {numbered} has "
                           "one; rename the files so that every name holds its image id (or none "
                           "does, for ids 1, 2, 3... by position), or caption them without --out")
    first: dict[int, Path] = {}
    for path, n in zip(paths, numbers):
        if n in first:
            raise AttncapError(f"cannot give COCO image ids: {first[n]} and {path} both have the "
                               f"number {n}; rename one of them so that every name holds a "
                               "different image id, or caption them in separate runs")
        first[n] = path
    return numbers
