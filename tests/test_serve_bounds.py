"""The server within bounds, over real HTTP on 127.0.0.1: memory budget, slow and vanishing
clients, shutdown, and a flood against a real `attncap serve` process whose memory is measured.

Nothing here sleeps and hopes: the model is held on a threading.Event where a test needs requests
to wait, and every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image

from attncap.images import load_image
from attncap.predict import Predictor
from attncap.serve import DecodePool, MemoryBudget, MicroBatcher, ServeLimits, background_server, create_app

ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 20.0


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor.from_run(trained_run)


@pytest.fixture(scope="module")
def picture(trained_run) -> Path:
    return sorted((trained_run / "dataset" / "images").glob("*.jpg"))[0]


class GatedPredictor:
    """The real predictor, but each model call is recorded and waits until the test opens ``gate``."""

    def __init__(self, inner: Predictor):
        self.inner, self.gate, self.entered, self.calls = inner, threading.Event(), threading.Event(), []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def caption_pixels(self, pixels, beam_size=None, *options):
        self.calls.append((len(pixels), beam_size))
        self.entered.set()
        if not self.gate.wait(DEADLINE_S):
            raise RuntimeError("the test never opened the gate")
        return self.inner.caption_pixels(pixels, beam_size, *options)


def _poll(url: str, done, what: str) -> dict:
    """GET /health until ``done(health)``; fails after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health", timeout=5).json()
        if done(health):
            return health
        time.sleep(0.02)  # the poll's pace, not a wait for something to happen
    raise AssertionError(f"{what}: not reached within {DEADLINE_S} s; /health says {health}")


