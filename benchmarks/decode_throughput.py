"""Decoding speed from cached features: batched beam search against one image at a time.

    python benchmarks/decode_throughput.py --beam 3 --batch 64                 # a COCO-sized model
    python benchmarks/decode_throughput.py --beam 3 --batch 64 --run runs/demo # a trained run's test split
    python benchmarks/decode_throughput.py --beam 3 --batch 64 --device cuda

Without ``--run`` the model is untrained and COCO-sized (64 regions x 2048, vocabulary 5001) and
captions run to ``--max-len`` words (an untrained model rarely emits <end>); with ``--run`` it is
the run's best checkpoint on its own test features, so captions stop where the model ends them.
The same images are decoded twice with the same code (``attncap.decoding.decode``): in batches of
``--batch`` and one by one, each the best of ``--repeats`` timed passes. Prints one JSON line with
captions/s both ways, the speed-up, useful GFLOP/s both ways and their share of the fp32 matmul
peak (``peak.py``'s measurement, taken in the same process right after the timings, or ``--peak``).

Useful FLOPs are the model's own count (``attncap.model.count_flops``, inference: multiply-add = 2,
matrix products only, no element-wise work) over the rows the decoder really had to compute:

    useful = 2 * (images * (R*D*P + R*P*A) + rows * (H*A + R*A + R*P + (E+P+H)*G + H*F + F*V))
    rows   = sum over steps t of (n_t * K)  -  (K - 1) * images

with R regions of D features, P projected, A attention, H hidden, E embedding, F fc, V vocabulary,
G = 3H (GRU) or 4H (LSTM), K the beam size and n_t the images of a batch still searching at step t
(the paper's variants add ``P*H`` per image for each state taken from the features and ``H`` per
row for the gate). Finished images leave the batch, so no padding rows are computed; the
``K - 1`` subtracted rows per image are the first step's copies (all K beams start as the same
hypothesis, the copies with score -inf), which are computed but not useful. Rows are counted from
the output layer's calls (a forward hook on ``fc2``), so the count is what ran, not an estimate.
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
from attncap.model import Captioner, count_flops
from attncap.prepare import load_split
from peak import matmul_flops_per_s


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


def timed_decode(model, features, start, end, beam, batch, max_len, sync) -> tuple[float, int]:
    """Seconds to decode every image in batches of ``batch``, and the useful rows stepped (see top)."""
    rows: list[int] = []
    hook = model.fc2.register_forward_hook(lambda module, inputs, output: rows.append(len(inputs[0])))
    useful = 0
    started = time.perf_counter()
    try:
        for lo in range(0, len(features), batch):
            part = features[lo:lo + batch]
            rows.clear()
            decode(model, part, start, end, beam, max_len)
            useful += sum(rows) - (rows[0] - len(part))  # the first step: one live row per image
        sync()
    finally:
        hook.remove()
    return time.perf_counter() - started, useful


def best_of(repeats: int, *args) -> tuple[float, int]:
    return min(timed_decode(*args) for _ in range(repeats))


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed passes each way; the best counts")
    p.add_argument("--peak", type=float, default=0.0,
                   help="fp32 peak in GFLOP/s for the shares (default: measure it as peak.py does)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    dev = torch.device(args.device)
    if args.run:
        model, features, start, end = trained(Path(args.run), args.images)
    else:
        model, features, start, end = untrained(args.images, args.vocab, args.regions, args.feature_dim)
    model, features = model.to(dev), features.to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    run = (model, features, start, end, args.beam)
    timed_decode(model, features[:4], start, end, args.beam, args.batch, args.max_len, sync)  # warm-up
    batched_s, batched_rows = best_of(args.repeats, *run, args.batch, args.max_len, sync)
    single_s, single_rows = best_of(args.repeats, *run, 1, args.max_len, sync)
    peak = args.peak or matmul_flops_per_s(8192 if dev.type == "cuda" else 2048, torch.float32,
                                           args.device, 10) / 1e9
    R, n = int(features.shape[1]), len(features)
    gflops = {name: count_flops(model, R, n, rows, training=False) / seconds / 1e9
              for name, seconds, rows in (("batched", batched_s, batched_rows),
                                          ("one_by_one", single_s, single_rows))}
    result = {
        "benchmark": "decode_throughput", "model": args.run or "untrained COCO-sized",
        "device": args.device, "vocab": model.vocab_size, "regions": R, "beam": args.beam,
        "batch": args.batch, "images": n, "max_len": args.max_len, "threads": torch.get_num_threads(),
        "batched_captions_per_s": round(n / batched_s, 1), "one_by_one_captions_per_s": round(n / single_s, 1),
        "speedup": round(single_s / batched_s, 1),
        "useful_rows_per_caption": round(batched_rows / n, 2),
        "gflop_per_caption": round(count_flops(model, R, n, batched_rows, training=False) / n / 1e9, 3),
        "batched_useful_gflops_per_s": round(gflops["batched"], 1),
        "one_by_one_useful_gflops_per_s": round(gflops["one_by_one"], 1),
        "peak_fp32_gflops_per_s": round(peak, 1),
        "batched_share_of_peak": round(gflops["batched"] / peak, 3),
        "one_by_one_share_of_peak": round(gflops["one_by_one"] / peak, 3)}
    if dev.type == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2 ** 20, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
