"""Training speed of the real model: full steps (forward, backward, clipping, Adam) on random data.

    python benchmarks/train_throughput.py --decoder gru --batch 64 --vocab 5001 \\
        --lengths ../shared/bench/caption_lengths_coco_like.json --steps 50
    python benchmarks/train_throughput.py --decoder gru --lengths fixed:30 --steps 30
    python benchmarks/train_throughput.py --vocab 90 --batch 32 --regions 49 --feature-dim 1289 \\
        --model region_positions=true --model dropout=0.3 --model hidden_dim=256   # another model

Features are random (64 regions x 2048, as InceptionV3's 8x8 grid) and stored in float16 like the
feature store; caption lengths follow a JSON histogram of words per caption ({"words": {n: p}})
or are all T tokens long. Batches are cut with the training loop's length bucketing. Prints one
JSON line: captions/s, tokens/s and useful GFLOP/s (the model's own FLOP count over the time;
padding is not useful work).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from attncap import config as config_lib
from attncap.config import ModelConfig
from attncap.dataset import length_buckets, teacher_forcing
from attncap.errors import AttncapError
from attncap.model import Captioner, caption_loss, count_flops


def caption_lengths(spec: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Tokens per caption (words + <end>, the decoder's steps) for ``n`` captions."""
    if spec.startswith("fixed:"):
        return np.full(n, int(spec.split(":", 1)[1]))
    hist = json.loads(Path(spec).read_text())["words"]
    words = np.array([int(k) for k in hist])
    p = np.array(list(hist.values()), dtype=float)
    return rng.choice(words, n, p=p / p.sum()) + 1


def make_batches(lengths: np.ndarray, batch: int, vocab: int, rng: np.random.Generator):
    """Length-bucketed (inputs, targets) token batches, padded like the training loop's."""
    out = []
    for index in length_buckets(lengths, batch, rng):
        T = int(lengths[index].max())
        tokens = torch.zeros(len(index), T + 1, dtype=torch.long)
        for k, n in enumerate(lengths[index]):
            tokens[k, 0] = 1                                               # <start>
            tokens[k, 1:n] = torch.from_numpy(rng.integers(4, vocab, n - 1))
            tokens[k, n] = 2                                               # <end>
        out.append(teacher_forcing(tokens))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoder", choices=["gru", "lstm"], default="gru")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=5001)
    p.add_argument("--lengths", default="fixed:30", help="FILE (JSON histogram) or fixed:T")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--regions", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--captions-per-image", type=int, default=1,
                   help="rows of a batch that share an image, encoded once (train.group_captions)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                   help="a model setting other than the default, e.g. hidden_dim=256 (repeatable)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    dev = torch.device(args.device)

    paper = args.decoder == "lstm"
    cfg = ModelConfig(decoder=args.decoder, init_from_features=paper, gate=paper,
                      dropout=0.5 if paper else 0.0, alpha_c=1.0 if paper else 0.0)
    if any("=" not in kv for kv in args.model):
        p.error(f"--model takes KEY=VALUE, got {args.model}")
    try:
        changes = config_lib.parse_overrides([f"model.{kv}" for kv in args.model])
        cfg = config_lib.merge(config_lib.RunConfig(model=cfg), changes, source="--model", from_text=True).model
    except AttncapError as exc:
        p.error(str(exc))
    model = Captioner(cfg, args.vocab, args.feature_dim).to(dev).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)  # as attncap.train
    n = (args.steps + args.warmup) * args.batch
    batches = make_batches(caption_lengths(args.lengths, n, rng), args.batch, args.vocab, rng)
    pool = torch.randn(256, args.regions, args.feature_dim).half()         # the float16 store

    def step(k: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        share = args.captions_per_image
        rows = torch.from_numpy(rng.integers(0, len(pool), -(-len(inputs) // share)))
        features = pool[rows].to(dev, non_blocking=True).float()          # (I, R, D)
        images = torch.arange(len(inputs), device=dev) // share if share > 1 else None
        output = model(features, inputs.to(dev), images=images)
        loss, _ = caption_loss(output, targets.to(dev), cfg.alpha_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for k in range(args.warmup):
        step(k, *batches[k])
    sync()
    timed = batches[args.warmup:args.warmup + args.steps]
    start = time.perf_counter()
    for k, (inputs, targets) in enumerate(timed):
        step(k, inputs, targets)
    sync()
    seconds = time.perf_counter() - start
    captions = sum(len(i) for i, _ in timed)
    tokens = sum(int((t != 0).sum()) for _, t in timed)
    images = sum(-(-len(i) // args.captions_per_image) for i, _ in timed)
    flops = count_flops(model, args.regions, images, tokens, training=True)
    print(json.dumps({
        "benchmark": "train_throughput", "decoder": args.decoder, "device": args.device,
        "threads": torch.get_num_threads(), "batch": args.batch, "vocab": args.vocab,
        "captions_per_image": args.captions_per_image,
        "lengths": args.lengths, "steps": len(timed), "seconds": round(seconds, 2),
        "captions_per_s": round(captions / seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
        "gflop_per_caption": round(flops / captions / 1e9, 3),
        "useful_gflops_per_s": round(flops / seconds / 1e9, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