def _head(length: int, query: str = "") -> bytes:
    return (f"POST /caption{query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=DEADLINE_S)


def _reply(sock: socket.socket) -> tuple[int, dict, dict]:
    """Read one whole HTTP response: (status, headers, JSON body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body)


def _post(url: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/caption", content=data, params=params, timeout=DEADLINE_S * 2)


def _noisy_jpeg(side: int, quality: int = 85) -> bytes:
    """A photo-like JPEG (gradients and noise) of side x side pixels."""
    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([(x / 8) % 256, (y / 8) % 256, ((x + y) / 16) % 256], -1)
    pixels = np.clip(base + np.random.default_rng(0).normal(0, 20, base.shape), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=quality)
    return out.getvalue()


# --- the parts on their own ------------------------------------------------------------------

def test_budget_refuses_with_503_when_full_and_413_when_a_request_never_fits():
    budget = MemoryBudget(100)
    first = budget.hold(60, "upload A")
    with pytest.raises(HTTPException) as full:
        budget.hold(50, "upload B")
    assert full.value.status_code == 503 and full.value.headers == {"Retry-After": "1"}
    assert full.value.detail.startswith("server busy:") and "upload B" in full.value.detail
    with pytest.raises(HTTPException) as never:
        budget.hold(101, "upload C")
    assert never.value.status_code == 413 and "--max-queue-mb" in never.value.detail
    first.resize(10)  # decoded: only the small model input is kept
    with budget.hold(50, "upload B"):
        assert budget.used == 60
    first.release()
    assert budget.used == 0 and budget.refused == 1


def test_decode_pool_refuses_past_its_workers_and_waiting_places():
    async def scenario():
        release = threading.Event()
        pool = DecodePool(workers=1, max_waiting=1)
        pool.start()
        running = [asyncio.ensure_future(pool.run(release.wait, DEADLINE_S)) for _ in range(2)]
        await asyncio.sleep(0)  # one loop turn: both are taken (one runs, one waits)
        with pytest.raises(HTTPException) as busy:
            await pool.run(release.wait, 0)
        release.set()
        assert await asyncio.gather(*running) == [True, True]
        pool.stop()
        return busy.value

    busy = asyncio.run(scenario())
    assert busy.status_code == 503 and busy.headers == {"Retry-After": "1"}


def test_batcher_close_answers_queued_and_collected_requests_while_the_running_batch_delivers():
    gate, entered, calls = threading.Event(), threading.Event(), []

    def run_batch(items, options):
        calls.append(list(items))
        entered.set()
        assert gate.wait(DEADLINE_S)
        return [f"{options}:{item}" for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=2, max_wait_ms=60_000)
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit("a", "beam1"))
        collected = asyncio.ensure_future(batcher.submit("b", "beam2"))  # same batch, later group
        assert await asyncio.to_thread(entered.wait, DEADLINE_S)
        queued = [asyncio.ensure_future(batcher.submit(x, "beam1")) for x in "cd"]
        await asyncio.sleep(0)
        assert batcher.waiting == 2 and batcher.collected == 2
        batcher.close()
        refused = await asyncio.wait_for(asyncio.gather(collected, *queued, return_exceptions=True), 5)
        assert not running.done()
        gate.set()
        await batcher.stop()
        late = await asyncio.gather(batcher.submit("e", "beam1"), return_exceptions=True)
        return (await running)[0], refused + late

    result, refused = asyncio.run(scenario())
    assert result == "beam1:a" and calls == [["a"]]
    assert all(isinstance(e, HTTPException) and e.status_code == 503 and "shutting down" in e.detail
               for e in refused), refused


# --- over HTTP --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(predictor):
    """A real-model server with a 2 s upload timeout."""
    app = create_app(predictor, ServeLimits(max_upload_bytes=2 * 1024 * 1024, upload_timeout_s=2.0))
    with background_server(app) as url:
        yield url


def test_queued_request_of_a_vanished_client_is_dropped_before_the_model(predictor, picture):
    gated = GatedPredictor(predictor)
    with background_server(create_app(gated, ServeLimits(max_batch=1, max_wait_ms=0))) as url:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(_post, url, picture.read_bytes())
            assert gated.entered.wait(DEADLINE_S)
            big = _noisy_jpeg(640)  # 640x640: a larger upload and image than the model's input
            with _connect(url) as sock:
                sock.sendall(_head(len(big)) + big)
                health = _poll(url, lambda h: h["waiting"] == 1, "the second request is queued")
                model_input = 3 * predictor.image_size ** 2
                assert health["held_bytes"] == 2 * model_input  # decoded once, cut to the model input
            _poll(url, lambda h: h["disconnected"] == 1 and h["held_bytes"] == model_input,
                  "the server noticed the client left")
            gated.gate.set()
            assert first.result(DEADLINE_S).status_code == 200
        health = _poll(url, lambda h: h["dropped"] == 1 and h["waiting"] == 0, "the job is dropped")
        assert health["batches"] == 1 and gated.calls == [(1, 2)]  # the vanished one never ran
        assert _post(url, picture.read_bytes()).status_code == 200 and len(gated.calls) == 2
        assert _poll(url, lambda h: h["held_bytes"] == 0, "all memory given back")["collected"] == 0


def test_clients_that_vanish_mid_upload_give_their_memory_back(server, picture):
    before = httpx.get(f"{server}/health", timeout=5).json()["disconnected"]
    for _ in range(10):
        with _connect(server) as sock:
            sock.sendall(_head(500_000) + b"\xff\xd8" * 500)
        assert httpx.get(f"{server}/health", timeout=5).json()["status"] == "ok"
    _poll(server, lambda h: h["disconnected"] == before + 10 and h["held_bytes"] == 0,
          "ten mid-upload disconnects noticed and their holds released")
    assert _post(server, picture.read_bytes()).status_code == 200


def test_slow_uploads_are_served_stalled_ones_get_408_and_others_are_answered(server, predictor,
                                                                              picture):
    data = picture.read_bytes()
    stalled = [_connect(server) for _ in range(3)]
    with contextlib.ExitStack() as stack:
        for sock in stalled:
            stack.enter_context(sock)
            sock.sendall(_head(len(data)) + data[:100])
        with _connect(server) as slow:  # the whole image, a few bytes at a time
            slow.sendall(_head(len(data)))
            for start in range(0, len(data), len(data) // 8 + 1):
                slow.sendall(data[start:start + len(data) // 8 + 1])
                assert httpx.get(f"{server}/health", timeout=5).status_code == 200
            status, _, body = _reply(slow)
        assert status == 200 and body["caption"] == predictor.caption(load_image(picture))[0][0].caption
        assert _post(server, data).status_code == 200  # while three uploads stall
        for sock in stalled:
            status, headers, body = _reply(sock)
            assert status == 408 and headers["content-type"] == "application/json"
            assert body["error"].startswith("upload not complete after 2 s")
    _poll(server, lambda h: h["held_bytes"] == 0, "stalled uploads released")


def test_shutdown_answers_every_waiting_request_and_the_running_batch_finishes(predictor, picture):
    gated = GatedPredictor(predictor)
    app = create_app(gated, ServeLimits(max_batch=2, max_wait_ms=60_000))
    data = picture.read_bytes()
    with contextlib.ExitStack() as server, contextlib.ExitStack() as sockets, ThreadPoolExecutor(5) as pool:
        url = server.enter_context(background_server(app))
        running = pool.submit(_post, url, data, beam_size=1)
        _poll(url, lambda h: h["collected"] == 1, "the first request is taken into a batch")
        collected = pool.submit(_post, url, data, beam_size=2)  # completes the batch, other group
        assert gated.entered.wait(DEADLINE_S)
        queued = [pool.submit(_post, url, data, beam_size=1) for _ in range(2)]
        _poll(url, lambda h: h["waiting"] == 2 and h["collected"] == 2, "two more requests queued")
        uploading = sockets.enter_context(_connect(url))  # and one upload that stalls half-way
        uploading.sendall(_head(len(data)) + data[:len(data) // 2])
        _poll(url, lambda h: h["held_bytes"] == 4 * 3 * predictor.image_size ** 2 + 2 * len(data),
              "the stalled upload is being read")
        stopping = pool.submit(server.close)  # uvicorn's graceful shutdown, as on Ctrl-C
        for answer in [collected.result(DEADLINE_S)] + [q.result(DEADLINE_S) for q in queued]:
            assert answer.status_code == 503 and "shutting down" in answer.json()["error"]
            assert answer.headers["retry-after"]
        status, headers, body = _reply(uploading)
        assert status == 503 and "shutting down" in body["error"] and headers["retry-after"]
        assert not running.done()  # still in the model
        gated.gate.set()
        assert running.result(DEADLINE_S).status_code == 200 and running.result().json()["caption"]
        stopping.result(DEADLINE_S)
    assert gated.calls == [(1, 1)]


# --- a flood against a real `attncap serve` process -------------------------------------------

FLOOD = 48                  # concurrent requests, six times --max-queue
FLOOD_BUDGET_MB = 48        # --max-queue-mb
DECODING_MB = 2 * 34        # --decode-workers 2, each decoding one such image at a time
FLOOD_SLACK_MB = 96         # the model's batch of 4 (about 40 MB), decode threads' malloc arenas,
                            # connection buffers


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    with open(f"/proc/{pid}/status") as fp:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in fp)
                if k in ("VmRSS", "VmHWM")}


@contextlib.contextmanager
def _serve_process(run: Path, log: Path, *flags: str):
    """``attncap serve RUN --port 0 FLAGS`` in a subprocess, its output into ``log``; yields (url, pid)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "attncap.cli", "serve", str(run), "--port", "0",
                                 "--quiet", *flags], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (match := re.search(r"http://127\.0\.0\.1:\d+", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, f"no server: {log.read_text()}"
            time.sleep(0.05)  # the poll's pace
        yield match.group(0), proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def _flood(url: str, data: bytes) -> tuple[list[httpx.Response], list[float]]:
    """FLOOD concurrent uploads, and /health asked back to back until they are all answered."""
    limits = httpx.Limits(max_connections=FLOOD + 1, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=DEADLINE_S * 2, limits=limits) as http:
        posts = asyncio.gather(*(http.post(f"{url}/caption", content=data) for _ in range(FLOOD)))
        health_ms: list[float] = []
        async with httpx.AsyncClient(timeout=5) as probe:
            flood = asyncio.ensure_future(posts)
            while not flood.done() and len(health_ms) < 2000:
                started = time.monotonic()
                assert (await probe.get(f"{url}/health")).json()["status"] == "ok"
                health_ms.append((time.monotonic() - started) * 1e3)
            return await flood, health_ms


def test_flood_past_the_queue_stays_within_memory_and_health_answers(trained_run, picture, tmp_path):
    data = _noisy_jpeg(2000)  # 1.5 MB upload; 4 megapixels, 34 MB at the peak of its decode
    flags = ["--max-queue", "8", "--max-queue-mb", str(FLOOD_BUDGET_MB), "--max-upload-mb", "4",
             "--max-batch", "4", "--decode-workers", "2"]
    with _serve_process(trained_run, tmp_path / "serve.log", *flags) as (url, pid):
        for body in (picture.read_bytes(), data):  # warm up: the model and one big decode
            assert httpx.post(f"{url}/caption", content=body, timeout=60).status_code == 200
        baseline = _status(pid)["VmRSS"]
        with open(f"/proc/{pid}/clear_refs", "w") as fp:
            fp.write("5")  # VmHWM := VmRSS, so it measures the flood alone
        answers, health_ms = asyncio.run(_flood(url, data))
        peak = _status(pid)["VmHWM"]
        health = httpx.get(f"{url}/health", timeout=5).json()
    statuses = [a.status_code for a in answers]
    busy = [a for a in answers if a.status_code == 503]
    assert set(statuses) == {200, 503}, statuses
    assert all(a.headers["retry-after"] and "server busy" in a.json()["error"] for a in busy)
    assert len(health_ms) >= 3 and max(health_ms) < 5000
    assert health["held_bytes"] == 0 and health["waiting"] == 0 and health["decoding"] == 0
    grown_mb = (peak - baseline) / 2**20
    print(f"flood: {statuses.count(200)} ok, {len(busy)} busy; RSS {baseline / 2**20:.0f} MB idle, "
          f"peak {peak / 2**20:.0f} MB (+{grown_mb:.0f} MB); /health max {max(health_ms):.0f} ms")
    assert grown_mb < FLOOD_BUDGET_MB + DECODING_MB + FLOOD_SLACK_MB


def test_serve_refuses_a_budget_smaller_than_two_uploads(trained_run, capsys):
    from attncap.cli import main

    assert main(["serve", str(trained_run), "--max-queue-mb", "8", "--max-upload-mb", "10"]) == 2
    assert "--max-queue-mb (8) must be at least twice --max-upload-mb (10)" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--decode-workers", "0"]) == 2
    assert "--decode-workers and --max-queue must be at least 1" in capsys.readouterr().err
