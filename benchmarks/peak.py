"""The machine's matrix-multiply peak in FLOP/s (prints one JSON line).

    python benchmarks/peak.py                 # float32 on the CPU (and bf16 too on a GPU)
    python benchmarks/peak.py --device cuda

The other benchmarks report useful GFLOP/s; divided by this figure they read as a share of what
the hardware can do. Large square matmuls, best of several repeats, all threads.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def matmul_flops_per_s(n: int, dtype: torch.dtype, device: str, repeats: int) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul over ``repeats`` timed runs."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: thread pools, clocks, kernel selection
        a @ b
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=0, help="matrix size (default 2048 on CPU, 8192 on GPU)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    n = args.size or (8192 if args.device == "cuda" else 2048)
    result = {"benchmark": "peak", "device": args.device, "threads": torch.get_num_threads(), "size": n,
              "fp32_gflops_per_s": round(matmul_flops_per_s(n, torch.float32, args.device, args.repeats) / 1e9, 1)}
    if args.device == "cuda":
        result["bf16_gflops_per_s"] = round(
            matmul_flops_per_s(n, torch.bfloat16, args.device, args.repeats) / 1e9, 1)
        result["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
