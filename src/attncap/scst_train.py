"""Self-critical sequence training as a training phase after cross-entropy (``attncap train --scst``).

Starts from the run's cross-entropy checkpoint ``checkpoints/{scst.init}`` (best or latest) and
optimises the reward (CIDEr-D of the training references, plus ``scst.bleu4`` x BLEU-4) of
``scst.samples`` captions sampled per image by :func:`attncap.decoding.sample_n`, against the
baseline ``scst.baseline`` (:mod:`attncap.scst`). Every epoch is validated with beam-search
CIDEr (``decode.beam_size``), which also drives early stopping (``scst.patience``).

It reuses the cross-entropy loop's pieces (:mod:`attncap.train`, :mod:`attncap.resume`): the
:class:`~attncap.train.Trainer`, the same checkpoints with every rank's RNG state (dropout draws
from it; sampling from noise seeded by the step), stop signals and exact resume; it writes its own checkpoints
``checkpoints/scst_latest`` and ``scst_best`` (the cross-entropy ones stay) and its own log
``run_dir/scst/metrics.jsonl`` with TensorBoard scalars in ``run_dir/scst/tb``.

Data-parallel: each rank samples and scores its share of every batch of images, drawing its words
from its rows of noise shared by all ranks (:class:`~attncap.decoding.SharedNoise`), so the samples
are the one-process samples; the loss is normalised by the global number of sampled tokens and
the gradients summed over the ranks, so the update is the one-process update too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import config as config_lib
from . import train as train_lib
from .averaging import restore_average, weight_average
from .checkpoint import load_model, load_state
from .config import RunConfig
from .dataset import CaptionSplit
from .decoding import SharedNoise, greedy, options as decode_options, sample_n
from .distributed import Dist, StopSignals, process_group, threads_per_process
from .errors import AttncapError
from .features import FeatureStore
from .files import read_json, recover_folder, write_json
from .prepare import references
from .resume import MetricsLog, TrainState, restore, seed_rank
from .reward import CiderD
from .scst import advantages, scst_loss
from .train import Trainer
from .vocab import Vocab

NAMES = ("scst_latest", "scst_best")
# Settings a resumed SCST run cannot honour (Adam's state and the epoch plan carry them; bleu4 and
# entropy are the objective it optimises; ema, the weights it scores).
FIXED_ON_RESUME = ("lr", "batch_size", "samples", "baseline", "bleu4", "entropy", "ema")
# Settings a resumed SCST run applies from the next step on (scst.epochs moves only a cosine's end:
# at a constant lr more epochs are exact).
CHANGED_ON_RESUME = ("min_lr_ratio", "epochs")


@dataclass
class Reward:
    """CIDEr-D (cached document frequencies of the training references), plus ``bleu4`` x BLEU-4."""

    cider: CiderD
    ids: np.ndarray                  # (V,) model word id -> the scorer's word id
    vocab: Vocab
    refs: dict[int, list[str]]       # training references, for BLEU-4
    bleu4: float

    def __call__(self, image_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Reward of each row of model ids (M, L) (``<end>`` and 0 after the words): (M,) float64."""
        words = np.where((tokens > 0) & (tokens != self.vocab.end), self.ids[tokens], -1)
        reward = self.cider.score_ids(image_ids, words)
        if self.bleu4 > 0:
            reward = reward + self.bleu4 * self._bleu(image_ids, tokens)
        return reward

    def _bleu(self, image_ids: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        from pycocoevalcap.bleu.bleu import Bleu

        res = {k: [" ".join(self.vocab.decode(row))] for k, row in enumerate(tokens.tolist())}
        gts = {k: self.refs[int(i)] for k, i in enumerate(image_ids)}
        _, per_caption = Bleu(4).compute_score(gts, res, verbose=0)
        return np.asarray(per_caption[3], dtype=np.float64)


def build_reward(run_dir: Path, split: CaptionSplit, vocab: Vocab, bleu4: float, dist: Dist) -> Reward:
    """Rank 0 builds (or loads) the CIDEr-D cache ``run_dir/scst/cider_d.npz``; the others then load it."""
    refs = references(split.records)
    path = run_dir / "scst" / "cider_d.npz"
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        cider = CiderD.cached(path, refs)
    dist.barrier()
    if not dist.is_main:
        cider = CiderD.cached(path, refs)
    return Reward(cider, cider.word_ids(vocab.words), vocab, refs, bleu4)


def image_plan(images: int, epoch: int, seed: int, batch_size: int) -> list[np.ndarray]:
    """One epoch's batches of image positions, shuffled by (seed, epoch)."""
    order = np.random.default_rng([seed, epoch, 12]).permutation(images)
    return [order[lo:lo + batch_size] for lo in range(0, images, batch_size)]


def _grid(captions, width: int) -> np.ndarray:
    """Greedy captions -> model ids (B, width), 0 after each caption."""
    out = np.zeros((len(captions), width), dtype=np.int64)
    for k, c in enumerate(captions):
        out[k, :len(c.tokens)] = c.tokens
    return out


def _greedy_rewards(t: Trainer, feats: torch.Tensor, vocab: Vocab, reward: Reward, ids: np.ndarray
                    ) -> torch.Tensor:
    """Rennie's baseline: the reward of each image's greedy caption (eval mode: no dropout). (B,)"""
    d = t.cfg.decode
    t.model.eval()
    caps = greedy(t.model, feats, vocab.start, vocab.end, d.max_len, **decode_options(d, vocab.unk))
    t.model.train()
    return torch.from_numpy(reward(ids, _grid(caps, d.max_len)))


def scst_step(t: Trainer, split: CaptionSplit, vocab: Vocab, reward: Reward, index: np.ndarray
              ) -> dict[str, float] | None:
    """One optimizer step on this rank's share of a batch of images ``index``.

    Returns the global means (per sampled caption) of reward and baseline, per sampled token of
    entropy, and the loss; None when some rank has received a stop signal (no step is taken).
    """
    local, real = t.dist.shard(index)
    if t.dist.sum([float(bool(t.stop.received))])[0]:
        return None
    cfg, n, dev = t.cfg, t.cfg.scst.samples, t.dist.device
    feats = split.features(local).to(dev)
    ids = np.array([split.image_ids[i] for i in local])
    with torch.autocast(dev.type, torch.bfloat16, enabled=t.bf16):
        samples = sample_n(t.model, feats, vocab.start, vocab.end, n, cfg.decode.max_len,
                           noise=_noise(t, index, n), **decode_options(cfg.decode, vocab.unk))  # (B * n, L)
    rewards = torch.from_numpy(reward(np.repeat(ids, n), samples.tokens.cpu().numpy())).view(-1, n)
    greedy_r = _greedy_rewards(t, feats, vocab, reward, ids) if cfg.scst.baseline == "greedy" else None
    adv = advantages(rewards, cfg.scst.baseline, greedy_r)                         # (B * n,)
    mask = samples.tokens != 0                                                     # (B * n, L)
    weight = 1.0 if real else 0.0  # a stand-in share adds nothing
    local_tokens = int(mask.sum()) * weight
    raw = scst_loss(samples, adv.to(dev), cfg.scst.entropy)  # mean over this rank's sampled tokens
    tokens, *sums = t.dist.sum([local_tokens, float(raw.detach()) * local_tokens,
                                float(rewards.sum()) * weight,
                                float((rewards.reshape(-1) - adv).sum()) * weight,
                                float((samples.entropy.detach() * mask).sum()) * weight, len(adv) * weight])
    t.optimizer.zero_grad(set_to_none=True)
    (raw * (local_tokens / max(tokens, 1.0))).backward()   # the global mean over sampled tokens
    _sum_gradients(t.model, t.dist)
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), cfg.train.grad_clip)
    t.optimizer.step()
    if t.average is not None:
        t.average.update_parameters(t.model)
    t.scheduler.step()
    t.state.step += 1
    loss, reward_sum, baseline_sum, entropy_sum, count = sums
    return {"reward": reward_sum / count, "baseline": baseline_sum / count,
            "entropy": entropy_sum / max(tokens, 1.0), "scst_loss": loss / max(tokens, 1.0), "samples": count}


