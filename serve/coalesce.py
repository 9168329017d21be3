"""Continuous batching at the model: one call at a time, everything that waited goes into the next.

Ray Serve's `@serve.batch` (Ray 2.60) forms the next batch as soon as it hands the previous one to a
task, not when the model is free: with `max_concurrent_batches=1` the batches queue at a semaphore,
and behind a running batch they hold only what arrived within `batch_wait_timeout_s` of each other,
one query each when requests come one by one. Measured on 2 CPU cores at 16 concurrent clients:
every model call had one query, so the service ran at the speed of unbatched queries.

`Coalescer` sits between `@serve.batch` (which now lets several batches through) and the model: a
batch that arrives while the model runs waits, and when the model is free every waiting batch is
merged into one call, up to `max_items` texts. At one client nothing waits and nothing is merged; under
load the model sees batches as large as the load allows, without a timer. Free of Ray, so it is
unit-tested on its own.

The search ingress uses the same thing for Milvus: concurrent requests with the same search
parameters go to Milvus as one search with several query vectors. One search of 16 vectors costs
about what two single searches cost (Milvus Lite in the ingress: 13 ms of CPU against 6 ms for one;
a server pays its per-request work once), so under load searches stop being one RPC per request.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar

T = TypeVar("T")

RunFn = Callable[[list[T]], Sequence[Any]]


class Coalescer(Generic[T]):
    """Runs `run(items)` in a worker thread, `max_concurrent` calls at a time (default one), merging
    calls that wait for it.

    `await coalescer(items)` returns `run`'s results for exactly those items, in order. A caller's
    items are never split across two calls; a single caller with more than `max_items` runs alone.
    `executor` (optional) runs the calls, e.g. the one thread that may use a client; default: asyncio's.
    `on_call(n, seconds)` (optional) is told the size and duration of every call."""

    def __init__(
        self,
        run: RunFn[T],
        max_items: int,
        on_call: Callable[[int, float], None] | None = None,
        *,
        max_concurrent: int = 1,
        executor: Executor | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self._run = run
        self.max_items = max_items
        self.max_concurrent = max_concurrent
        self._executor = executor
        self._on_call = on_call
        self._waiting: deque[tuple[list[T], asyncio.Future[list[Any]]]] = deque()
        self._workers: set[asyncio.Task[None]] = set()
        self.calls = 0  # calls made
        self.items = 0  # items they covered

    def idle(self) -> bool:
        """Nothing running and nothing waiting."""
        return not self._waiting and all(w.done() for w in self._workers)

    async def __call__(self, items: Sequence[T]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((list(items), future))
        # A worker that found nothing more to take has returned (done) in the same loop step.
        self._workers = {w for w in self._workers if not w.done()}
        if len(self._workers) < self.max_concurrent:
            self._workers.add(asyncio.ensure_future(self._drain()))
        return await future

    def _take(self) -> list[tuple[list[T], asyncio.Future[list[Any]]]]:
        taken: list[tuple[list[T], asyncio.Future[list[Any]]]] = []
        n = 0
        while self._waiting:
            items, future = self._waiting[0]
            if future.done():  # its caller went away (cancelled): nothing to compute
                self._waiting.popleft()
                continue
            if taken and n + len(items) > self.max_items:
                break
            taken.append(self._waiting.popleft())
            n += len(items)
        return taken

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while taken := self._take():
            flat = [item for items, _ in taken for item in items]
            t0 = loop.time()
            try:
                results = await loop.run_in_executor(self._executor, self._run, flat)
                if len(results) != len(flat):
                    raise RuntimeError(f"the model returned {len(results)} results for {len(flat)} inputs")
            except Exception as exc:  # every caller in this call gets the error; the next call goes on
                for _, future in taken:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self.calls += 1
                self.items += len(flat)
            if self._on_call is not None:
                self._on_call(len(flat), loop.time() - t0)
            start = 0
            for items, future in taken:
                if not future.done():
                    future.set_result(list(results[start : start + len(items)]))
                start += len(items)
