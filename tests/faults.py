"""Fault-injection harness: run an ``attncap`` command in its own process and kill it at a write.

Commands run in processes forked from a fork server that has imported attncap and torch once, so
a kill-and-rerun costs the command's own work, not a Python start. A run is a real separate
process: ``ATTNCAP_FAULT_AT=N`` makes it SIGKILL itself at its Nth ``files.fault_point`` (see
:mod:`attncap.files`), or the test kills it from outside after a delay.

Results are compared as snapshots: every file under a folder, by content, with the few values that
are wall-clock times (``seconds``, ``time_s``, TensorBoard event files) left out.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from pathlib import Path

import torch

from attncap.files import FAULT_AT_ENV, FAULT_PID_ENV, FAULT_TRACE_ENV, TMP_TAG

TIMING_KEYS = frozenset({"seconds", "time_s"})
LEFTOVER_MARKS = (TMP_TAG, ".tmp", ".part", ".old", ".partial.")


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    os.environ.update(env)
    os.environ[FAULT_PID_ENV] = str(os.getpid())
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from attncap.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Runner:
    """Runs ``attncap ARGV`` in a fresh process; returns its exit code (-9: killed)."""

    def __init__(self, log_dir: Path):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(["attncap.cli", "attncap.pipeline", "attncap.export", "torch"])
        self.log = str(log_dir / "runs.log")
        self.runs = 0

    def __call__(self, argv: list[str], fault_at: int = 0, trace: Path | None = None,
                 kill_after: float | None = None, timeout: float = 300.0) -> int:
        env = {FAULT_AT_ENV: str(fault_at)} if fault_at else {}
        if trace is not None:
            env[FAULT_TRACE_ENV] = str(trace)
        proc = self.ctx.Process(target=_child, args=(list(argv), env, self.log))
        proc.start()
        self.runs += 1
        proc.join(kill_after if kill_after is not None else timeout)
        if proc.is_alive() and kill_after is not None:
            proc.kill()  # SIGKILL at an arbitrary moment
            proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            raise AssertionError(f"attncap {' '.join(argv)} did not finish in {timeout} s; see {self.log}")
        return proc.exitcode

    def tail(self, lines: int = 15) -> str:
        text = Path(self.log).read_text(errors="replace") if Path(self.log).is_file() else ""
        return "\n".join(text.splitlines()[-lines:])


def points(trace: Path) -> list[str]:
    """The fault points a traced run passed, in order ("write config.json", ...)."""
    return [line.split(" ", 1)[1] for line in trace.read_text().splitlines()]


def spread(total: int, n: int) -> list[int]:
    """``n`` kill points spread over 1..total (all of them when total <= n)."""
    if total <= n:
        return list(range(1, total + 1))
    return sorted({1 + round(k * (total - 1) / (n - 1)) for k in range(n)})


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _digest(path: Path) -> str:
    """A file's content, with wall-clock values left out of JSON, JSONL and training state."""
    if path.suffix == ".json":
        return json.dumps(_without_timings(json.loads(path.read_text(encoding="utf-8"))), sort_keys=True)
    if path.suffix == ".jsonl":
        return json.dumps([_without_timings(json.loads(line)) for line in path.read_text().splitlines()])
    if path.name == "state.pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        state["train_state"] = _without_timings(json.loads(state["train_state"]))
        return hashlib.sha256(repr(_tensors_as_bytes(state)).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors_as_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return (str(obj.dtype), tuple(obj.shape), hashlib.sha256(obj.contiguous().numpy().tobytes()).hexdigest())
    if isinstance(obj, dict):
        return sorted((str(k), _tensors_as_bytes(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [_tensors_as_bytes(v) for v in obj]
    return obj


def snapshot(root: Path, skip: tuple[str, ...] = ("train/tb",)) -> dict[str, str]:
    """``{relative path: content digest}`` of every file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(f"/{s}/" in f"/{rel}" for s in skip):
            out[rel] = _digest(path)
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary, partial or set-aside files and folders a finished command must not leave."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if any(mark in p.name for mark in LEFTOVER_MARKS))


def differences(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    changed = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    return [f"missing {k}" for k in missing] + [f"extra {k}" for k in extra] + [f"differs {k}" for k in changed]
