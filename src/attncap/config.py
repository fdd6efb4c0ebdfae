"""Typed configs that own their defaults, saved next to every run and checkpoint.

One frozen dataclass per component. A run's config is a :class:`RunConfig` made of them; it is
loaded from TOML/JSON files and overridden with ``section.key=value`` strings whose keys and types
are checked, so a typo is an error instead of a silently ignored setting.

Every setting carries its :class:`Rule` (range or choices) beside its default, and every section
checks its values when it is built: from the command line, a config file or Python alike, a bad
value is one :class:`AttncapError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from .errors import AttncapError

# Duplicated from encoders.ENCODERS and model.DECODERS (tests check they agree) so that reading a
# config never imports torch.
ENCODER_NAMES = ("inception_v3", "efficientnet_lite0", "resnet101", "small_cnn", "resnet101_sgrvinod")
DECODER_NAMES = ("gru", "lstm")
# The blocks encoder.fine_tune counts from the top, per encoder (encoders.trainable_blocks lists
# them; a test checks they agree). small_cnn has none: it always trains all its layers.
FINE_TUNE_BLOCKS = {"inception_v3": 12, "efficientnet_lite0": 18, "resnet101": 5, "small_cnn": 0,
                    "resnet101_sgrvinod": 5}
# Pixels per grid cell of the encoders whose input size can change (encoder.image_size): their
# grid is image_size / stride. inception_v3's 299 px and sgrvinod's pooled 14x14 grid are fixed.
ENCODER_STRIDES = {"efficientnet_lite0": 32, "resnet101": 32, "small_cnn": 16}
# Region vector size of the encoders that can stop before their 1x1 head convolution (encoder.head
# = false): EfficientNet-Lite0's last block gives 320 channels, its head 1280.
HEADLESS_DIMS = {"efficientnet_lite0": 320}
PRECISIONS = ("fp32", "bf16", "auto")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
KINDS = {"int": int, "float": float, "str": str, "bool": bool}  # field annotations are strings here


@dataclass(frozen=True)
class Rule:
    """What one setting accepts besides its type: a range (numbers) or a set of choices (strings)."""

    lo: float | None = None       # smallest allowed value
    hi: float | None = None       # largest allowed value
    above: float | None = None    # values must be greater than this (exclusive lower bound)
    below: float | None = None    # values must be less than this (exclusive upper bound)
    choices: tuple[str, ...] = ()

    def accepts(self, value: Any, kind: type) -> bool:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if abs(value) < 2**1023 else math.inf
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            return False
        if kind is str:
            return not self.choices or value in self.choices
        if kind is bool:
            return True
        return (math.isfinite(value)
                and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
                and (self.above is None or value > self.above)
                and (self.below is None or value < self.below))

    def describe(self, kind: type) -> str:
        """The allowed values in words: "an integer from 1 to 50", "one of gru, lstm"."""
        if kind is bool:
            return "true or false"
        if kind is str:
            return f"one of {', '.join(self.choices)}" if self.choices else "a string"
        noun = "an integer" if kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            return f"{noun} from {_num(self.lo)} to {_num(self.hi)}"
        if self.hi is None and self.below is None and kind is float:
            noun = "a finite number"
        bounds = [f"{op} {_num(x)}" for op, x in
                  ((">=", self.lo), (">", self.above), ("<=", self.hi), ("<", self.below)) if x is not None]
        return " ".join([noun, " and ".join(bounds)]).strip()


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def setting(default: Any, lo: float | None = None, hi: float | None = None, *, above: float | None = None,
            below: float | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its default and its :class:`Rule`."""
    return field(default=default, metadata={"rule": Rule(lo, hi, above, below, choices)})


def field_kind(f: dataclasses.Field) -> type:
    return f.type if isinstance(f.type, type) else KINDS[f.type]


class Section:
    """Base of the section dataclasses: every value is checked against its rule when built."""

    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, kind, rule = getattr(self, f.name), field_kind(f), f.metadata["rule"]
            if not rule.accepts(value, kind):
                raise AttncapError(f"{self.section}.{f.name} must be {rule.describe(kind)}, got {value!r}")
            if kind is float:
                object.__setattr__(self, f.name, float(value))  # 1 from a file or Python means 1.0
        for key, holds, allowed in self.relations():
            if not holds:
                raise AttncapError(f"{self.section}.{key} must be {allowed}, got {getattr(self, key)!r}")

    def relations(self) -> Iterator[tuple[str, bool, str]]:
        """Cross-field rules: (key, whether it holds, what is allowed)."""
        return iter(())


