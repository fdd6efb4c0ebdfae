"""Micro-batching: requests from concurrent clients share one model call.

Captioning one image costs nearly as much per step as captioning sixteen (the decoder runs word by
word; per-step overhead dominates on small batches), so under load the server collects waiting
requests into a batch. One worker task drains an asyncio queue: it takes the first request, then
whatever else arrives within ``max_wait_ms`` up to ``max_batch``, groups the requests by their
decoding options, and runs each group in a thread so the event loop keeps accepting uploads.
An idle server adds at most ``max_wait_ms`` of latency to a lone request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from fastapi import HTTPException


@dataclass(frozen=True)
class BatchInfo:
    """How a request was served: for the response's timings."""

    batch_size: int   # requests in the model call that served this one
    queue_ms: float   # from submission to the start of that call
    model_ms: float   # the model call itself


@dataclass
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
    instead of piling up timeouts).
    """

    def __init__(self, run_batch: RunBatch, max_batch: int = 16, max_wait_ms: float = 5.0,
                 max_queue: int = 256):
        if max_batch < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(f"need max_batch >= 1, max_wait_ms >= 0, max_queue >= 1; got "
                             f"{max_batch}, {max_wait_ms}, {max_queue}")
        self.run_batch, self.max_batch = run_batch, max_batch
        self.max_wait, self.max_queue = max_wait_ms / 1000.0, max_queue
        self.batches = self.served = 0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.create_task(self._work(), name="attncap-batcher")

    async def stop(self) -> None:
        """Stop the worker; requests still waiting get a 503."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(HTTPException(503, "server is shutting down"))

    async def submit(self, item: Any, options: Hashable) -> tuple[Any, BatchInfo]:
        """Queue one item; returns its result and how it was batched."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called (run the app with its lifespan)")
        job = _Job(item, options, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise HTTPException(503, f"server busy: {self.max_queue} requests waiting; retry shortly",
                                headers={"Retry-After": "1"}) from None
        return await job.future

    async def _work(self) -> None:
        while True:
            jobs = await self._collect()
            groups: dict[Hashable, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.options, []).append(job)
            for options, group in groups.items():
                await self._run(options, [j for j in group if not j.future.done()])

    async def _collect(self) -> list[_Job]:
        """The first waiting job, then what arrives within ``max_wait`` (at most ``max_batch``)."""
        assert self._queue is not None
        jobs = [await self._queue.get()]
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
        return jobs

    async def _run(self, options: Hashable, jobs: list[_Job]) -> None:
        """One model call for ``jobs`` (cancelled requests were already dropped)."""
        if not jobs:
            return
        started = time.perf_counter()
        try:
            results = await asyncio.to_thread(self.run_batch, [j.item for j in jobs], options)
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
