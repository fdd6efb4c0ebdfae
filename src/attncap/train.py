"""The training loop: teacher forcing on cached features, validation every epoch, exact resume.

Phases are named functions: :func:`train_one_epoch` (made of :func:`train_step`) and
:func:`evaluate`. Runtime state (epoch, step, position in the epoch, best score) lives in
:class:`TrainState`, saved with every checkpoint, never in the config. Writes
``run_dir/checkpoints/{latest,best}``, ``run_dir/train/metrics.jsonl`` and TensorBoard scalars in
``run_dir/train/tb``.

Data-parallel: under torchrun each process takes its share of every planned batch, so the global
batch stays ``train.batch_size`` and the learning rate stays ``train.lr`` whatever the world size;
rank 0 alone logs, evaluates and writes checkpoints (see :mod:`attncap.distributed`). SIGTERM or
SIGUSR1 stops every rank after the same step; rank 0 then writes a checkpoint that resumes at
exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from . import config as config_lib
from . import metrics
from .averaging import average_state, restore_average, weight_average
from .checkpoint import load_state, save_checkpoint
from .config import RunConfig, TrainConfig
from .dataset import CaptionSplit, prefetch
from .decoding import decode_split, options as decode_options
from .distributed import Dist, StopSignals, process_group, threads_per_process
from .encoders import build_encoder
from .errors import AttncapError
from .features import FeatureStore
from .files import read_jsonl, recover_folder, write_json
from .finetune import check_store, fine_tuned, param_groups
from .model import Captioner, caption_loss, loss_terms
from .prepare import load_split, references
from .resume import MetricsLog, TrainState, restore, rng_state, seed_rank
from .vocab import Vocab


@dataclass
class Trainer:
    """What one training process holds; the phases below read and update it."""

    cfg: RunConfig
    model: Captioner               # the bare model (its weights, or their average: `scored`, below)
    net: torch.nn.Module           # what the training step runs: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    dist: Dist
    stop: StopSignals
    log: MetricsLog | None         # rank 0 only
    progress: bool
    bf16: bool                     # bf16 autocast for the training step (train.precision)
    names: tuple[str, str] = ("latest", "best")  # its checkpoint folders (SCST: scst_latest, scst_best)
    average: AveragedModel | None = None  # moving average of the weights (train.ema, scst.ema)

    @property
    def scored(self) -> Captioner:
        """The weights validation scores and checkpoints hold: the average when there is one."""
        return self.model if self.average is None else self.average.module


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up then cosine decay to ``min_ratio`` of the base learning rate."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def sample_probability(cfg: TrainConfig, epoch: int) -> float:
    """Scheduled sampling's probability in epoch ``epoch`` (0 = the first): ``ss_step`` from epoch
    ``ss_start`` (counted from 1) on, one more ``ss_step`` every ``ss_every`` epochs, at most ``ss_max``."""
    if cfg.ss_start == 0 or epoch + 1 < cfg.ss_start:
        return 0.0
    return min(cfg.ss_max, cfg.ss_step * (1 + (epoch + 1 - cfg.ss_start) // cfg.ss_every))


def load_batch(t: Trainer, split: CaptionSplit, pairs: np.ndarray) -> tuple:
    """This rank's share of a planned batch, gathered (and pinned for a GPU) ahead of its step."""
    local, real = t.dist.shard(pairs)
    batch = split.batch(local)
    return pairs, local, real, batch.pin() if t.dist.device.type == "cuda" else batch