@dataclass(frozen=True)
class DataConfig(Section):
    """Where images and captions come from, and how they become token ids."""

    section: ClassVar[str] = "data"
    dataset: str = setting("shapes", choices=("shapes", "coco"))  # built in, or a COCO-format captions JSON
    captions: str = setting("")        # COCO captions JSON (dataset="coco"); "" = unset
    images: str = setting("")          # image folder the JSON's file_name entries are relative to
    splits: str = setting("")          # optional split file; "" = a seeded split by image
    instances: str = setting("")       # COCO instances JSON(s), comma-separated, for CHAIR and grounding;
    #                                    "" = instances_X.json beside captions_X.json, or images/annotations/
    train_images: int = setting(4000, 1, 1_000_000)  # shapes-world train split size (dataset="shapes")
    val_images: int = setting(500, 1, 1_000_000)     # val/test sizes: shapes world, or seeded COCO split
    test_images: int = setting(500, 1, 1_000_000)
    shapes_image_size: int = setting(224, 64, 1024)  # pixels per side of a shapes-world image
    top_k: int = setting(20000, 1, 1_000_000)        # keep the top_k most frequent words (the seed's knob)
    min_count: int = setting(1, 1, 1_000_000)        # and only words seen at least this often
    num_examples: int = setting(0, 0, 10_000_000)    # only the first N training images; 0 = all (seed's knob)
    max_words: int = setting(40, 1, 500)             # longer training captions are cut to this many words
    seed: int = setting(0, 0, SEED_MAX)


@dataclass(frozen=True)
class EncoderConfig(Section):
    """The CNN whose last conv grid the decoder attends over."""

    section: ClassVar[str] = "encoder"
    name: str = setting("efficientnet_lite0", choices=ENCODER_NAMES)
    pretrained: bool = setting(True)        # False: random weights (only on explicit request)
    colour_stats: bool = setting(False)     # append a per-cell colour histogram to each region vector
    precision: str = setting("auto", choices=PRECISIONS)  # auto: bf16 where the hardware is fast at it
    batch_size: int = setting(8, 1, 4096)   # images per extraction batch: small ones keep a CPU's caches
    #                                         warm (docs/performance.md); raise it on a GPU
    workers: int = setting(2, 0, 256)       # JPEG decoding processes; 0 = decode in the main process
    threads: int = setting(0, 0, 1024)      # torch threads per process; 0 = cores / processes on this node
    fine_tune: int = setting(0, 0, max(FINE_TUNE_BLOCKS.values()))  # train the last N blocks with the
    #                                         decoder (store holds pixels); 0 = frozen features
    image_size: int = setting(0, 0, 4096)   # input side in pixels; 0 = the encoder's own (224 for
    #                                         efficientnet_lite0); a multiple of its stride (32)
    head: bool = setting(True)              # False: stop before the 1x1 head convolution (efficientnet_lite0:
    #                                         the last block's 320 channels instead of 1280)

    def relations(self) -> Iterator[tuple[str, bool, str]]:
        most = FINE_TUNE_BLOCKS[self.name]
        yield ("fine_tune", self.fine_tune <= most,
               f"from 0 to {most} with encoder {self.name} (its blocks; 0 = frozen, {most} = all)" if most
               else f"0 with encoder {self.name} (it always trains all its layers)")
        yield ("head", self.head or self.name in HEADLESS_DIMS,
               f"true with encoder {self.name} (it has no head convolution to drop)")
        if self.image_size:
            stride = ENCODER_STRIDES.get(self.name)
            yield ("image_size", bool(stride) and self.image_size % stride == 0 and self.image_size >= stride,
                   f"0 or a multiple of {stride} with encoder {self.name}" if stride
                   else f"0 (its input size is fixed) with encoder {self.name}")


@dataclass(frozen=True)
class ModelConfig(Section):
    """The decoder. Defaults are the seed's network; ``decoder="lstm"`` and friends the paper's."""

    section: ClassVar[str] = "model"
    decoder: str = setting("gru", choices=DECODER_NAMES)  # gru (seed) | lstm (Show, Attend and Tell)
    embed_dim: int = setting(256, 1, 8192)
    proj_dim: int = setting(256, 1, 8192)        # FC + ReLU over each region
    attention_dim: int = setting(512, 1, 8192)
    hidden_dim: int = setting(512, 1, 8192)
    fc_dim: int = setting(512, 1, 8192)          # fc1 before the vocabulary layer
    init_from_features: bool = setting(False)    # initial state from the mean region (paper), not zeros (seed)
    gate: bool = setting(False)                  # gating scalar beta on the context vector (paper)
    dropout: float = setting(0.0, 0.0, below=1.0)  # before the output layers (paper: 0.5)
    alpha_c: float = setting(0.0, 0.0, 100.0)    # doubly stochastic attention lambda (Xu et al. eq. 14:
    #                                              lambda * sum over regions per caption); 0 = off
    region_positions: bool = setting(False)      # learned projection of each region's (x, y) (demo: on)
    # sgrvinod's tutorial model (attncap import sgrvinod) sets the next five the other way
    project_regions: bool = setting(True)        # FC + ReLU over each region; false: raw regions (P = D)
    attention_score: str = setting("tanh", choices=("tanh", "relu"))  # v . tanh(..) (paper) | w . relu(..)
    gate_vector: bool = setting(False)           # with gate: a sigmoid per context channel, not a scalar
    output_layers: int = setting(2, 1, 2)        # 2: fc2(fc1(h)) (seed); 1: fc(dropout(h))
    init_activation: str = setting("tanh", choices=("tanh", "none"))  # on init_h/init_c (paper: tanh)

    def relations(self) -> Iterator[tuple[str, bool, str]]:
        yield ("region_positions", self.project_regions or not self.region_positions,
               "false when model.project_regions is false")


