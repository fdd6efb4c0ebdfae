"""What the server admits: a byte budget for queued work, and a bounded pool of decoders.

Every request holds part of :class:`MemoryBudget` from the moment it is accepted until it is
answered: its upload while the body is read (twice the declared length: the chunks and their join)
and while it waits for a decoder, then only the encoder's input, uint8 (3, S, S), while it waits
for the model. A request that does not fit gets a 503 with ``Retry-After``; one that could never
fit, even into an idle server, a 413.

Decoding runs in :class:`DecodePool`'s few threads, so at most ``workers`` full-size images exist
at any time; each costs up to about 8.4 bytes a pixel for RGB, 24 for RGBA at its peak (measured,
see docs/serving.md), so the decoders add at most ``workers * max_pixels`` times that. Decode
memory is bounded by the workers rather than drawn from the budget: uploads waiting in the budget
could otherwise starve the decoders and refuse work that was already admitted.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import HTTPException

MB = 1024 * 1024
RETRY_AFTER = {"Retry-After": "1"}


class MemoryBudget:
    """Bytes held for requests (uploads, queued model inputs), at most ``limit``; used from the event loop."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"the memory budget must be positive, got {limit} bytes")
        self.limit, self.used, self.refused = limit, 0, 0

    def hold(self, nbytes: int, what: str) -> "Hold":
        """Take ``nbytes`` for one request; 503 when they do not fit now, 413 when they never could."""
        held = Hold(self)
        held.resize(nbytes, what)
        return held

    def _take(self, nbytes: int, total: int, what: str) -> None:
        """Add ``nbytes`` to a hold that then has ``total``."""
        if total > self.limit:
            raise HTTPException(413, f"{what} needs {total / MB:.1f} MB of server memory, more than "
                                     f"the whole budget of {self.limit / MB:.1f} MB; send a smaller "
                                     "image, or raise attncap serve --max-queue-mb")
        if self.used + nbytes > self.limit:
            self.refused += 1
            raise HTTPException(503, f"server busy: {self.used / MB:.1f} of {self.limit / MB:.1f} MB "
                                     f"held for waiting requests, {what} needs {nbytes / MB:.1f} MB "
                                     "more; retry after a second", headers=RETRY_AFTER)
        self.used += nbytes

    def _give(self, nbytes: int) -> None:
        self.used -= nbytes


class Hold:
    """One request's share of a :class:`MemoryBudget`; ``resize`` as its data changes, ``release`` once."""

    def __init__(self, budget: MemoryBudget):
        self.budget, self.nbytes = budget, 0

    def resize(self, nbytes: int, what: str = "this request") -> None:
        """Hold ``nbytes`` from now on: growing may raise the budget's 503 (then nothing changes)."""
        if nbytes > self.nbytes:
            self.budget._take(nbytes - self.nbytes, nbytes, what)
        else:
            self.budget._give(self.nbytes - nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        self.resize(0)

    def __enter__(self) -> "Hold":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DecodePool:
    """Run decoding in ``workers`` threads; when ``workers + max_waiting`` are taken, a 503.

    A request whose task is cancelled while waiting (its client went away) never gets decoded.
    """

    def __init__(self, workers: int, max_waiting: int):
        if workers < 1 or max_waiting < 0:
            raise ValueError(f"need workers >= 1 and max_waiting >= 0, got {workers}, {max_waiting}")
        self.workers, self.max_waiting, self.pending = workers, max_waiting, 0
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="attncap-decode")

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a decode thread."""
        if self._pool is None:
            raise RuntimeError("DecodePool.start() was not called (run the app with its lifespan)")
        if self.pending >= self.workers + self.max_waiting:
            raise HTTPException(503, f"server busy: {self.pending} uploads waiting to be decoded; "
                                     "retry after a second", headers=RETRY_AFTER)
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.pending -= 1
