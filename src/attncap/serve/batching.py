"""Micro-batching: requests from concurrent clients share one model call.

Captioning one image costs nearly as much per step as captioning sixteen (the decoder runs word by
word; per-step overhead dominates on small batches), so under load the server collects waiting
requests into a batch. One worker task drains an asyncio queue: it takes the first request, then
whatever else arrives within ``max_wait_ms`` up to ``max_batch``, groups the requests by their
decoding options, and runs each group in the batcher's own model thread so the event loop keeps
accepting uploads. (One thread, always the same: with the event loop's shared pool, each thread
that ran a batch kept its own malloc arena with a batch's activations in it.)
An idle server adds at most ``max_wait_ms`` of latency to a lone request.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from fastapi import HTTPException


@dataclass(frozen=True)
class BatchInfo:
    """How a request was served: for the response's timings."""

    batch_size: int   # requests in the model call that served this one
    queue_ms: float   # from submission to the start of that call
    model_ms: float   # the model call itself


@dataclass(eq=False)  # jobs are compared by identity (items may be tensors)
class _Job:
    item: Any
    options: Hashable
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


RunBatch = Callable[[list[Any], Any], Sequence[Any]]  # (items, options) -> one result per item


class MicroBatcher:
    """Collect submitted items into batches for ``run_batch(items, options)``, run in a thread.

    ``start()`` and ``stop()`` belong to the server's lifespan. ``submit`` raises a 503
    ``HTTPException`` when ``max_queue`` requests are already waiting (overload is refused quickly
    instead of piling up timeouts). A request whose future is cancelled before its batch runs (its
    client went away) is left out of the model call and counted in ``dropped``.

    Shutting down (:meth:`close`, then :meth:`stop`): the batch already in the model finishes and
    is delivered; every other request, queued or collected into a later batch, gets a 503 at once.
    """

    def __init__(self, run_batch: RunBatch, max_batch: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, max_queue >= 1; got "
                             f"{max_batch}, {max_wait_ms}, {max_queue}")
        self.run_batch, self.max_batch = run_batch, max_batch
        self.max_wait, self.max_queue = max_wait_ms / 1000.0, max_queue
        self.batches = self.served = self.dropped = 0
        self.closed = asyncio.Event()  # set by close(): uploads still being read stop at once
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._held: list[_Job] = []      # taken from the queue, not yet answered
        self._running: list[_Job] = []   # the part of _held inside the model call now
        self._current: asyncio.Task | None = None  # that model call
        self._thread: ThreadPoolExecutor | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def closing(self) -> bool:
        return self.closed.is_set()

    @property
    def collected(self) -> int:
        """Requests taken into a batch and not yet answered (the running ones included)."""
        return sum(not j.future.done() for j in self._held)

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="attncap-model")
        self._worker = asyncio.create_task(self._work(), name="attncap-batcher")

    def close(self) -> None:
        """Refuse new requests and answer every waiting one but the running batch with a 503."""
        self.closed.set()
        while self._queue is not None and not self._queue.empty():
            _refuse(self._queue.get_nowait())
        for job in self._held:
            if job not in self._running:
                _refuse(job)

    async def stop(self, timeout: float = 30.0) -> None:
        """:meth:`close`, let the running batch deliver (``timeout`` s at most), stop the worker."""
        self.close()
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        if self._current is not None and not self._current.done():
            await asyncio.wait([self._current], timeout=timeout)
        for job in self._held:
            _refuse(job)
        if self._thread is not None:
            self._thread.shutdown(wait=False)

    async def submit(self, item: Any, options: Hashable) -> tuple[Any, BatchInfo]:
        """Queue one item; returns its result and how it was batched."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called (run the app with its lifespan)")
        if self.closing:
            raise shutting_down()
        job = _Job(item, options, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPException(503, f"server busy: {self.max_queue} requests waiting; retry shortly",
                                headers={"Retry-After": "1"}) from None
        return await job.future

    async def _work(self) -> None:
        while True:
            await self._collect(self._held)
            groups: dict[Hashable, list[_Job]] = {}
            for job in self._held:
                groups.setdefault(job.options, []).append(job)
            for options, group in groups.items():
                live = [j for j in group if not j.future.done()]
                self.dropped += sum(j.future.cancelled() for j in group)
                if live:
                    self._running = live
                    self._current = asyncio.ensure_future(self._run(options, live))
                    await asyncio.shield(self._current)  # stop() lets it finish and deliver
                    self._running = []
            self._held.clear()

    async def _collect(self, jobs: list[_Job]) -> None:
        """Into ``jobs``: the first waiting job, then what arrives within ``max_wait`` (``max_batch``
        at most). Appends as it goes, so a cancelled worker leaves no job unaccounted for."""
        assert self._queue is not None
        jobs.append(await self._queue.get())
        deadline = time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch:
            if not self._queue.empty():
                jobs.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break

    async def _run(self, options: Hashable, jobs: list[_Job]) -> None:
        """One model call for ``jobs`` (cancelled requests were already dropped)."""
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._thread, self.run_batch, [j.item for j in jobs], options)
        except Exception as exc:  # delivered to every waiting request; the worker keeps serving
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        model_ms = (time.perf_counter() - started) * 1000.0
        self.batches += 1
        self.served += len(jobs)
        for job, result in zip(jobs, results):
            if not job.future.done():  # the client may have gone away meanwhile
                info = BatchInfo(len(jobs), (started - job.queued) * 1000.0, model_ms)
                job.future.set_result((result, info))


def shutting_down() -> HTTPException:
    """The 503 every request gets once the server stops taking work."""
    return HTTPException(503, "server is shutting down; retry on its replacement or after restart",
                         headers={"Retry-After": "5"})


def _refuse(job: _Job) -> None:
    if not job.future.done():
        job.future.set_exception(shutting_down())
