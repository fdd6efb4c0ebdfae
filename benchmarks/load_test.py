"""Load test for ``attncap serve``: one client, then N concurrent clients, on 127.0.0.1.

Starts its own server (``attncap serve RUN --port FREE``) in a subprocess, waits for /health,
warms it up, runs one client for ``--seconds`` and then ``--clients`` clients for ``--seconds``,
stops the server and prints one JSON line:

    requests, ok, errors (non-200 answers + lost), status_5xx, lost (no answer at all),
    single / concurrent: requests, captions_per_s, p50_ms, p95_ms, mean_batch, max_batch,
    speedup (concurrent captions/s over single)

Each client posts shapes-world images (RUN/dataset/images, or --images DIR) one after another;
a request in flight at the deadline is waited for and counted. Everything is bounded: the
server gets ``--startup-timeout`` seconds to come up, each request ``--request-timeout``.

    .venv/bin/python benchmarks/load_test.py --run runs/demo --clients 8 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory, checkpoint or exported model folder")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    p.add_argument("--images", default=None, help="folder of images (default RUN/dataset/images)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument("--request-timeout", type=float, default=60.0)
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_images(folder: Path, limit: int = 32) -> list[bytes]:
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    if not files:
        sys.exit(f"error: no .jpg/.png images in {folder}; pass --images DIR")
    return [p.read_bytes() for p in files]


def start_server(args, port: int, log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "attncap.cli", "serve", args.run, "--port", str(port), "--quiet",
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            return httpx.get(f"{url}/health", timeout=2).json()
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


async def client(http: httpx.AsyncClient, url: str, images: list[bytes], offset: int, end: float,
                 records: list[dict]) -> None:
    """Post images one after another until ``end``; one record per request."""
    i = offset
    while time.monotonic() < end:
        started = time.monotonic()
        record = {"status": None, "batch": None}
        try:
            r = await http.post(f"{url}/caption", content=images[i % len(images)],
                                headers={"content-type": "application/octet-stream"})
            record["status"] = r.status_code
            if r.status_code == 200:
                record["batch"] = int(r.json()["timings"]["batch_size"])
        except httpx.HTTPError as exc:
            record["error"] = type(exc).__name__
        record["ms"] = (time.monotonic() - started) * 1000.0
        records.append(record)
        i += 1


async def phase(url: str, images: list[bytes], clients: int, seconds: float, timeout: float) -> dict:
    records: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        started = time.monotonic()
        end = started + seconds
        await asyncio.gather(*(client(http, url, images, k * 7, end, records) for k in range(clients)))
        elapsed = time.monotonic() - started
    return summarise(records, elapsed)


def summarise(records: list[dict], elapsed: float) -> dict:
    ok = [r for r in records if r["status"] == 200]
    ms = np.array([r["ms"] for r in ok]) if ok else np.zeros(1)
    batches = [r["batch"] for r in ok]
    return {"requests": len(records), "ok": len(ok),
            "lost": sum(r["status"] is None for r in records),
            "status_5xx": sum(r["status"] is not None and r["status"] >= 500 for r in records),
            "captions_per_s": round(len(ok) / elapsed, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "mean_batch": round(float(np.mean(batches)), 2) if batches else 0.0,
            "max_batch": max(batches, default=0), "seconds": round(elapsed, 2)}


def main(argv=None) -> int:
    args = parse_args(argv)
    images = read_images(Path(args.images) if args.images else Path(args.run) / "dataset" / "images")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = start_server(args, port, log)
        try:
            health = wait_healthy(url, proc, args.startup_timeout)
            asyncio.run(phase(url, images, 2, 1.0, args.request_timeout))  # warm-up, not counted
            single = asyncio.run(phase(url, images, 1, args.seconds, args.request_timeout))
            many = asyncio.run(phase(url, images, args.clients, args.seconds, args.request_timeout))
        except RuntimeError as exc:
            log.seek(0)
            print(f"error: {exc}\n{log.read()[-3000:]}", file=sys.stderr)
            return 1
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
    total = {k: single[k] + many[k] for k in ("requests", "ok", "lost", "status_5xx")}
    print(json.dumps({"clients": args.clients, "seconds": args.seconds, **total,
                      "errors": total["requests"] - total["ok"], "single": single, "concurrent": many,
                      "speedup": round(many["captions_per_s"] / max(single["captions_per_s"], 1e-9), 2),
                      "model": health["model"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
