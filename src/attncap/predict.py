"""Caption new images with a trained run: the frozen encoder and the decoder, loaded once.

The CLI's ``caption`` command uses it, and so will the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_model
from .decoding import beam_search
from .encoders import build_encoder


@dataclass
class Prediction:
    caption: str
    words: list[str]
    attention: np.ndarray  # (len(words), g, g)
    score: float           # log-probability


class Predictor:
    """Images in, captions with per-word attention out."""

    def __init__(self, checkpoint: str | Path, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.vocab, self.cfg, info = load_model(checkpoint, self.device)
        # A trainable encoder is part of the model; a frozen one is rebuilt exactly as for the store.
        self.encoder = None if info["trainable"] else build_encoder(
            info["name"], info["pretrained"], info["colour_stats"], precision=info["precision"],
            device=self.device.type)
        self.image_size = info["image_size"]
        self._preprocess = (self.encoder if self.encoder is not None else self.model.encoder).preprocess

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str = "best") -> "Predictor":
        return cls(Path(run_dir) / "checkpoints" / checkpoint)

    @torch.inference_mode()
    def features(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self._preprocess(im) for im in images]).to(self.device)
        return pixels if self.encoder is None else self.encoder(pixels)

    def caption(self, images: list[Image.Image], beam_size: int | None = None, n_best: int = 1,
                max_len: int | None = None) -> list[list[Prediction]]:
        """The ``n_best`` captions of every image, best first."""
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
