"""The caption server over real HTTP on 127.0.0.1: answers, batching, limits and bad requests."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import HTTPException

from attncap.images import load_image
from attncap.predict import Predictor
from attncap.serve import MicroBatcher, ServeLimits, background_server, create_app

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def predictor(trained_run) -> Predictor:
    return Predictor.from_run(trained_run)


@pytest.fixture(scope="module")
def server(predictor):
    app = create_app(predictor, ServeLimits(max_upload_bytes=LIMIT, max_pixels=5_000_000,
                                            max_wait_ms=20))
    with background_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def images(trained_run) -> list[Path]:
    return sorted((trained_run / "dataset" / "images").glob("*.jpg"))[:6]


def _png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels: tens of kilobytes on disk, 400 megapixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_caption_matches_the_predictor_with_attention_and_alternatives(server, predictor, images):
    expected = predictor.caption([load_image(images[0])], beam_size=2, n_best=2)[0]
    with open(images[0], "rb") as fp:
        r = httpx.post(f"{server}/caption", params={"beam_size": 2, "n_best": 2},
                       files={"image": (images[0].name, fp, "image/jpeg")}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"] == expected[0].caption and body["words"] == expected[0].words
    assert [a["caption"] for a in body["n_best"]] == [p.caption for p in expected]
    assert body["n_best"][0]["score"] >= body["n_best"][1]["score"]
    attention = np.array(body["attention"])  # (words, g, g)
    assert attention.shape == (len(body["words"]), body["grid"], body["grid"])
    np.testing.assert_allclose(attention.sum((1, 2)), 1.0, atol=1e-2)
    np.testing.assert_allclose(attention, expected[0].attention, atol=1e-4)
    assert body["image"] == {"width": 128, "height": 128}
    assert body["timings"]["batch_size"] >= 1 and body["timings"]["total_ms"] > 0
    raw = httpx.post(f"{server}/caption", params={"beam_size": 2}, content=images[0].read_bytes(),
                     headers={"content-type": "image/jpeg"}, timeout=60)
    assert raw.status_code == 200 and raw.json()["caption"] == expected[0].caption


def test_word_rules_are_query_options_with_the_models_defaults(server, predictor, images):
    expected = predictor.caption([load_image(images[1])], beam_size=2, allow_unk=True, block_trigrams=True)[0]
    body = httpx.post(f"{server}/caption", params={"beam_size": 2, "allow_unk": "true", "block_trigrams": "true"},
                      content=images[1].read_bytes(), headers={"content-type": "image/jpeg"}, timeout=60).json()
    assert body["caption"] == expected[0].caption
    assert body["options"] == {"beam_size": 2, "n_best": 1, "max_len": predictor.cfg.decode.max_len,
                               "allow_unk": True, "block_trigrams": True}
    plain = httpx.post(f"{server}/caption", content=images[1].read_bytes(),
                       headers={"content-type": "image/jpeg"}, timeout=60).json()
    assert plain["options"]["allow_unk"] is False and plain["options"]["block_trigrams"] is False


def test_concurrent_requests_share_model_calls(server, predictor, images):
    expected = {p.name: c[0].caption for p, c in zip(images, predictor.caption([load_image(p) for p in images]))}

    def post(path: Path) -> dict:
        r = httpx.post(f"{server}/caption", content=path.read_bytes(), timeout=60)
        assert r.status_code == 200, r.text
        return {"name": path.name, **r.json()}

    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(pool.map(post, images * 2))
    assert all(a["caption"] == expected[a["name"]] for a in answers)
    assert max(a["timings"]["batch_size"] for a in answers) > 1  # 12 clients, one model: they batched


BAD_REQUESTS = {
    "empty body": (dict(content=b""), 400, "empty upload"),
    "50 MB body": (dict(content=b"\0" * (50 * 1024 * 1024)), 413, "too large"),
    "50 MB chunked body": (dict(content=(b"\0" * 1024 * 1024 for _ in range(50))), 413, "too large"),
    "20000x20000 PNG bomb": (dict(files={"image": ("bomb.png", _png_bomb(), "image/png")}), 400,
                             "400000000 pixels is over the limit"),
    "text named .jpg": (dict(files={"image": ("notes.jpg", b"shopping list: eggs, milk\n" * 20,
                                              "image/jpeg")}), 400, "not an image"),
    "wrong field name": (dict(files={"file": ("a.jpg", b"\xff\xd8\xff", "image/jpeg")}), 400,
                         "form field 'image'"),
    "negative beam size": (dict(params={"beam_size": -1}, content=b"x"), 422, "beam_size"),
    "n-best over beam": (dict(params={"beam_size": 2, "n_best": 3}, content=b"x"), 422, "n_best"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_clear_4xx_and_the_server_keeps_serving(server, case):
    kwargs, status, message = BAD_REQUESTS[case]
    r = httpx.post(f"{server}/caption", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["error"] and "Traceback" not in r.text
    assert httpx.get(f"{server}/health", timeout=10).json()["status"] == "ok"


def test_truncated_jpeg_is_refused(server, images):
    data = images[1].read_bytes()
    cut = data[:len(data) // 2]  # headers intact, half the scan missing
    r = httpx.post(f"{server}/caption", files={"image": ("cut.jpg", cut, "image/jpeg")}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"] == "cannot read image cut.jpg: truncated or corrupt image data"
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_oversized_upload_is_refused_before_its_body_is_sent(server):
    """The 413 comes back from the headers alone: the server does not wait for (or buffer) 50 MB."""
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /caption HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     b"Content-Length: 52428800\r\n\r\n" + b"\xff\xd8" * 10)
        reply = b""
        while b'"}' not in reply:  # headers and the JSON body may come in separate segments
            chunk = sock.recv(4096)
            assert chunk, f"connection closed after {reply!r}"
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b'"error":"upload too large' in reply


def test_health_docs_and_page_need_nothing_from_outside(server):
    health = httpx.get(f"{server}/health").json()
    assert health["model"]["vocab_size"] > 4 and health["limits"]["max_upload_bytes"] == LIMIT
    assert "/caption" in httpx.get(f"{server}/openapi.json").json()["paths"]
    for page in ("/docs", "/"):
        r = httpx.get(f"{server}{page}")
        assert r.status_code == 200
        assets = [a for a in r.text.split('"') if a.startswith(("/static", "http:", "https:", "//"))]
        assert assets and all(a.startswith("/static") for a in assets), assets
        assert all(httpx.get(f"{server}{a}").status_code == 200 for a in assets)
    assert "default-src 'self'" in httpx.get(f"{server}/").headers["content-security-policy"]
    missing = httpx.get(f"{server}/nowhere")
    assert missing.status_code == 404 and "error" in missing.json()


def test_batcher_groups_by_options_and_survives_a_failing_batch():
    calls = []

    def run_batch(items, options):
        calls.append((options, list(items)))
        if "boom" in items:
            raise RuntimeError("model failed")
        return [f"{options}:{item}" for item in items]

    async def scenario():
        batcher = MicroBatcher(run_batch, max_batch=4, max_wait_ms=50)
        await batcher.start()
        jobs = [batcher.submit(i, "a" if i % 3 else "b") for i in range(10)]
        results = await asyncio.gather(*jobs)
        failed = await asyncio.gather(batcher.submit("boom", "a"), return_exceptions=True)
        after = await batcher.submit("ok", "a")
        await batcher.stop()
        return results, failed, after

    results, failed, after = asyncio.run(scenario())
    assert [r for r, _ in results] == [f"{'a' if i % 3 else 'b'}:{i}" for i in range(10)]
    assert all(len(items) <= 4 for _, items in calls)
    assert sum(len(items) for _, items in calls[:-2]) == 10 and max(len(i) for _, i in calls) > 1
    assert all({("a" if i % 3 else "b") for i in items} == {opt} for opt, items in calls[:-2])
    assert isinstance(failed[0], RuntimeError) and after[0] == "a:ok"


def test_full_queue_is_refused_with_503():
    async def scenario():
        batcher = MicroBatcher(lambda items, o: items, max_batch=1, max_queue=1)
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(1, None))
        await asyncio.sleep(0)  # one loop turn: `first` is queued, the worker has not taken it yet
        with pytest.raises(HTTPException) as refused:
            await batcher.submit(2, None)
        assert (await first)[0] == 1
        await batcher.stop()
        return refused.value

    refused = asyncio.run(scenario())
    assert refused.status_code == 503 and "busy" in refused.detail


def test_load_test_loses_no_request_and_returns_no_5xx(trained_run):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "load_test.py"), "--run",
                             str(trained_run), "--clients", "4", "--seconds", "2"],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["lost"] == 0 and figures["status_5xx"] == 0 and figures["errors"] == 0
    assert figures["single"]["requests"] > 0 and figures["concurrent"]["requests"] > 0
    assert figures["requests"] == figures["single"]["requests"] + figures["concurrent"]["requests"]
    assert figures["concurrent"]["max_batch"] > 1


def test_serve_command_refuses_a_busy_port_and_a_missing_model(trained_run, tmp_path, capsys):
    from attncap.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(trained_run), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "no model in" in capsys.readouterr().err
