"""Feature extraction speed, CPU use and memory: JPEG files to the feature store (one JSON line).

    python benchmarks/feature_throughput.py --encoder efficientnet_lite0 --images runs/demo/dataset/images
    python benchmarks/feature_throughput.py --encoder inception_v3 --no-pretrained --images DIR --limit 500

Runs the real extraction (``attncap.features.extract_features``: worker processes decode and
resize JPEGs while the main process runs the encoder) into a temporary store, and reports:
images/s; cores busy (CPU seconds of the main process and the decoding workers per wall second:
2.0 means both cores of this machine never idle); the time the same images take to decode alone
and to encode alone, whose sum over the wall time shows how much the two overlap; the store's
bytes per image; the peak resident memory of the main process and of a worker. Run it for two
``--limit``s to see that memory does not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from attncap.config import EncoderConfig
from attncap.encoders import build_encoder
from attncap.features import ImageItem, extract_features, image_loader


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decode_only(items, image_size: int, batch_size: int, workers: int) -> float:
    """Seconds to decode and resize every image with the extractor's loader, and nothing else."""
    started = time.perf_counter()
    for _ in image_loader(items, image_size, batch_size, workers):
        pass
    return time.perf_counter() - started


@torch.inference_mode()
def encode_only(encoder, n: int, batch_size: int) -> float:
    """Seconds the encoder alone takes for ``n`` images (already decoded pixels)."""
    size = encoder.spec.image_size
    pixels = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8)
    encoder(pixels)  # warm-up
    started = time.perf_counter()
    for lo in range(0, n, batch_size):
        encoder(pixels[: min(batch_size, n - lo)])
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of JPEG/PNG images")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--no-pretrained", action="store_true", help="random encoder weights")
    p.add_argument("--colour-stats", action="store_true")
    p.add_argument("--no-head", action="store_true", help="stop before the encoder's head convolution (encoder.head)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--batch-size", type=int, default=EncoderConfig().batch_size)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-parts", action="store_true", help="skip the decode-only and encode-only timings")
    args = p.parse_args(argv)
    files = sorted(f for f in Path(args.images).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    items = [ImageItem(i, str(f)) for i, f in enumerate(files[: args.limit])]
    encoder = build_encoder(args.encoder, pretrained=not args.no_pretrained,
                            colour_stats=args.colour_stats, precision=args.precision, head=not args.no_head)
    with tempfile.TemporaryDirectory() as out:
        cpu, started = cpu_seconds(), time.perf_counter()
        store = extract_features(encoder, items, out, "bench", pretrained=not args.no_pretrained,
                                 batch_size=args.batch_size, workers=args.workers, progress=False)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        nbytes = store.array.nbytes
    # ru_maxrss is in KiB on Linux; children are the JPEG-decoding workers
    result = {"benchmark": "feature_throughput", "encoder": args.encoder, "dim": encoder.spec.dim,
              "precision": encoder.precision,
              "images": len(items), "threads": torch.get_num_threads(), "workers": args.workers,
              "seconds": round(seconds, 1), "images_per_s": round(len(items) / seconds, 1),
              "cores_busy": round(cpu / seconds, 2), "bytes_per_image": nbytes // max(1, len(items)),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}
    if not args.skip_parts:
        decode_s = decode_only(items, encoder.spec.image_size, args.batch_size, args.workers)
        encode_s = encode_only(encoder, len(items), args.batch_size)
        result.update(decode_only_s=round(decode_s, 1), encode_only_s=round(encode_s, 1),
                      overlap=round((decode_s + encode_s) / seconds, 2))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