def train_step(t: Trainer, loaded: tuple) -> tuple[float, float, int] | None:
    """One optimizer step on this rank's share of a planned batch (from :func:`load_batch`).

    Returns (the batch's cross-entropy per token, its attention penalty per caption, its tokens),
    all global; None when some rank has received a stop signal (every rank then skips the step, as
    they agree in one all-reduce). Each rank divides its summed token loss by the global token
    count and its summed penalty by the global caption count, so the ranks' losses add up to the
    one-process loss; DDP averages gradients, so the backward pass is scaled by the world size.
    """
    pairs, local, real, batch = loaded
    local_tokens = int((batch.targets != 0).sum()) if real else 0  # counted on the CPU: no GPU sync
    stop, tokens = t.dist.sum([float(bool(t.stop.received)), local_tokens])
    if stop:
        return None
    batch = batch.to(t.dist.device)
    # Scheduled sampling draws from this rank's generator (saved with the checkpoint); 0 = teacher forcing.
    sample_prob = sample_probability(t.cfg.train, t.state.epoch)
    with torch.autocast(t.dist.device.type, torch.bfloat16, enabled=t.bf16):
        output = t.net(batch.features, batch.inputs, sample_prob=sample_prob, images=batch.images)
        terms = loss_terms(output, batch.targets, t.cfg.model.alpha_c, t.cfg.train.label_smoothing,
                           tokens=tokens, captions=len(pairs))
    weight = 1.0 if real else 0.0  # a stand-in share adds nothing
    t.optimizer.zero_grad(set_to_none=True)
    (terms.total * (weight * t.dist.world_size)).backward()
    if t.cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.train.grad_clip)
    t.optimizer.step()
    if t.average is not None:
        t.average.update_parameters(t.model)
    t.scheduler.step()
    t.state.step += 1
    ce, penalty = t.dist.sum((torch.stack([terms.ce, terms.penalty]).detach().float() * weight).tolist())
    return ce, penalty, int(tokens)


def train_one_epoch(t: Trainer, split: CaptionSplit, plan: list[np.ndarray]) -> tuple[float, float] | None:
    """Run ``plan`` from ``state.batch_in_epoch`` on; returns the epoch's mean cross-entropy per
    token and mean attention penalty per caption.

    Returns None when a stop signal ended the epoch early: the state then points at the next batch.
    """
    t.net.train()
    s = t.state
    bar = tqdm(total=len(plan), initial=s.batch_in_epoch, unit="batch", dynamic_ncols=True,
               desc=f"epoch {s.epoch + 1}/{t.cfg.train.epochs}", leave=False,
               disable=not (t.progress and t.dist.is_main))
    for loaded in prefetch(plan[s.batch_in_epoch:], lambda pairs: load_batch(t, split, pairs)):
        result = train_step(t, loaded)
        if result is None:
            bar.close()
            return None
        loss, penalty, tokens = result
        s.batch_in_epoch += 1
        s.epoch_loss += loss * tokens
        s.epoch_tokens += tokens
        s.epoch_penalty += penalty * len(loaded[0])
        s.epoch_captions += len(loaded[0])
        if t.log is not None and s.step % t.cfg.train.log_every == 0:
            t.log.write({"step": s.step, "train_loss": round(loss, 5), **_penalty(t.cfg, penalty),
                         "lr": t.scheduler.get_last_lr()[0]})
            bar.set_postfix(loss=f"{loss:.3f}")
        bar.update()
    bar.close()
    mean = (s.epoch_loss / max(1, s.epoch_tokens), s.epoch_penalty / max(1, s.epoch_captions))
    s.batch_in_epoch, s.epoch_loss, s.epoch_tokens, s.epoch_penalty, s.epoch_captions = 0, 0.0, 0, 0.0, 0
    return mean


def _penalty(cfg: RunConfig, penalty: float) -> dict[str, float]:
    """The attention penalty for a log record, beside the cross-entropy; nothing when it is off."""
    return {"train_penalty": round(penalty, 5)} if cfg.model.alpha_c > 0 else {}


