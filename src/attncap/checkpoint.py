"""Checkpoints are data: safetensors weights, JSON config and vocabulary, and a tensor-only state.

A checkpoint is a folder::

    model.safetensors   the captioner's weights (trainable encoder included)
    config.json         the run config, vocabulary size, feature size and encoder
    vocab.json          the vocabulary
    state.pt            (training checkpoints) optimizer, schedule, RNG states, epoch, step, best score

``state.pt`` holds only tensors, numbers and strings and is read with ``weights_only=True``,
so loading a checkpoint never runs code from disk. Folders are written beside their final name
and swapped in (:func:`attncap.files.atomic_folder`), so a crash leaves the previous checkpoint
intact, and there is no moment at which ``checkpoints/latest`` is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import config as config_lib
from .encoders import build_encoder
from .errors import AttncapError
from .files import atomic_folder, read_json, recover_folder, write_json
from .model import Captioner
from .vocab import Vocab


def save_checkpoint(path: str | Path, model: Captioner, vocab: Vocab, cfg: config_lib.RunConfig,
                    encoder: dict, state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint folder atomically (see module docstring)."""
    path = Path(path)
    with atomic_folder(path) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        write_json(tmp / "config.json", {"run": config_lib.to_dict(cfg), "vocab_size": len(vocab),
                                         "feature_dim": model.feature_dim, "encoder": encoder})
        vocab.save(tmp / "vocab.json")
        if state is not None:
            torch.save(state, tmp / "state.pt")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu"
               ) -> tuple[Captioner, Vocab, config_lib.RunConfig, dict]:
    """Rebuild the captioner from a checkpoint folder; returns (model in eval mode, vocab, config, encoder)."""
    path = recover_folder(path)
    if not (path / "model.safetensors").is_file():
        raise AttncapError(f"no checkpoint in {path} (model.safetensors missing); train first")
    meta = read_json(path / "config.json", "checkpoint config")
    try:
        cfg = config_lib.from_dict(meta["run"], source=str(path / "config.json"))
        encoder_info = meta["encoder"]
        vocab_size, feature_dim = int(meta["vocab_size"]), int(meta["feature_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AttncapError(f"checkpoint config {path / 'config.json'} is incomplete ({exc}); "
                           "re-train or restore it") from None
    vocab = Vocab.load(path / "vocab.json")
    if len(vocab) != vocab_size:
        raise AttncapError(f"checkpoint {path}: vocab.json has {len(vocab)} words, config says {vocab_size}")
    encoder = None
    if encoder_info.get("trainable"):
        # pretrained=False: a fine-tuned encoder's weights are in model.safetensors, never downloaded
        encoder = build_encoder(encoder_info["name"], pretrained=False,
                                colour_stats=encoder_info.get("colour_stats", False),
                                blocks=encoder_info.get("blocks"),
                                fine_tune_blocks=encoder_info.get("fine_tune", 0),
                                image_size=encoder_info.get("image_size", 0),
                                head=encoder_info.get("head", True))
    model = Captioner(cfg.model, vocab_size, feature_dim, encoder)
    try:
        weights = load_file(str(path / "model.safetensors"))
        model.load_state_dict(weights)
    except (SafetensorError, RuntimeError, OSError) as exc:
        reason = str(exc).splitlines()[0][:200]
        raise AttncapError(f"checkpoint weights {path / 'model.safetensors'} are corrupt or do not "
                           f"match its config ({reason})") from None
    return model.to(device).eval(), vocab, cfg, encoder_info


def load_state(path: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint folder, read without unpickling code."""
    file = recover_folder(path) / "state.pt"
    if not file.is_file():
        raise AttncapError(f"checkpoint {path} has no training state (state.pt)")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or unsafe file
        raise AttncapError(f"training state {file} cannot be read ({str(exc).splitlines()[0][:200]})") from None
