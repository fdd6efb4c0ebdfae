"""The training loop: teacher forcing on cached features, validation every epoch, exact resume.

Phases are named functions: :func:`train_one_epoch` and :func:`evaluate`. Runtime state (epoch,
step, best score) lives in :class:`TrainState`, saved with every checkpoint, never in the config.
Writes ``run_dir/checkpoints/{latest,best}``, ``run_dir/train/metrics.jsonl`` and TensorBoard
scalars in ``run_dir/train/tb``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import metrics
from .checkpoint import load_model, load_state, save_checkpoint
from .config import RunConfig
from .dataset import CaptionSplit
from .decoding import decode_split
from .encoders import build_encoder
from .errors import AttncapError
from .features import FeatureStore
from .files import atomic_path
from .model import Captioner, caption_loss
from .prepare import load_split, references
from .vocab import Vocab


@dataclass
class TrainState:
    epoch: int = 0                 # epochs completed
    step: int = 0                  # optimizer steps taken
    best_score: float = -1.0       # best validation CIDEr so far
    best_epoch: int = 0
    stale_epochs: int = 0          # epochs since the best
    seconds: float = 0.0           # training time so far (excluding this process's start-up)
    stopped: str = ""              # why training ended early, if it did


class MetricsLog:
    """Append-only JSONL log plus TensorBoard scalars (when tensorboard is installed)."""

    def __init__(self, folder: Path, keep_until_step: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "metrics.jsonl"
        self._truncate(keep_until_step)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(folder / "tb"))
        except ImportError:
            self.tb = None

    def _truncate(self, step: int) -> None:
        """Drop records past the checkpoint we resume from (they will be produced again)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up then cosine decay to ``min_ratio`` of the base learning rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train_one_epoch(model, split: CaptionSplit, plan, optimizer, scheduler, cfg: RunConfig,
                    state: TrainState, log: MetricsLog, device, progress: bool) -> float:
    """One pass over ``plan``; returns the mean training loss per token."""
    model.train()
    total, tokens = 0.0, 0
    bar = tqdm(plan, desc=f"epoch {state.epoch + 1}/{cfg.train.epochs}", unit="batch",
               disable=not progress, dynamic_ncols=True, leave=False)
    for pairs in bar:
        batch = split.batch(pairs).to(device)
        output = model(batch.features, batch.inputs)
        loss, ntok = caption_loss(output, batch.targets, cfg.model.alpha_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        state.step += 1
        loss = loss.detach()
        total += float(loss) * int(ntok)
        tokens += int(ntok)
        if state.step % cfg.train.log_every == 0:
            log.write({"step": state.step, "train_loss": round(float(loss), 5),
                       "lr": scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{float(loss):.3f}")
    return total / max(1, tokens)


@torch.inference_mode()
def evaluate(model: Captioner, split: CaptionSplit, vocab: Vocab, cfg: RunConfig, device
             ) -> dict[str, float]:
    """Validation loss (one fixed caption per image) and greedy-decoding CIDEr over every image."""
    model.eval()
    total, tokens = 0.0, 0
    for pairs in split.epoch_plan(0, cfg.train.seed, cfg.decode.eval_batch_size, 1):
        batch = split.batch(pairs).to(device)
        loss, ntok = caption_loss(model(batch.features, batch.inputs), batch.targets)
        total += float(loss) * int(ntok)
        tokens += int(ntok)
    d = cfg.decode
    decoded = decode_split(model, split, vocab, 1, d.max_len, 0.0, d.eval_batch_size, device,
                           progress=False)
    candidates = {image_id: x["caption"] for image_id, x in decoded.items()}
    refs = references(split.records)
    return {"val_loss": total / max(1, tokens), "val_CIDEr": metrics.cider(refs, candidates)}


def _build(cfg: RunConfig, vocab: Vocab, store: FeatureStore, device) -> Captioner:
    torch.manual_seed(cfg.train.seed)
    info = store.encoder
    encoder = None
    if info["trainable"]:
        encoder = build_encoder(info["name"], pretrained=False, colour_stats=info["colour_stats"])
    dim = info["dim"]
    return Captioner(cfg.model, len(vocab), dim, encoder).to(device)


def _restore(ckpt: Path, model, optimizer, scheduler) -> TrainState:
    saved = load_state(ckpt)
    resumed, _, ckpt_cfg, _ = load_model(ckpt)
    if ckpt_cfg.model != model.cfg or resumed.vocab_size != model.vocab_size \
            or resumed.feature_dim != model.feature_dim:
        raise AttncapError(f"checkpoint {ckpt} was trained with another model, vocabulary or encoder; "
                           "pass --no-resume to start over, or use a new --run directory")
    model.load_state_dict(resumed.state_dict())
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    return TrainState(**json.loads(saved["train_state"]))


def train(run_dir: str | Path, cfg: RunConfig, resume: bool = True, progress: bool = True,
          device: str | None = None) -> TrainState:
    """Train on ``run_dir``'s prepared data and features; resume from ``checkpoints/latest``."""
    run_dir = Path(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    vocab = Vocab.load(run_dir / "data" / "vocab.json")
    stores = {s: FeatureStore.open(run_dir / "features", s) for s in ("train", "val")}
    train_split = CaptionSplit(stores["train"], load_split(run_dir / "data", "train"))
    val_split = CaptionSplit(stores["val"], load_split(run_dir / "data", "val"))
    if len(train_split) == 0 or len(val_split) == 0:
        raise AttncapError(f"{run_dir}: the train or val split has no image with features")
    model = _build(cfg, vocab, stores["train"], device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    per_epoch = len(train_split.epoch_plan(0, cfg.train.seed, cfg.train.batch_size,
                                           cfg.train.captions_per_image))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        per_epoch * cfg.train.epochs, cfg.train.warmup_steps, cfg.train.min_lr_ratio))
    latest = run_dir / "checkpoints" / "latest"
    state = TrainState()
    if resume and (latest / "state.pt").is_file():
        state = _restore(latest, model, optimizer, scheduler)
    log = MetricsLog(run_dir / "train", state.step)
    try:
        _run_epochs(model, train_split, val_split, vocab, optimizer, scheduler, cfg, state, log,
                    run_dir, stores["train"].encoder, device, progress)
    finally:
        log.close()
    return state


def _run_epochs(model, train_split, val_split, vocab, optimizer, scheduler, cfg, state, log,
                run_dir, encoder_info, device, progress) -> None:
    while state.epoch < cfg.train.epochs:
        state.stopped = _stop_reason(cfg, state)
        if state.stopped:
            break
        started = time.time()
        plan = train_split.epoch_plan(state.epoch, cfg.train.seed, cfg.train.batch_size,
                                      cfg.train.captions_per_image)
        train_loss = train_one_epoch(model, train_split, plan, optimizer, scheduler, cfg, state,
                                     log, device, progress)
        scores = evaluate(model, val_split, vocab, cfg, device)
        state.epoch += 1
        state.seconds += time.time() - started
        improved = scores["val_CIDEr"] > state.best_score
        if improved:
            state.best_score, state.best_epoch, state.stale_epochs = scores["val_CIDEr"], state.epoch, 0
        else:
            state.stale_epochs += 1
        state.stopped = _stop_reason(cfg, state) if state.epoch < cfg.train.epochs else ""
        record = {"epoch": state.epoch, "step": state.step, "train_loss": round(train_loss, 5),
                  "val_loss": round(scores["val_loss"], 5), "val_CIDEr": round(scores["val_CIDEr"], 5),
                  "lr": scheduler.get_last_lr()[0], "time_s": round(state.seconds, 1)}
        log.write(record)
        if progress:
            print(f"epoch {state.epoch}: train loss {train_loss:.3f}  val loss {scores['val_loss']:.3f}  "
                  f"val CIDEr {scores['val_CIDEr']:.3f}  ({time.time() - started:.0f} s)", flush=True)
        _checkpoint(run_dir, model, vocab, cfg, encoder_info, optimizer, scheduler, state, improved)


def _stop_reason(cfg: RunConfig, state: TrainState) -> str:
    """Why training should not start another epoch (early stopping, time budget), or ""."""
    if state.stale_epochs >= cfg.train.patience:
        return f"no better val CIDEr for {state.stale_epochs} epochs (train.patience)"
    if cfg.train.max_minutes and state.seconds >= 60 * cfg.train.max_minutes:
        return f"time budget of {cfg.train.max_minutes} min reached (train.max_minutes)"
    return ""


def _checkpoint(run_dir, model, vocab, cfg, encoder_info, optimizer, scheduler, state, improved):
    saved = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "train_state": json.dumps(dataclasses.asdict(state))}
    folder = run_dir / "checkpoints"
    save_checkpoint(folder / "latest", model, vocab, cfg, encoder_info, saved)
    if improved:
        save_checkpoint(folder / "best", model, vocab, cfg, encoder_info)