@torch.inference_mode()
def evaluate(model: Captioner, split: CaptionSplit, vocab: Vocab, cfg: RunConfig, device,
             beam_size: int = 1) -> dict[str, float]:
    """Validation loss (one fixed caption per image) and the CIDEr of every image's caption decoded
    with ``beam_size`` (1 = greedy, cross-entropy training; SCST validates with decode.beam_size)."""
    model.eval()
    total, tokens = 0.0, 0
    for pairs in split.epoch_plan(0, cfg.train.seed, cfg.decode.eval_batch_size, 1):
        batch = split.batch(pairs).to(device)
        loss, ntok = caption_loss(model(batch.features, batch.inputs, images=batch.images), batch.targets)
        total += float(loss) * int(ntok)
        tokens += int(ntok)
    d = cfg.decode
    decoded = decode_split(model, split, vocab, beam_size, d.max_len, d.length_penalty if beam_size > 1
                           else 0.0, d.eval_batch_size, device,
                           progress=False, **decode_options(d, vocab.unk))
    candidates = {image_id: x["caption"] for image_id, x in decoded.items()}
    refs = references(split.records)
    return {"val_loss": total / max(1, tokens), "val_CIDEr": metrics.cider(refs, candidates)}


def build_model(cfg: RunConfig, vocab: Vocab, store: FeatureStore, device) -> Captioner:
    """The captioner to train: with a trainable encoder over the store's pixels (``small_cnn`` from
    seeded random weights; a fine-tuned one from its pretrained weights, see :mod:`attncap.finetune`)."""
    torch.manual_seed(cfg.train.seed)
    info = store.encoder
    check_store(cfg, info, str(store.path))
    encoder = None
    if info["trainable"]:
        blocks = info.get("fine_tune", 0)
        encoder = build_encoder(info["name"], pretrained=bool(blocks) and info["pretrained"],
                                colour_stats=info["colour_stats"], fine_tune_blocks=blocks,
                                image_size=info.get("image_size", 0), head=info.get("head", True))
        if blocks:  # a fine-tuned encoder follows train.precision (small_cnn runs in float32)
            encoder.precision = "bf16" if bf16_enabled(cfg.train.precision, torch.device(device)) else "fp32"
    dim = info["dim"]
    return Captioner(cfg.model, len(vocab), dim, encoder).to(device)


def train(run_dir: str | Path, cfg: RunConfig, resume: bool = True, progress: bool = True,
          device: str | None = None) -> TrainState:
    """Train on ``run_dir``'s prepared data and features; resume from ``checkpoints/latest``.

    Under torchrun every process calls this and joins the process group here. The returned state's
    ``preempted`` names the signal when one stopped the run (after a checkpoint).
    """
    run_dir = Path(run_dir)
    with process_group(device, cfg.train.dist_timeout_minutes) as dist, StopSignals() as stop:
        torch.set_num_threads(cfg.train.threads or threads_per_process(dist.local_world_size))
        # in a function of its own: the trainer and its DDP wrapper, which holds the process group,
        # are gone when the group is destroyed (see distributed.process_group)
        return _train(run_dir, cfg, resume, progress, dist, stop)


def _train(run_dir: Path, cfg: RunConfig, resume: bool, progress: bool, dist: Dist, stop: StopSignals
           ) -> TrainState:
    vocab, stores, splits = open_splits(run_dir)
    t = _trainer(run_dir, cfg, vocab, stores["train"], splits["train"], resume, progress, dist, stop)
    try:
        _run_epochs(t, splits, vocab, run_dir, stores["train"].encoder)
    finally:
        if t.log is not None:
            t.log.close()
    return t.state


def open_splits(run_dir: Path) -> tuple[Vocab, dict[str, FeatureStore], dict[str, CaptionSplit]]:
    """The run's vocabulary, and its train and val feature stores and caption splits."""
    vocab = Vocab.load(run_dir / "data" / "vocab.json")
    stores = {s: FeatureStore.open(run_dir / "features", s) for s in ("train", "val")}
    splits = {s: CaptionSplit(stores[s], load_split(run_dir / "data", s)) for s in stores}
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise AttncapError(f"{run_dir}: the train or val split has no image with features")
    return vocab, stores, splits