@dataclass(frozen=True)
class TrainConfig(Section):
    """The optimisation loop."""

    section: ClassVar[str] = "train"
    epochs: int = setting(20, 1, 10_000)         # the seed's EPOCHS
    batch_size: int = setting(32, 1, 8192)       # the seed's BATCH_SIZE
    lr: float = setting(1e-3, above=0.0, hi=1.0)
    encoder_lr: float = setting(1e-4, above=0.0, hi=1.0)  # the fine-tuned encoder blocks' (encoder.fine_tune)
    min_lr_ratio: float = setting(0.05, 0.0, 1.0)  # cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = setting(100, 0, 10_000_000)  # 0 = no warmup
    weight_decay: float = setting(0.0, 0.0, 1.0)   # Adam's L2 penalty; 0 = none
    grad_clip: float = setting(5.0, 0.0)           # gradient norm limit; 0 = no clipping
    captions_per_image: int = setting(1, 0, 1000)  # captions drawn per image per epoch; 0 = every caption
    group_captions: bool = setting(False)          # a batch holds whole images, each encoded once for
    #                                                all its drawn captions (self-critical's seq_per_img)
    patience: int = setting(4, 0, 10_000)          # early stop after this many epochs without a better val
    #                                                CIDEr; 0 = no early stopping
    max_minutes: float = setting(0.0, 0.0)         # stop after the epoch crossing this budget; 0 = no budget
    log_every: int = setting(25, 1, 10_000_000)    # steps between train-loss log records
    seed: int = setting(0, 0, SEED_MAX)
    threads: int = setting(0, 0, 1024)             # torch intra-op threads; 0 = cores / processes on the node
    dist_timeout_minutes: float = setting(30.0, above=0.0, hi=10080.0)  # torchrun: how long a rank waits for a
    #                                                dead or stuck peer (at most a week)
    precision: str = setting("auto", choices=PRECISIONS)  # bf16 = autocast; auto = bf16 on a GPU fast at it
    label_smoothing: float = setting(0.0, 0.0, below=1.0)  # target weight 1 - eps, eps spread over the
    #                                                vocabulary; 0 = plain cross-entropy
    ss_start: int = setting(0, 0, 10_000)        # scheduled sampling from this epoch on (1 = the first); 0 = off
    ss_every: int = setting(5, 1, 10_000)        # epochs between rises of the sampling probability
    ss_step: float = setting(0.05, 0.0, 1.0)     # the probability at ss_start, and each rise
    ss_max: float = setting(0.25, 0.0, 1.0)      # the probability at most
    ema: float = setting(0.0, 0.0, below=1.0)    # decay of a moving average of the weights, which
    #                                                validation and checkpoints use; 0 = none (averaging.py)


@dataclass(frozen=True)
class DecodeConfig(Section):
    """How captions are generated at evaluation and caption time."""

    section: ClassVar[str] = "decode"
    beam_size: int = setting(3, 1, 50)             # 1 = greedy
    max_len: int = setting(30, 1, 500)             # words at most
    min_len: int = setting(1, 1, 500)              # words at least: no <end> before (never an empty caption)
    length_penalty: float = setting(0.0, 0.0, 5.0)  # score / length**length_penalty; 0 = raw log-probability
    n_best: int = setting(1, 1, 50)                # captions kept per image, at most beam_size
    eval_batch_size: int = setting(64, 1, 4096)    # images per decoding batch
    threads: int = setting(0, 0, 1024)             # torch threads per process in evaluate; 0 = cores / processes
    allow_unk: bool = setting(False)               # False: <unk> is never emitted
    block_trigrams: bool = setting(False)          # no trigram twice in one caption (self-critical.pytorch)

    def relations(self) -> Iterator[tuple[str, bool, str]]:
        yield "n_best", self.n_best <= self.beam_size, f"<= decode.beam_size ({self.beam_size})"
        yield "min_len", self.min_len <= self.max_len, f"<= decode.max_len ({self.max_len})"