def _noise(t: Trainer, index: np.ndarray, n: int) -> SharedNoise:
    """This step's sampling noise, the same on every rank (seeded by train.seed and the step), and
    where this rank's rows start in it: samples do not depend on the number of processes."""
    seed = int(np.random.SeedSequence([t.cfg.train.seed, t.state.step, 12]).generate_state(1)[0])
    generator = torch.Generator(t.dist.device).manual_seed(seed)
    shares = np.array_split(index, t.dist.world_size)
    before = sum(len(share) for share in shares[:t.dist.rank]) if len(shares[t.dist.rank]) else 0  # stand-in
    return SharedNoise(generator, before * n, len(index) * n)


def _sum_gradients(model: torch.nn.Module, dist: Dist) -> None:
    """Sum every rank's gradients in one all-reduce. Not DDP: sampling calls the model's
    ``encode``/``step``, never its ``forward``, which DDP needs to see to synchronise."""
    if dist.world_size == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def scst_epoch(t: Trainer, split: CaptionSplit, vocab: Vocab, reward: Reward, plan: list[np.ndarray]
               ) -> float | None:
    """Run ``plan`` from ``state.batch_in_epoch`` on; the epoch's mean reward per sampled caption,
    or None when a stop signal ended it early (the state then points at the next batch)."""
    t.model.train()
    s = t.state
    bar = tqdm(total=len(plan), initial=s.batch_in_epoch, unit="batch", dynamic_ncols=True, leave=False,
               desc=f"scst epoch {s.epoch + 1}/{t.cfg.scst.epochs}",
               disable=not (t.progress and t.dist.is_main))
    for index in plan[s.batch_in_epoch:]:
        result = scst_step(t, split, vocab, reward, index)
        if result is None:
            bar.close()
            return None
        s.batch_in_epoch += 1
        s.epoch_reward += result["reward"] * result["samples"]
        s.epoch_captions += int(result["samples"])
        if t.log is not None and s.step % t.cfg.train.log_every == 0:
            t.log.write({"step": s.step, **{k: round(v, 5) for k, v in result.items() if k != "samples"},
                         "lr": t.scheduler.get_last_lr()[0]})
            bar.set_postfix(reward=f"{result['reward']:.3f}")
        bar.update()
    bar.close()
    mean = s.epoch_reward / max(1, s.epoch_captions)
    s.batch_in_epoch, s.epoch_reward, s.epoch_captions = 0, 0.0, 0
    return mean