def _trainer(run_dir: Path, cfg: RunConfig, vocab: Vocab, store: FeatureStore, train_split, resume: bool,
             progress: bool, dist: Dist, stop: StopSignals) -> Trainer:
    """Model, optimizer and schedule, restored from ``checkpoints/latest`` when resuming."""
    model = build_model(cfg, vocab, store, dist.device)
    # fused: one pass over each parameter instead of about ten element-wise ops (28 -> 2.5 ms a step
    # for the demo's 2.6M parameters on an AVX2 CPU; docs/performance.md)
    optimizer = torch.optim.Adam(param_groups(model, cfg.train), lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay, fused=True)
    per_epoch = len(train_split.epoch_plan(0, cfg.train.seed, cfg.train.batch_size,
                                           cfg.train.captions_per_image, cfg.train.group_captions))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        per_epoch * cfg.train.epochs, cfg.train.warmup_steps, cfg.train.min_lr_ratio))
    latest = recover_folder(run_dir / "checkpoints" / "latest")
    recover_folder(run_dir / "checkpoints" / "best")
    if resume and (latest / "state.pt").is_file():
        state = restore(latest, model, optimizer, scheduler, cfg, dist)
        average = weight_average(model, cfg.train.ema)  # from the checkpoint's model file: the average
        restore_average(average, model, load_state(latest))
    else:
        average = weight_average(model, cfg.train.ema)
        state = TrainState()
        seed_rank(cfg, dist)
        if resume and dist.is_main and read_jsonl(run_dir / "train" / "metrics.jsonl"):
            print(f"note: no checkpoint in {latest}, so training starts from scratch and "
                  "train/metrics.jsonl starts over", flush=True)
    if dist.is_main:  # only now: a refused resume leaves the run's config as it was
        write_json(run_dir / "config.json", config_lib.to_dict(cfg))
    bf16 = bf16_enabled(cfg.train.precision, dist.device)
    if dist.is_main:
        where = f"; resuming epoch {state.epoch + 1} after batch {state.batch_in_epoch}" if state.step else ""
        print(f"training: {dist.world_size} process(es) ({dist.backend or 'no process group'}, "
              f"{dist.device}), global batch {cfg.train.batch_size}, lr {cfg.train.lr:g}, "
              + (f"encoder lr {cfg.train.encoder_lr:g} (encoder.fine_tune {cfg.encoder.fine_tune}), "
                 if fine_tuned(model) else "") +
              f"{'bf16 autocast' if bf16 else 'float32'}, "
              + (f"weight average (decay {cfg.train.ema:g}), " if average is not None else "") +
              f"{per_epoch} steps per epoch{where}", flush=True)
    log = MetricsLog(run_dir / "train", state.step) if dist.is_main else None
    return Trainer(cfg, model, dist.wrap(model), optimizer, scheduler, state, dist, stop, log, progress, bf16,
                   average=average)


def bf16_enabled(precision: str, device: torch.device) -> bool:
    """train.precision: "auto" is bf16 autocast on a GPU that supports it, float32 elsewhere."""
    if precision not in ("auto", "bf16", "fp32"):
        raise AttncapError(f"train.precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def _run_epochs(t: Trainer, splits: dict[str, CaptionSplit], vocab: Vocab, run_dir: Path,
                encoder_info: dict) -> None:
    cfg = t.cfg
    while t.state.epoch < cfg.train.epochs:
        t.state.stopped = _stop_reason(cfg, t.state)
        if t.state.stopped:
            break
        started = time.time()
        plan = splits["train"].epoch_plan(t.state.epoch, cfg.train.seed, cfg.train.batch_size,
                                          cfg.train.captions_per_image, cfg.train.group_captions)
        losses = train_one_epoch(t, splits["train"], plan)
        if losses is None:
            stop_for_signal(t, run_dir, vocab, encoder_info, started)
            return
        improved = _end_epoch(t, splits["val"], vocab, losses, started)
        write_checkpoints(t, run_dir, vocab, encoder_info, improved)


