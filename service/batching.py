"""Dynamic batching: concurrent requests for one model version merge into one model call.

One `Batcher` per (model version, kind). Requests wait in a bounded queue; a single worker task
takes the first, adds whatever else is queued, and keeps collecting until `max_batch` sequences or
`max_wait` has passed (0: no waiting, only what queued up while the model was busy), and runs
the merged batch in the batcher's own thread, off the event loop. A full queue refuses at once
(the caller answers 503 with Retry-After); a request whose deadline passes while queued is
dropped before it costs compute. Predict and explain have separate batchers and threads, so slow
explanations never hold predictions back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from service import metrics

log = logging.getLogger("icaserve.batching")


class QueueFull(Exception):
    pass


class Expired(Exception):
    pass


@dataclass
class Job:
    """One request: several sequences (and per-sequence specs) answered together."""

    sequences: list[Any]
    specs: list[Any] | None
    deadline: float
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, model_s, batch (for Server-Timing)


RunBatch = Callable[[list[Any], list[Any] | None], Sequence[Any]]


class Batcher:
    def __init__(self, name: str, run: RunBatch, *, max_batch: int, max_wait_s: float, max_queue: int,
                 enabled: bool = True) -> None:
        self.name = name  # the queue label: "predict" or "explain"
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.enabled = enabled
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"icaserve-{name}")
        self._task: asyncio.Task | None = None
        self._running = False  # the worker holds jobs (collecting, computing or answering them)
        self._closed = False  # drain_and_stop was called: new jobs no longer go through the queue

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def submit(self, sequences: list[Any], specs: list[Any] | None, timeout_s: float,
                     timings: dict[str, float] | None = None) -> list[Any]:
        """Results for `sequences`, in order; fills `timings` with queue and model seconds."""
        loop = asyncio.get_running_loop()
        job = Job(sequences, specs, time.perf_counter() + timeout_s, loop.create_future())
        if timings is not None:
            job.timings = timings
        if self._closed:
            # This version was retired after the caller picked it up (e.g. while its body was still
            # arriving): answer on it directly rather than in the stopped queue.
            start = time.perf_counter()
            try:
                results = await asyncio.wait_for(asyncio.to_thread(self.run, sequences, specs), timeout=timeout_s)
            except asyncio.TimeoutError:
                raise Expired(self.name) from None
            job.timings.update(queue_s=0.0, model_s=time.perf_counter() - start, batch=len(sequences))
            return list(results)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(self.name) from None
        metrics.QUEUE_DEPTH.labels(self.name).inc()
        self.start()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise Expired(self.name) from None

    async def _collect(self) -> list[Job]:
        first = await self.queue.get()
        self._running = True  # holding jobs from here on: drain_and_stop must not cancel us
        jobs, size = [first], len(first.sequences)
        if not self.enabled:
            return jobs
        until = time.perf_counter() + self.max_wait_s
        while size < self.max_batch:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                left = until - time.perf_counter()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), timeout=left)
                except asyncio.TimeoutError:
                    break
            jobs.append(nxt)
            size += len(nxt.sequences)
        return jobs

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            metrics.QUEUE_DEPTH.labels(self.name).dec(len(jobs))
            now = time.perf_counter()
            live = []
            for job in jobs:
                if job.future.done():  # the caller gave up already
                    continue
                if now > job.deadline:
                    job.future.set_exception(Expired(self.name))
                    continue
                metrics.QUEUE_WAIT_SECONDS.labels(self.name).observe(now - job.enqueued)
                live.append(job)
            if not live:
                self._running = False
                continue
            sequences = [s for job in live for s in job.sequences]
            specs = None if live[0].specs is None else [s for job in live for s in job.specs]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, sequences, specs)
            except Exception as exc:  # a bad batch fails its requests, never the worker
                log.exception("batch failed", extra={"queue": self.name, "sequences": len(sequences)})
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            finally:
                self._running = False  # the answers below are delivered without yielding
            model_s = time.perf_counter() - start
            metrics.COMPUTE_SECONDS.labels(self.name).observe(model_s)
            metrics.BATCH_SIZE.labels(self.name).observe(len(sequences))
            metrics.sample_gpu()  # every worker keeps its own CUDA memory gauge current
            offset = 0
            for job in live:
                n = len(job.sequences)
                job.timings.update(queue_s=start - job.enqueued, model_s=model_s, batch=len(sequences))
                if not job.future.done():
                    job.future.set_result(list(results[offset : offset + n]))
                offset += n

    def depth(self) -> int:
        return self.queue.qsize()

    async def drain_and_stop(self, timeout_s: float = 30.0) -> None:
        """Let queued jobs finish (for a swapped-out version or shutdown), then stop."""
        self._closed = True  # no new jobs enter the queue (see submit)
        end = time.perf_counter() + timeout_s
        # The worker may hold jobs while it collects a batch, computes or answers it: wait for those.
        while (not self.queue.empty() or self._running) and time.perf_counter() < end:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the last batch's results be delivered
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self.executor.shutdown(wait=False)