def _end_epoch(t: Trainer, val_split: CaptionSplit, vocab: Vocab, mean_reward: float, started: float) -> bool:
    """Rank 0 validates with beam search, keeps the best score and logs; every rank takes its state."""
    s, cfg, improved = t.state, t.cfg, False
    if t.dist.is_main:
        scores = train_lib.evaluate(t.scored, val_split, vocab, cfg, t.dist.device, cfg.decode.beam_size)
        improved = s.record_score(scores["val_CIDEr"])
        s.seconds += time.time() - started
        s.stopped = _stop_reason(cfg, s) if s.epoch < cfg.scst.epochs else ""
        t.log.write({"epoch": s.epoch, "step": s.step, "reward": round(mean_reward, 5),
                     "val_loss": round(scores["val_loss"], 5), "val_CIDEr": round(scores["val_CIDEr"], 5),
                     "lr": t.scheduler.get_last_lr()[0], "time_s": round(s.seconds, 1)})
        if t.progress:
            print(f"scst epoch {s.epoch}: reward {mean_reward:.3f}  val CIDEr (beam {cfg.decode.beam_size}) "
                  f"{scores['val_CIDEr']:.3f}  ({time.time() - started:.0f} s)", flush=True)
    t.state = t.dist.broadcast(s)
    return improved


def _stop_reason(cfg: RunConfig, state: TrainState) -> str:
    """Why SCST should not start another epoch (early stopping, time budget), or ""."""
    if cfg.scst.patience and state.stale_epochs >= cfg.scst.patience:
        return f"no better val CIDEr for {state.stale_epochs} epochs (scst.patience)"
    if cfg.scst.max_minutes and state.seconds >= 60 * cfg.scst.max_minutes:
        return f"time budget of {cfg.scst.max_minutes} min reached (scst.max_minutes)"
    return ""


def _start_from(path: Path, model: torch.nn.Module) -> None:
    """Load the cross-entropy checkpoint SCST starts from into ``model``."""
    start, _, start_cfg, _ = load_model(path)
    if start_cfg.model != model.cfg or start.vocab_size != model.vocab_size \
            or start.feature_dim != model.feature_dim:
        raise AttncapError(f"checkpoint {path} was trained with another model, vocabulary or encoder "
                           "than this run's config; run `attncap train --scst` with the run's own config")
    model.load_state_dict(start.state_dict())