def _end_epoch(t: Trainer, val_split: CaptionSplit, vocab: Vocab, losses: tuple[float, float],
               started: float) -> bool:
    """Rank 0 validates, keeps the best score and logs; every rank then takes rank 0's state.

    ``losses``: the epoch's cross-entropy per token (the quantity of val_loss) and attention penalty.
    Returns whether validation CIDEr improved (meaningful on rank 0, which writes checkpoints).
    """
    s, cfg, improved = t.state, t.cfg, False
    (train_loss, penalty), sample_prob = losses, sample_probability(cfg.train, s.epoch)
    if t.dist.is_main:
        scores = evaluate(t.scored, val_split, vocab, cfg, t.dist.device)
        improved = s.record_score(scores["val_CIDEr"])
        s.seconds += time.time() - started
        s.stopped = _stop_reason(cfg, s) if s.epoch < cfg.train.epochs else ""
        t.log.write({"epoch": s.epoch, "step": s.step, "train_loss": round(train_loss, 5),
                     **_penalty(cfg, penalty), **({"ss_prob": sample_prob} if cfg.train.ss_start else {}),
                     "val_loss": round(scores["val_loss"], 5), "val_CIDEr": round(scores["val_CIDEr"], 5),
                     "lr": t.scheduler.get_last_lr()[0], "time_s": round(s.seconds, 1)})
        if t.progress:
            print(f"epoch {s.epoch}: train loss {train_loss:.3f}  val loss {scores['val_loss']:.3f}  "
                  f"val CIDEr {scores['val_CIDEr']:.3f}  ({time.time() - started:.0f} s)", flush=True)
    t.state = t.dist.broadcast(s)
    return improved


def stop_for_signal(t: Trainer, run_dir: Path, vocab: Vocab, encoder_info: dict, started: float) -> None:
    """A rank got SIGTERM/SIGUSR1: checkpoint the exact position, then let the process exit."""
    s = t.state
    s.seconds += time.time() - started
    write_checkpoints(t, run_dir, vocab, encoder_info, improved=False)
    s.preempted = t.stop.received or "a signal to another rank"
    s.stopped = (f"{s.preempted} after step {s.step} (batch {s.batch_in_epoch} of epoch {s.epoch + 1}); "
                 "checkpoint written, run the same command to resume")
    if t.dist.is_main:
        print(f"stopped by {s.stopped}", flush=True)


def _stop_reason(cfg: RunConfig, state: TrainState) -> str:
    """Why training should not start another epoch (early stopping, time budget), or ""."""
    if cfg.train.patience and state.stale_epochs >= cfg.train.patience:
        return f"no better val CIDEr for {state.stale_epochs} epochs (train.patience)"
    if cfg.train.max_minutes and state.seconds >= 60 * cfg.train.max_minutes:
        return f"time budget of {cfg.train.max_minutes} min reached (train.max_minutes)"
    return ""


def write_checkpoints(t: Trainer, run_dir: Path, vocab: Vocab, encoder_info: dict, improved: bool) -> None:
    """Rank 0 writes ``latest`` (and ``best``) with every rank's RNG state; the others wait for it.
    With a weight average the model files hold the average, ``state.pt`` the live weights."""
    rng = t.dist.gather(rng_state(t.dist.device))
    if t.dist.is_main:
        state = {k: v for k, v in dataclasses.asdict(t.state).items() if k != "preempted"}
        saved = {"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
                 "rng": rng, "train_state": json.dumps(state), **average_state(t.average, t.model)}
        folder, (latest, best) = run_dir / "checkpoints", t.names
        if improved:  # before latest, the commit: a kill in between replays the epoch, best again
            save_checkpoint(folder / best, t.scored, vocab, t.cfg, encoder_info)
        save_checkpoint(folder / latest, t.scored, vocab, t.cfg, encoder_info, saved)
    t.dist.barrier()
