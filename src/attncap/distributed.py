"""Data-parallel training: the process group from torchrun's environment, rank helpers, stop signals.

``torchrun`` (on SLURM: ``srun torchrun``, see ``jobs/``) starts one process per GPU, or per share
of the CPU cores, and tells each its place through RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT. A plain ``attncap train`` has none of them and runs as one process
with no process group, so every helper here is then a no-op.

Stopping: SLURM sends SIGTERM (or the signal of ``--signal``, here SIGUSR1) before it kills or
requeues a job. :class:`StopSignals` turns both into a flag that the training loop reads between
steps; the ranks agree on it with one all-reduce, so all of them stop after the same step and rank
0 can write a checkpoint from which the run resumes exactly.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from .errors import AttncapError

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: stopped by a signal after a checkpoint; run it again to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes, and the few collectives the loop uses.

    With ``world_size == 1`` (no process group) every method returns its input unchanged.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""                # "gloo" or "nccl"; "" without a process group

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Each number summed over all ranks (one all-reduce)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)  # (len(values),)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (it is pickled in memory, never on disk)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def shard(self, pairs: np.ndarray) -> tuple[np.ndarray, bool]:
        """This rank's contiguous share of a planned batch; returns (pairs, real).

        Contiguous, because a planned batch is sorted by caption length, so each share pads little.
        A rank left without pairs (a batch smaller than the world) gets the batch's first pair as a
        stand-in with ``real=False``: it must still run the step, since DDP's gradient all-reduce
        needs every rank, and the loop gives the stand-in zero weight.
        """
        share = np.array_split(pairs, self.world_size)[self.rank]
        return (share, True) if len(share) else (pairs[:1], False)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model DDP-wrapped for the training step (the model itself for one process)."""
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def torchrun_env(environ: dict[str, str] | None = None) -> dict[str, int] | None:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE as ints; None when torchrun did not start us."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" not in environ:
        return None
    missing = [k for k in TORCHRUN_VARIABLES if k not in environ]
    if missing:
        raise AttncapError(f"WORLD_SIZE is set but {', '.join(missing)} not: start data-parallel training "
                           "with torchrun (see docs/distributed.md), or unset WORLD_SIZE for one process")
    try:
        values = {k: int(environ[k]) for k in TORCHRUN_VARIABLES}
    except ValueError:
        raise AttncapError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers: "
                           "start data-parallel training with torchrun") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise AttncapError(f"RANK={values['RANK']} is outside WORLD_SIZE={values['WORLD_SIZE']}")
    return values


def is_main_process() -> bool:
    """Whether this process is rank 0 (or alone); for printing before/after training."""
    env = torchrun_env()
    return env is None or env["RANK"] == 0


def threads_per_process(local_world_size: int) -> int:
    """The cores this process may use (SLURM's cgroup included), shared among the node's ranks."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def _device(requested: str | None, local_rank: int) -> torch.device:
    """The requested device, or this rank's GPU when there are GPUs, else the CPU."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def process_group(device: str | None = None, timeout_minutes: float = 30.0) -> Iterator[Dist]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) for the block; leave it after.

    ``timeout_minutes`` bounds how long a collective waits for a rank that is gone or stuck, so a
    dead peer ends the run with an error instead of a hang (torchrun's agent also stops the others).
    """
    env = torchrun_env()
    if env is None or env["WORLD_SIZE"] == 1:
        yield Dist(device=_device(device, 0))
        return
    dev = _device(device, env["LOCAL_RANK"])
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                            device_id=dev if dev.type == "cuda" else None)
    try:
        yield Dist(env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], dev, backend)
    except BaseException as exc:  # the traceback's finished frames hold the block's objects (a DDP wrapper)
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        _destroy_group()


def _destroy_group() -> None:
    """Leave the process group once nothing else holds it.

    ``destroy_process_group`` only drops torch's own references; the group itself (its worker
    threads, and the last collective's work they still hold) goes when its last holder does, such
    as a DDP wrapper. Gone later, at interpreter exit, a gloo thread that releases that work asks
    for the GIL of a finalising interpreter and the process aborts ("terminate called without an
    active exception", SIGABRT, after a run that succeeded). So the block's objects are collected
    first, and the group's destructor drains and joins its threads here.
    """
    gc.collect()
    dist.destroy_process_group()


class StopSignals:
    """While active, SIGTERM and SIGUSR1 only record their name in ``received``.

    The training loop checks it between steps (see module docstring). Outside the main thread
    Python cannot install handlers, so there the signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.received = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