def _trainer(run_dir: Path, cfg: RunConfig, vocab: Vocab, store: FeatureStore, images: int, resume: bool,
             progress: bool, dist: Dist, stop: StopSignals) -> Trainer:
    """Model and Adam at ``scst.lr`` (constant, or a cosine down to ``lr * scst.min_lr_ratio`` over
    ``scst.epochs``) and the weight average (``scst.ema``): restored from ``scst_latest``, or the
    cross-entropy checkpoint."""
    model = train_lib.build_model(cfg, vocab, store, dist.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.scst.lr, weight_decay=cfg.train.weight_decay,
                                 fused=True)  # one pass per parameter, as in train.py
    steps = cfg.scst.epochs * -(-images // cfg.scst.batch_size)  # image_plan's batches of the training images
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, train_lib.lr_lambda(steps, 0, cfg.scst.min_lr_ratio))
    folder = run_dir / "checkpoints"
    latest = recover_folder(folder / NAMES[0])
    recover_folder(folder / NAMES[1])
    if resume and (latest / "state.pt").is_file():
        saved = read_json(latest / "config.json", "checkpoint config")["run"].get("scst", {})
        cosine = min(saved.get("min_lr_ratio", 1.0), cfg.scst.min_lr_ratio) < 1
        state = restore(latest, model, optimizer, scheduler, cfg, dist, fixed=(("scst", FIXED_ON_RESUME),),
                        applied=(("scst", CHANGED_ON_RESUME if cosine else ()),))
        average = weight_average(model, cfg.scst.ema)  # from the checkpoint's model file: the average
        restore_average(average, model, load_state(latest))
    else:
        _start_from(recover_folder(folder / cfg.scst.init), model)
        average = weight_average(model, cfg.scst.ema)
        state = TrainState()
        seed_rank(cfg, dist)
    if dist.is_main:
        write_json(run_dir / "config.json", config_lib.to_dict(cfg))
        where = f"; resuming epoch {state.epoch + 1} after batch {state.batch_in_epoch}" if state.step else ""
        print(f"self-critical training from checkpoints/{cfg.scst.init}: {dist.world_size} process(es), "
              f"{cfg.scst.batch_size} images x {cfg.scst.samples} samples per step, baseline "
              f"{cfg.scst.baseline}, lr {cfg.scst.lr:g}"
              + (f", entropy bonus {cfg.scst.entropy:g}" if cfg.scst.entropy else "")
              + (f", weight average (decay {cfg.scst.ema:g})" if average is not None else "")
              + where, flush=True)
    log = MetricsLog(run_dir / "scst", state.step) if dist.is_main else None
    bf16 = train_lib.bf16_enabled(cfg.train.precision, dist.device)
    return Trainer(cfg, model, model, optimizer, scheduler, state, dist, stop, log, progress, bf16, NAMES,
                   average)


def scst_train(run_dir: str | Path, cfg: RunConfig, resume: bool = True, progress: bool = True,
               device: str | None = None) -> TrainState:
    """Self-critical training of ``run_dir``'s model; resumes from ``checkpoints/scst_latest``.

    Under torchrun every process calls this. The returned state's ``preempted`` names the signal
    when one stopped the run (after a checkpoint).
    """
    run_dir = Path(run_dir)
    with process_group(device, cfg.train.dist_timeout_minutes) as dist, StopSignals() as stop:
        torch.set_num_threads(cfg.train.threads or threads_per_process(dist.local_world_size))
        vocab, stores, splits = train_lib.open_splits(run_dir)
        reward = build_reward(run_dir, splits["train"], vocab, cfg.scst.bleu4, dist)
        t = _trainer(run_dir, cfg, vocab, stores["train"], len(splits["train"]), resume, progress, dist, stop)
        encoder_info = stores["train"].encoder
        try:
            while t.state.epoch < cfg.scst.epochs:
                t.state.stopped = _stop_reason(cfg, t.state)
                if t.state.stopped:
                    break
                started = time.time()
                plan = image_plan(len(splits["train"]), t.state.epoch, cfg.train.seed, cfg.scst.batch_size)
                mean = scst_epoch(t, splits["train"], vocab, reward, plan)
                if mean is None:
                    train_lib.stop_for_signal(t, run_dir, vocab, encoder_info, started)
                    break
                improved = _end_epoch(t, splits["val"], vocab, mean, started)
                train_lib.write_checkpoints(t, run_dir, vocab, encoder_info, improved)
        finally:
            if t.log is not None:
                t.log.close()
        return t.state
