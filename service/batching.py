"""Dynamic batching: concurrent requests for one model merge into one model call.

One `Batcher` per (model, kind), shared by every loaded version of that model: each version
enters it through a `Lane` that tags its jobs with the version's own compute, and a batch only
ever merges jobs of one version. So the queue bound holds per model whatever versions come and
go (a hot swap does not open a second queue, nor run late requests outside any queue), and one
thread per (model, kind) computes, whichever version a request was routed to.

Requests wait in a bounded queue; a single worker task takes the first, adds whatever else of the
same version is queued, and keeps collecting until `max_batch` sequences or `max_wait` has passed
(0: no waiting, only what queued up while the model was busy), and runs the merged batch in the
batcher's own thread, off the event loop. A full queue refuses at once (the caller answers 503
with Retry-After); a request whose deadline passes while queued is dropped before it costs
compute, and leaves the queue as soon as its caller gives up. Predict and explain have separate
batchers and threads, so slow explanations never hold predictions back.

A request that finds its batcher idle (nothing queued, collected or computing, and no batching
window configured) skips the queue:
it goes to the batcher's thread at once (the idle lane, `_dispatch_now`), and the worker does not
collect until it is done, so what arrives meanwhile merges behind it as it would behind any batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from service import metrics

log = logging.getLogger("icaserve.batching")


def _model_thread_init() -> None:
    """Give the model thread the process's intra-op thread count (`ICASERVE_TORCH_THREADS`). A new
    thread starts with OpenMP's default team, one thread per core, and oneDNN's LSTM reads it before
    any torch op has applied the process's setting to that thread. With two workers on two cores
    each LSTM then ran a team of two that spun against the other worker's: /explain on version 4,
    batching off, 4 clients, served 49 req/s at 40 ms of model time per request, against 158 req/s
    at 6 ms with one worker."""
    import torch

    torch.set_num_threads(torch.get_num_threads())


class QueueFull(Exception):
    pass


class Stopped(QueueFull):
    """The batcher has stopped (the server is shutting down): 503, as a full queue, so clients
    retry, elsewhere or later."""


class Expired(Exception):
    """A request's deadline passed: raised to its caller (504). The compute (`run`) may raise it
    too, between chunks, once every row of its batch is past its deadline."""


RunBatch = Callable[[list[Any], list[Any] | None], Sequence[Any]]


def _retrieve(future: asyncio.Future) -> None:
    """Mark a job's exception as retrieved the moment it is set. Its caller may have given up
    already (its deadline passed, or it was cancelled), and asyncio would then log "Future
    exception was never retrieved" when the job is freed."""
    if not future.cancelled():
        future.exception()


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """`fn(*args)` on `loop`, from the batcher's thread; nothing when the loop has closed meanwhile
    (the process is stopping: nobody is left to answer)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass


@dataclass(eq=False)  # identity: jobs are removed from the queue by identity, never compared by value
class Job:
    """One request: several sequences (and per-sequence specs) answered together."""

    sequences: list[Any]
    specs: list[Any] | None
    deadline: float
    future: asyncio.Future
    run: RunBatch  # the compute of the version the request was routed to
    enqueued: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, model_s, batch (for Server-Timing)


class Batcher:
    def __init__(self, name: str, run: RunBatch | None = None, *, max_batch: int, max_wait_s: float,
                 max_queue: int, enabled: bool = True) -> None:
        self.name = name  # the queue label: "predict" or "explain"
        self.run = run  # used when submit() is not given one (a batcher of a single compute)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.enabled = enabled
        self._queue: deque[Job] = deque()
        self._arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"icaserve-{name}",
                                           initializer=_model_thread_init)
        self._task: asyncio.Task | None = None
        self._running = False  # the worker holds jobs (collecting, computing or answering them)
        self._direct = False  # a job of the idle lane computes (`_dispatch_now`)
        self._closed = False  # drain_and_stop was called: no new jobs
        # this queue's metric children, looked up once (labels() costs a lookup per call)
        self._depth = metrics.QUEUE_DEPTH.labels(name)
        self._wait_hist = metrics.QUEUE_WAIT_SECONDS.labels(name)
        self._compute_hist = metrics.COMPUTE_SECONDS.labels(name)
        self._batch_hist = metrics.BATCH_SIZE.labels(name)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    def lane(self, run: RunBatch) -> "Lane":
        """The way in for one model version: its jobs are computed by `run`."""
        return Lane(self, run)

    async def submit(self, sequences: list[Any], specs: list[Any] | None, timeout_s: float,
                     timings: dict[str, float] | None = None, run: RunBatch | None = None) -> list[Any]:
        """Results for `sequences`, in order; fills `timings` with queue and model seconds."""
        if self._closed:
            raise Stopped(self.name)
        run = run or self.run
        if run is None:
            raise TypeError("submit() needs `run` on a batcher made without one")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(self.name)
        loop = asyncio.get_running_loop()
        job = Job(sequences, specs, time.perf_counter() + timeout_s, loop.create_future(), run)
        job.future.add_done_callback(_retrieve)
        if timings is not None:
            job.timings = timings
        if self._idle():
            self._dispatch_now(job, loop)
        else:
            self._queue.append(job)
            self._depth.inc()
            self._arrived.set()
            self.start()
        # The deadline is a timer on the job itself rather than wait_for(shield(...)): the waiting
        # task wakes one loop turn after the answer is set, not three.
        deadline = loop.call_later(timeout_s, self._expire, job)
        try:
            return await job.future
        except asyncio.CancelledError:  # the caller went away: its job must not cost compute
            self._forget(job)
            raise
        finally:
            deadline.cancel()

    def _expire(self, job: Job) -> None:
        """The job's deadline passed before its answer: its caller gets `Expired` now, and the
        job leaves the queue (or is skipped by the worker, which checks `future.done()`)."""
        if not job.future.done():
            self._dequeue(job)
            job.future.set_exception(Expired(self.name))

    def _idle(self) -> bool:
        """Nothing queued, collected or computing, and no batching window to wait out (with
        `max_wait_s` > 0 a lone request waits for company, as configured): a job can go to the
        thread at once."""
        if self._queue or self._running or self._direct:
            return False
        return self.max_wait_s <= 0 or not self.enabled

    def _dispatch_now(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        """The idle lane: an idle batcher's job is handed to its thread from the caller's turn of
        the event loop, and answered from the thread's completion callback, skipping the worker
        task's two turns (in and out) that a lone request gains nothing from. The worker does not
        collect while such a job computes (`_collect`), so requests that arrive meanwhile still
        merge into one batch behind it, as they would behind a batch of the worker's own."""
        self._direct = True
        self.start()  # the worker must be there for the requests that queue meanwhile
        start = time.perf_counter()
        self._wait_hist.observe(start - job.enqueued)
        work = self.executor.submit(job.run, job.sequences, job.specs)
        work.add_done_callback(lambda done: _call_soon(loop, self._direct_done, job, done, start))

    def _direct_done(self, job: Job, done: Any, start: float) -> None:
        """The idle lane's completion, on the event loop: answer the job as `_loop` answers a batch."""
        self._direct = False
        if self._queue:
            self._arrived.set()  # the worker waited for this job (see `_collect`)
        if done.cancelled():
            self._fail([job], Stopped(self.name))
        elif done.exception() is not None:
            self._compute_failed([job], done.exception())
        else:
            self._answer([job], done.result(), start)

    def _forget(self, job: Job) -> None:
        """A job whose caller gave up leaves the queue (it no longer holds a place in it), and
        the worker skips it if it holds it already."""
        self._dequeue(job)
        if not job.future.done():
            job.future.cancel()

    def _dequeue(self, job: Job) -> None:
        try:
            self._queue.remove(job)
        except ValueError:
            pass  # not queued: the worker has it already, or it went by the idle lane
        else:
            self._depth.dec()

    def _take(self, run: RunBatch, jobs: list[Job], size: int) -> int:
        """Move queued jobs of `run`'s version into `jobs` (in order) up to `max_batch` sequences;
        other versions' jobs keep their places. Returns the new size."""
        keep: deque[Job] = deque()
        while self._queue:
            job = self._queue.popleft()
            if size < self.max_batch and job.run == run:
                jobs.append(job)
                size += len(job.sequences)
            else:
                keep.append(job)
        self._queue = keep
        return size

    async def _collect(self) -> list[Job]:
        while not self._queue or self._direct:  # an idle-lane job computes: collect behind it
            self._arrived.clear()
            await self._arrived.wait()
        first = self._queue.popleft()
        self._running = True  # holding jobs from here on: drain_and_stop must not cancel us
        jobs, size = [first], len(first.sequences)
        if not self.enabled:
            return jobs
        until = time.perf_counter() + self.max_wait_s
        while True:
            size = self._take(first.run, jobs, size)
            left = until - time.perf_counter()
            if size >= self.max_batch or left <= 0:
                return jobs
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout=left)
            except asyncio.TimeoutError:
                self._take(first.run, jobs, size)
                return jobs

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            self._depth.dec(len(jobs))
            now = time.perf_counter()
            live = []
            for job in jobs:
                if job.future.done():  # the caller gave up already
                    continue
                if now > job.deadline:
                    job.future.set_exception(Expired(self.name))
                    continue
                self._wait_hist.observe(now - job.enqueued)
                live.append(job)
            if not live:
                self._running = False
                continue
            sequences = [s for job in live for s in job.sequences]
            specs = None if live[0].specs is None else [s for job in live for s in job.specs]
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, live[0].run, sequences, specs)
            except Exception as exc:  # a bad batch fails its requests, never the worker
                self._compute_failed(live, exc)
                continue
            finally:
                self._running = False  # the answers below are delivered without yielding
            self._answer(live, results, start)

    def _compute_failed(self, live: list[Job], exc: BaseException) -> None:
        """A batch whose compute raised fails its requests. `Expired` (the compute stopped at its rows'
        deadlines) is expected: one info line, no traceback; anything else is logged with its traceback."""
        extra = {"queue": self.name, "sequences": sum(len(job.sequences) for job in live)}
        if isinstance(exc, Expired):
            log.info("batch stopped at its requests' deadlines (%d requests)", len(live), extra=extra)
            self._fail(live, Expired(self.name))
        else:
            log.error("batch failed", exc_info=exc, extra=extra)
            self._fail(live, exc)

    def _answer(self, live: list[Job], results: Sequence[Any], start: float) -> None:
        """Deliver a computed batch's results to its jobs, with their timings and the batch metrics."""
        model_s = time.perf_counter() - start
        n_total = sum(len(job.sequences) for job in live)
        self._compute_hist.observe(model_s)
        self._batch_hist.observe(n_total)
        metrics.sample_gpu()  # every worker keeps its own CUDA memory gauge current
        offset = 0
        for job in live:
            n = len(job.sequences)
            job.timings.update(queue_s=start - job.enqueued, model_s=model_s, batch=n_total)
            if not job.future.done():
                job.future.set_result(list(results[offset : offset + n]))
            offset += n

    def depth(self) -> int:
        return len(self._queue)

    async def drain_and_stop(self, timeout_s: float = 30.0) -> None:
        """Let queued jobs finish (at shutdown), then stop; jobs still queued after `timeout_s`
        are refused (503) rather than left to time out."""
        self._closed = True  # no new jobs (see submit)
        end = time.perf_counter() + timeout_s
        # The worker may hold jobs while it collects a batch, computes or answers it: wait for those.
        while (self._queue or self._running or self._direct) and time.perf_counter() < end:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # let the last batch's results be delivered
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        left, self._queue = list(self._queue), deque()
        if left:
            self._depth.dec(len(left))
            self._fail(left, Stopped(self.name))
        self.executor.shutdown(wait=False)


class Lane:
    """One model version's way into its model's batcher (what `Serving.predict` / `.explain`
    are): the same `submit` as a batcher, with this version's compute."""

    def __init__(self, batcher: Batcher, run: RunBatch) -> None:
        self.batcher = batcher
        self.run = run

    @property
    def name(self) -> str:
        return self.batcher.name

    async def submit(self, sequences: list[Any], specs: list[Any] | None, timeout_s: float,
                     timings: dict[str, float] | None = None) -> list[Any]:
        return await self.batcher.submit(sequences, specs, timeout_s, timings, run=self.run)

    def depth(self) -> int:
        return self.batcher.depth()
