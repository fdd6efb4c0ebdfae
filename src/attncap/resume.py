"""What a resumed training run restores, refuses and replays; the state it saves.

:class:`TrainState` is the runtime state (epoch, step, position in the epoch, best score) saved
with every checkpoint, never in the config. :func:`restore` loads a checkpoint into the model,
optimizer, schedule and random generators, after :func:`check_resumable` has refused settings a
resumed run would silently ignore. :class:`MetricsLog` is cut back to the checkpoint's step, so
the replayed steps log their records once.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import load_model, load_state
from .config import RunConfig
from .distributed import Dist
from .errors import AttncapError
from .files import append_line, atomic_path, read_jsonl

Settings = tuple[tuple[str, tuple[str, ...]], ...]  # (config section, its keys) pairs


@dataclass
class TrainState:
    epoch: int = 0                 # epochs completed
    step: int = 0                  # optimizer steps taken
    batch_in_epoch: int = 0        # batches of the current epoch's plan already done
    epoch_loss: float = 0.0        # summed token cross-entropy of those batches (for the epoch's mean)
    epoch_tokens: int = 0          # and their number of tokens
    epoch_penalty: float = 0.0     # summed attention penalty of their captions
    epoch_captions: int = 0        # and their number of captions (SCST: of sampled captions)
    epoch_reward: float = 0.0      # SCST: summed reward of those sampled captions
    best_score: float = -1.0       # best validation CIDEr so far
    best_epoch: int = 0
    stale_epochs: int = 0          # epochs since the best
    seconds: float = 0.0           # training time so far (excluding this process's start-up)
    stopped: str = ""              # why training ended early, if it did
    preempted: str = ""            # the signal that stopped this process ("" if none); never saved

    def record_score(self, score: float) -> bool:
        """Count one more epoch validated with ``score``; returns whether it is the best so far."""
        self.epoch += 1
        if score > self.best_score:
            self.best_score, self.best_epoch, self.stale_epochs = score, self.epoch, 0
            return True
        self.stale_epochs += 1
        return False


class MetricsLog:
    """Append-only JSONL log plus TensorBoard scalars (when tensorboard is installed)."""

    def __init__(self, folder: Path, keep_until_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        self._truncate(keep_until_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(folder / "tb"))
        except ImportError:  # an optional extra: training goes on with the JSONL log alone
            print(f"note: no TensorBoard scalars (pip install 'attncap[tensorboard]' for them); "
                  f"metrics go to {self.path}", flush=True)
            self.tb = None

    def _truncate(self, step: int) -> None:
        """Drop records past the checkpoint we resume from (they will be produced again), and a
        torn last line left by a kill."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path, "training metrics log") if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict) -> None:
        append_line(self.path, json.dumps(record))
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's random generators (dropout draws from them), as tensors for state.pt."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_rank(cfg: RunConfig, dist: Dist) -> None:
    """Give ranks other than 0 their own random stream (dropout masks), rank 0 the one-process one."""
    if dist.rank > 0:
        torch.manual_seed(cfg.train.seed + dist.rank)


def restore(ckpt: Path, model, optimizer, scheduler, cfg: RunConfig, dist: Dist,
            fixed: Settings = (), applied: Settings = ()) -> TrainState:
    """Load ``ckpt`` into the model, optimizer and schedule; ``fixed`` and ``applied`` are more
    settings for :func:`check_resumable` (SCST's)."""
    saved = load_state(ckpt)
    try:
        resumed, _, ckpt_cfg, _ = load_model(ckpt)
    except AttncapError as exc:  # e.g. written by an older attncap whose model had other layers
        raise AttncapError(f"cannot resume from {ckpt}: {exc}; pass --no-resume to start over, or use "
                           "a new --run directory") from None
    if ckpt_cfg.model != model.cfg or resumed.vocab_size != model.vocab_size \
            or resumed.feature_dim != model.feature_dim:
        raise AttncapError(f"checkpoint {ckpt} was trained with another model, vocabulary or encoder; "
                           "pass --no-resume to start over, or use a new --run directory")
    check_resumable(ckpt, ckpt_cfg, cfg, dist, fixed, applied)
    model.load_state_dict(resumed.state_dict())
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved.get("rng") or [{"torch": saved["torch_rng"]}]  # older checkpoints: one process
    if len(rng) == dist.world_size:
        torch.set_rng_state(rng[dist.rank]["torch"])
        if "cuda" in rng[dist.rank] and dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng[dist.rank]["cuda"], dist.device)
    else:
        seed_rank(cfg, dist)
        if dist.is_main:
            print(f"note: {ckpt} was written by {len(rng)} process(es), this run has {dist.world_size}: "
                  "the data order continues exactly, random draws (dropout) do not", flush=True)
    fields = {f.name for f in dataclasses.fields(TrainState)}
    state = TrainState(**{k: v for k, v in json.loads(saved["train_state"]).items() if k in fields})
    state.preempted = ""
    return state


# Settings a resumed run cannot honour: the optimizer state restored from the checkpoint carries
# the old lr, encoder lr and weight decay, the saved position points into the old epoch plan, and
# the checkpoint's model file holds the weight average of the old decay (ema).
FIXED_ON_RESUME = ("lr", "encoder_lr", "weight_decay", "batch_size", "captions_per_image",
                   "group_captions", "seed", "ema")
# Encoder settings likewise: encoder.fine_tune decides which weights the model and Adam hold.
FIXED_ENCODER_ON_RESUME = ("fine_tune",)
# Settings a resumed run applies from the next step on: the run is no longer the uninterrupted one.
CHANGED_ON_RESUME = ("epochs", "warmup_steps", "min_lr_ratio", "grad_clip", "precision", "label_smoothing",
                     "ss_start", "ss_every", "ss_step", "ss_max")


def check_resumable(ckpt: Path, saved: RunConfig, cfg: RunConfig, dist: Dist, fixed: Settings = (),
                    applied: Settings = ()) -> None:
    """Refuse a resume whose changed settings would be ignored; note the ones applied from now on.

    ``fixed`` and ``applied`` add (section, keys) pairs to the training loop's own lists."""
    def changed(settings: Settings) -> list[str]:
        return [f"{section}.{k} {getattr(getattr(saved, section), k)!r} -> {getattr(getattr(cfg, section), k)!r}"
                for section, keys in settings for k in keys
                if getattr(getattr(saved, section), k) != getattr(getattr(cfg, section), k)]

    fixed = changed((("train", FIXED_ON_RESUME), ("encoder", FIXED_ENCODER_ON_RESUME), *fixed))
    if fixed:
        raise AttncapError(f"cannot resume from {ckpt} with {', '.join(fixed)}: a resumed run keeps the "
                           "checkpoint's optimizer and epoch plan; undo the change, or pass --no-resume "
                           "to start over with it")
    applied = changed((("train", CHANGED_ON_RESUME), *applied))
    if applied and dist.is_main:
        print(f"note: resuming with {', '.join(applied)}: applied from the next step on, so the run is "
              "no longer identical to an uninterrupted one", flush=True)
