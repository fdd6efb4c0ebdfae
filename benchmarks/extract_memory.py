"""Peak memory and speed of feature extraction over N images (prints one JSON line).

    python benchmarks/extract_memory.py --images runs/demo/dataset/images --limit 500
    python benchmarks/extract_memory.py --images runs/demo/dataset/images --limit 5000

Run it for two sizes: the peak resident memory should not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from attncap.encoders import build_encoder
from attncap.features import ImageItem, extract_features


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of JPEG/PNG images")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--encoder", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    files = sorted(f for f in Path(args.images).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
    items = [ImageItem(i, str(f)) for i, f in enumerate(files[: args.limit])]
    encoder = build_encoder(args.encoder, precision="auto")
    with tempfile.TemporaryDirectory() as out:
        started = time.time()
        store = extract_features(encoder, items, out, "bench", batch_size=args.batch_size,
                                 workers=args.workers, progress=False)
        seconds = time.time() - started
        nbytes = store.array.nbytes
    # ru_maxrss is in KiB on Linux; children are the JPEG-decoding workers
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"encoder": args.encoder, "precision": encoder.precision, "images": len(items),
                      "seconds": round(seconds, 1), "images_per_s": round(len(items) / seconds, 1),
                      "store_mb": round(nbytes / 2**20, 1), "bytes_per_image": nbytes // max(1, len(items)),
                      "peak_rss_mb": round(main_mb, 1), "peak_worker_rss_mb": round(worker_mb, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
