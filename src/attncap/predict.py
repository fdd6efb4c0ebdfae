"""Caption new images with a trained model: the frozen encoder and the decoder, loaded once.

The CLI's ``caption`` command, the server and :func:`attncap.load` all go through
:class:`Predictor`. It reads a checkpoint folder (``RUN/checkpoints/best``) or an exported model
folder (``attncap export --format folder``), which is the same layout plus the frozen encoder's
weights, so an export captions without the encoder's own package or a download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from tqdm import tqdm

from .checkpoint import load_model
from .decoding import beam_search
from .encoders import Encoder, build_encoder
from .errors import AttncapError
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
    for candidate in (path, path / "checkpoints" / "best"):
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

    @torch.inference_mode()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> what the decoder reads: (B, R, D) features, or (B, 3, S, S) pixels."""
        pixels = torch.stack([self._preprocess(im) for im in images]).to(self.device)  # (B, 3, S, S)
        return pixels if self.encoder is None else self.encoder(pixels)

    def caption(self, images: list[Image.Image], beam_size: int | None = None, n_best: int = 1,
                max_len: int | None = None) -> list[list[Prediction]]:
        """The ``n_best`` captions of every image, best first; all images in one batched beam search."""
        d = self.cfg.decode
        results = beam_search(self.model, self.features(images), self.vocab.start, self.vocab.end,
                              beam_size or d.beam_size, max_len or d.max_len, d.length_penalty, n_best)
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
                            precision=info.get("precision", "fp32"), device=device.type)
    if shipped:
        try:
            encoder.load_state_dict(load_file(str(weights), device=device.type))
        except (SafetensorError, RuntimeError, OSError) as exc:
            reason = str(exc).splitlines()[0][:200]
            raise AttncapError(f"encoder weights {weights} are corrupt or do not match encoder "
                               f"{info['name']} ({reason}); export the model again") from None
    return encoder


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
                  max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> Iterator[FileCaptions]:
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
                preds = predictor.caption([item.image for item in readable], beam_size, n_best, max_len)
                for item, p in zip(readable, preds):
                    item.predictions = p
            yield from batch
            bar.update(len(batch))


def _read(path: Path, max_pixels: int) -> FileCaptions:
    try:
        return FileCaptions(path, image=load_image(path, max_pixels))
    except AttncapError as exc:
        return FileCaptions(path, error=str(exc))


def coco_image_ids(paths: list[Path]) -> list[int]:
    """COCO image ids for files: the number in each file name (``COCO_val2014_000000391895.jpg`` ->
    391895) when every name has one and they are distinct, else 1, 2, 3... in the given order."""
    numbers = [re.findall(r"\d+", p.stem) for p in paths]
    ids = [int(n[-1]) for n in numbers if n]
    if len(ids) == len(paths) and len(set(ids)) == len(ids):
        return ids
    return list(range(1, len(paths) + 1))