@dataclass(frozen=True)
class ScstConfig(Section):
    """Self-critical sequence training (``attncap train --scst``), after cross-entropy training."""

    section: ClassVar[str] = "scst"
    init: str = setting("best", choices=("best", "latest"))  # the cross-entropy checkpoint it starts from
    epochs: int = setting(10, 1, 10_000)
    lr: float = setting(5e-5, above=0.0, hi=1.0)   # Adam starts afresh
    min_lr_ratio: float = setting(1.0, 0.0, 1.0)   # 1 = constant lr; below: cosine to lr * this over the epochs
    batch_size: int = setting(16, 1, 8192)         # images per step (each with `samples` captions)
    samples: int = setting(5, 1, 100)              # captions sampled per image
    baseline: str = setting("mean", choices=("greedy", "mean"))  # greedy caption (Rennie) | mean of the
    #                                                image's other samples (Luo 2020)
    bleu4: float = setting(0.0, 0.0, 100.0)        # reward = CIDEr-D + bleu4 * BLEU-4; 0 = CIDEr-D only
    entropy: float = setting(0.0, 0.0, 100.0)      # loss -= entropy * mean entropy of the sampled
    #                                                tokens' distributions (keeps sampling spread); 0 = none
    patience: int = setting(3, 0, 10_000)          # early stop after this many epochs without a better
    #                                                beam-search val CIDEr; 0 = no early stopping
    max_minutes: float = setting(0.0, 0.0)         # stop after the epoch crossing this budget; 0 = none
    ema: float = setting(0.0, 0.0, below=1.0)      # decay of a moving average of the weights, which
    #                                                validation and checkpoints use; 0 = none (averaging.py)

    def relations(self) -> Iterator[tuple[str, bool, str]]:
        yield "samples", self.baseline != "mean" or self.samples >= 2, ">= 2 with scst.baseline \"mean\""


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    scst: ScstConfig = field(default_factory=ScstConfig)


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)  # section name -> its dataclass


def to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def _parse(value: Any, kind: type) -> Any:
    """A command-line string as the field's type; text that does not parse stays text (the rule says why)."""
    if not isinstance(value, str) or kind is str:
        return value
    text = value.strip().lower()
    if kind is bool:
        return {"true": True, "1": True, "yes": True, "on": True,
                "false": False, "0": False, "no": False, "off": False}.get(text, value)
    try:
        return kind(text)
    except ValueError:
        return value


def merge(cfg: RunConfig, updates: dict[str, dict[str, Any]], source: str = "config",
          from_text: bool = False) -> RunConfig:
    """Return ``cfg`` with ``{section: {key: value}}`` applied; unknown keys and bad values raise.

    ``from_text``: values are command-line strings to parse ("5", "true"); otherwise (files)
    they must already have the field's type. Every changed section is checked by its rules.
    """
    if not isinstance(updates, dict):
        raise AttncapError(f"{source}: must be a table of sections like {{\"train\": {{\"epochs\": 5}}}}, "
                           f"got {type(updates).__name__} {_short(updates)}")
    sections = {}
    for name, values in updates.items():
        if name not in SECTIONS:
            raise AttncapError(f"{source}: unknown section [{name}]; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise AttncapError(f"{source}: [{name}] must be a table of settings, got {_short(values)}")
        kinds = {f.name: field_kind(f) for f in dataclasses.fields(SECTIONS[name])}
        for key in values:
            if key not in kinds:
                raise AttncapError(f"{source}: unknown setting {name}.{key}; known: {', '.join(kinds)}")
        changes = {k: _parse(v, kinds[k]) if from_text else v for k, v in values.items()}
        try:
            sections[name] = dataclasses.replace(getattr(cfg, name), **changes)
        except AttncapError as exc:
            raise AttncapError(f"{source}: {exc}") from None
    return dataclasses.replace(cfg, **sections)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(updates: dict[str, dict[str, Any]], base: RunConfig | None = None, from_text: bool = False
          ) -> str | None:
    """What :func:`merge` would reject in ``updates`` (its one-line message), or None if all is allowed."""
    try:
        merge(base or RunConfig(), updates, "config", from_text)
    except AttncapError as exc:
        return str(exc)
    return None


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
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # JSON/TOML syntax, not UTF-8, nesting too deep
        raise AttncapError(f"config file {path} cannot be parsed: {exc}") from None
    except OSError as exc:
        raise AttncapError(f"config file {path} cannot be read: {exc.strerror}") from None
    return merge(base or RunConfig(), data, source=str(path))


def from_dict(data: dict[str, dict[str, Any]], source: str = "config") -> RunConfig:
    return merge(RunConfig(), data, source=source)
