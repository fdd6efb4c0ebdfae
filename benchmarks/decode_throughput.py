"""Decoding speed from cached features: batched beam search against one image at a time.

    python benchmarks/decode_throughput.py --beam 3 --batch 64                 # a COCO-sized model
    python benchmarks/decode_throughput.py --beam 3 --batch 64 --run runs/demo # a trained run's test split

Without ``--run`` the model is untrained and COCO-sized (64 regions x 2048, vocabulary 5001) and
captions run to ``--max-len`` words (an untrained model rarely emits <end>); with ``--run`` it is
the run's best checkpoint on its own test features, so captions stop where the model ends them.
The same images are decoded twice with the same code (``attncap.decoding.decode``): in batches of
``--batch`` and one by one. Prints one JSON line with captions/s for both and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from attncap.checkpoint import load_model
from attncap.config import ModelConfig
from attncap.dataset import CaptionSplit
from attncap.decoding import decode
from attncap.features import FeatureStore
from attncap.model import Captioner
from attncap.prepare import load_split


def trained(run: Path, images: int):
    """The run's best model and the features of its first ``images`` test images."""
    model, vocab, cfg, _ = load_model(run / "checkpoints" / "best")
    split = CaptionSplit(FeatureStore.open(run / "features", "test"), load_split(run / "data", "test"))
    _, features = next(split.image_batches(images))
    return model, features, vocab.start, vocab.end


def untrained(images: int, vocab: int, regions: int, dim: int):
    torch.manual_seed(0)
    model = Captioner(ModelConfig(), vocab, dim).eval()
    return model, torch.randn(images, regions, dim), 1, 2


def captions_per_s(model, features, start, end, beam, batch, max_len) -> float:
    started = time.perf_counter()
    for lo in range(0, len(features), batch):
        decode(model, features[lo:lo + batch], start, end, beam, max_len)
    return len(features) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=128, help="images decoded each way")
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--run", default="", help="a trained run directory (default: untrained COCO-sized model)")
    p.add_argument("--vocab", type=int, default=5001)
    p.add_argument("--regions", type=int, default=64)
    p.add_argument("--feature-dim", type=int, default=2048)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.run:
        model, features, start, end = trained(Path(args.run), args.images)
    else:
        model, features, start, end = untrained(args.images, args.vocab, args.regions, args.feature_dim)
    captions_per_s(model, features[:4], start, end, args.beam, args.batch, args.max_len)  # warm-up
    batched = captions_per_s(model, features, start, end, args.beam, args.batch, args.max_len)
    single = captions_per_s(model, features, start, end, args.beam, 1, args.max_len)
    print(json.dumps({
        "benchmark": "decode_throughput", "model": args.run or "untrained COCO-sized",
        "vocab": model.vocab_size, "regions": int(features.shape[1]), "beam": args.beam,
        "batch": args.batch, "images": len(features), "threads": torch.get_num_threads(),
        "batched_captions_per_s": round(batched, 1), "one_by_one_captions_per_s": round(single, 1),
        "speedup": round(batched / single, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
