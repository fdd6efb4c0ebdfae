"""Typed configs that own their defaults, saved next to every run and checkpoint.

One frozen dataclass per component. A run's config is a :class:`RunConfig` made of them; it is
loaded from TOML/JSON files and overridden with ``section.key=value`` strings whose keys and types
are checked, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AttncapError


@dataclass(frozen=True)
class DataConfig:
    """Where images and captions come from, and how they become token ids."""

    dataset: str = "shapes"          # "shapes" (built in) or "coco" (any COCO-format captions JSON)
    captions: str = ""               # COCO captions JSON (dataset="coco")
    images: str = ""                 # image folder the JSON's file_name entries are relative to
    splits: str = ""                 # optional split file; otherwise a seeded split by image
    train_images: int = 4000         # shapes-world size of the train split (dataset="shapes")
    val_images: int = 500            # val/test sizes: shapes world, or a seeded split of COCO data
    test_images: int = 500
    shapes_image_size: int = 224
    top_k: int = 20000               # keep the top_k most frequent words (the seed's knob)
    min_count: int = 1               # and only words seen at least this often
    num_examples: int = 0            # use only the first N training images; 0 = all (the seed's knob)
    max_words: int = 40              # longer training captions are cut to this many words
    seed: int = 0


@dataclass(frozen=True)
class EncoderConfig:
    """The CNN whose last conv grid the decoder attends over."""

    name: str = "efficientnet_lite0"  # inception_v3 | efficientnet_lite0 | resnet101 | small_cnn
    pretrained: bool = True           # False: random weights (only on explicit request)
    colour_stats: bool = False        # append a per-cell colour histogram to each region vector
    precision: str = "auto"           # fp32 | bf16 | auto (bf16 where the hardware is fast at it)
    batch_size: int = 32              # images per extraction batch
    workers: int = 2                  # JPEG decoding processes


@dataclass(frozen=True)
class ModelConfig:
    """The decoder. Defaults are the seed's network; ``decoder="lstm"`` and friends the paper's."""

    decoder: str = "gru"             # gru (seed) | lstm (Show, Attend and Tell)
    embed_dim: int = 256
    proj_dim: int = 256              # FC + ReLU over each region
    attention_dim: int = 512
    hidden_dim: int = 512
    fc_dim: int = 512                # fc1 before the vocabulary layer
    init_from_features: bool = False  # initial state from the mean region (paper) instead of zeros (seed)
    gate: bool = False               # gating scalar beta on the context vector (paper)
    dropout: float = 0.0             # before the output layers (paper: 0.5)
    alpha_c: float = 0.0             # doubly stochastic attention weight lambda (paper: 1.0)
    region_positions: bool = False   # add a learned projection of each region's (x, y) (demo: on)


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop."""

    epochs: int = 20                 # the seed's EPOCHS
    batch_size: int = 32             # the seed's BATCH_SIZE
    lr: float = 1e-3
    min_lr_ratio: float = 0.05       # cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    captions_per_image: int = 1      # captions drawn per image per epoch; 0 = every caption
    patience: int = 4                # early stop after this many epochs without a better val CIDEr
    max_minutes: float = 0.0         # stop after the epoch that crosses this budget; 0 = no budget
    log_every: int = 25              # steps between train-loss log records
    seed: int = 0
    threads: int = 0                 # torch intra-op threads; 0 = cores / processes on this node
    dist_timeout_minutes: float = 30.0  # torchrun: how long a rank waits for a dead or stuck peer
    precision: str = "auto"          # fp32 | bf16 (autocast) | auto (bf16 on a GPU that supports it)


@dataclass(frozen=True)
class DecodeConfig:
    """How captions are generated at evaluation and caption time."""

    beam_size: int = 3
    max_len: int = 30
    length_penalty: float = 0.0      # score / length**length_penalty; 0 = raw log-probability
    n_best: int = 1
    eval_batch_size: int = 64


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)  # section name -> its dataclass


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def _coerce(section: str, key: str, value: Any, kind: type, from_text: bool) -> Any:
    """Check (and for strings from the command line, parse) one value against its field type."""
    where = f"{section}.{key}"
    if from_text and isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise AttncapError(f"{where} must be true or false, got {value!r}")
        try:
            return kind(text)
        except ValueError:
            raise AttncapError(f"{where} must be {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AttncapError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def merge(cfg: RunConfig, updates: dict[str, dict[str, Any]], source: str = "config",
          from_text: bool = False) -> RunConfig:
    """Return ``cfg`` with ``{section: {key: value}}`` applied; unknown keys and wrong types raise.

    ``from_text``: values are command-line strings to parse ("5", "true"); otherwise (files)
    they must already have the field's type.
    """
    sections = {}
    for name, values in updates.items():
        if name not in SECTIONS:
            raise AttncapError(f"{source}: unknown section [{name}]; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise AttncapError(f"{source}: [{name}] must be a table of settings")
        klass = SECTIONS[name]
        hints = typing.get_type_hints(klass)
        current = getattr(cfg, name)
        changes = {}
        for key, value in values.items():
            if key not in hints:
                raise AttncapError(
                    f"{source}: unknown setting {name}.{key}; known: {', '.join(hints)}")
            changes[key] = _coerce(name, key, value, hints[key], from_text)
        sections[name] = dataclasses.replace(current, **changes)
    return dataclasses.replace(cfg, **sections)


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, str]]:
    """Turn ``["train.epochs=5", "model.decoder=lstm"]`` into ``{"train": {"epochs": "5"}, ...}``."""
    out: dict[str, dict[str, str]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise AttncapError(f"override {pair!r} must look like section.key=value, e.g. train.epochs=5")
        out.setdefault(section, {})[name] = value
    return out


def load(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a TOML or JSON config file on top of ``base`` (defaults if None)."""
    path = Path(path)
    if not path.is_file():
        raise AttncapError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AttncapError(f"config file {path} cannot be parsed: {exc}") from None
    return merge(base or RunConfig(), data, source=str(path))


def from_dict(data: dict[str, dict[str, Any]], source: str = "config") -> RunConfig:
    return merge(RunConfig(), data, source=source)
