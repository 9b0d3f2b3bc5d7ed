"""The batcher on its own (service/batching.py): the idle lane, merging behind it, deadlines,
cancellation and failures, with a compute that records the batches it was given."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batching import Batcher, Expired, QueueFull


class Compute:
    """A model stand-in: doubles each sequence after `delay_s`; records batch sizes and threads."""

    def __init__(self, delay_s: float = 0.0, fail: BaseException | None = None) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[list[int]] = []
        self.threads: set[str] = set()
        self.started = threading.Event()

    def __call__(self, sequences: list[int], specs: list | None) -> list[int]:
        self.batches.append(list(sequences))
        self.threads.add(threading.current_thread().name)
        self.started.set()
        time.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [2 * s for s in sequences]


def run(coro):
    return asyncio.run(coro)


async def busy(compute: Compute, name: str, max_queue: int, first: int):
    """A batcher whose idle lane is computing `[first]` (its future returned beside it)."""
    b = Batcher(name, compute, max_batch=8, max_wait_s=0.0, max_queue=max_queue)
    job = asyncio.ensure_future(b.submit([first], None, 5.0))
    await asyncio.to_thread(compute.started.wait, 5.0)
    return b, job


def test_a_lone_request_is_answered_by_the_idle_lane_in_the_batchers_thread():
    compute = Compute()

    async def main():
        b = Batcher("predict", compute, max_batch=8, max_wait_s=0.0, max_queue=4)
        timings: dict[str, float] = {}
        out = await b.submit([3], None, 5.0, timings)
        assert b._task is not None  # the worker is up for whatever queues behind an idle-lane job
        await b.drain_and_stop(1.0)
        return out, timings

    out, timings = run(main())
    assert out == [6]
    assert compute.batches == [[3]]
    assert compute.threads == {"icaserve-predict_0"}  # never the event loop's thread
    assert timings["batch"] == 1 and timings["model_s"] >= 0 and timings["queue_s"] >= 0


def test_requests_arriving_during_an_idle_lane_job_merge_into_one_batch_behind_it():
    compute = Compute(delay_s=0.2)

    async def main():
        b = Batcher("predict", compute, max_batch=32, max_wait_s=0.0, max_queue=64)
        first = asyncio.ensure_future(b.submit([0], None, 5.0))
        await asyncio.sleep(0)  # the first starts computing, alone
        await asyncio.to_thread(compute.started.wait, 5.0)
        rest = [asyncio.ensure_future(b.submit([i], None, 5.0)) for i in range(1, 11)]
        results = await asyncio.gather(first, *rest)
        await b.drain_and_stop(1.0)
        return results

    results = run(main())
    assert results == [[2 * i] for i in range(11)]
    # the worker did not collect while the idle-lane job computed: the ten wait and go together
    assert compute.batches == [[0], list(range(1, 11))]


def test_the_worker_takes_over_while_busy_and_the_idle_lane_returns_after():
    compute = Compute(delay_s=0.05)

    async def main():
        b = Batcher("predict", compute, max_batch=4, max_wait_s=0.0, max_queue=64)
        burst = await asyncio.gather(*[b.submit([i], None, 5.0) for i in range(9)])
        assert b._idle()  # all answered: the next lone request takes the idle lane again
        alone = await b.submit([100], None, 5.0)
        await b.drain_and_stop(1.0)
        return burst, alone

    burst, alone = run(main())
    assert burst == [[2 * i] for i in range(9)] and alone == [200]
    assert all(len(batch) <= 4 for batch in compute.batches)
    assert sum(len(batch) for batch in compute.batches) == 10
    assert compute.batches[-1] == [100]


def test_a_deadline_passing_during_an_idle_lane_job_answers_expired_on_time():
    compute = Compute(delay_s=0.5)

    async def main():
        b = Batcher("explain", compute, max_batch=8, max_wait_s=0.0, max_queue=4)
        t0 = time.perf_counter()
        with pytest.raises(Expired):
            await b.submit([1], None, 0.05)
        waited = time.perf_counter() - t0
        # the batcher is still busy with it: the next request queues and is answered after
        out = await b.submit([2], None, 5.0)
        await b.drain_and_stop(1.0)
        return waited, out

    waited, out = run(main())
    assert waited < 0.4  # at the deadline, not when the compute ends
    assert out == [4]


def test_a_deadline_passing_in_the_queue_drops_the_job_before_it_costs_compute():
    compute = Compute(delay_s=0.3)

    async def main():
        b, first = await busy(compute, "explain", 4, 1)
        with pytest.raises(Expired):
            await b.submit([2], None, 0.05)
        assert b.depth() == 0  # it left the queue at its deadline
        await first
        await b.drain_and_stop(1.0)

    run(main())
    assert compute.batches == [[1]]


def test_a_cancelled_caller_leaves_the_queue_and_costs_no_compute():
    compute = Compute(delay_s=0.3)

    async def main():
        b, first = await busy(compute, "predict", 4, 1)
        gone = asyncio.ensure_future(b.submit([2], None, 5.0))
        await asyncio.sleep(0.01)
        assert b.depth() == 1
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert b.depth() == 0
        assert await first == [2]
        await b.drain_and_stop(1.0)

    run(main())
    assert compute.batches == [[1]]


@pytest.mark.parametrize("alone", [True, False], ids=["idle lane", "worker"])
def test_a_failing_compute_fails_its_requests_and_the_batcher_goes_on(alone):
    compute = Compute(delay_s=0.05, fail=RuntimeError("boom"))

    async def main():
        b = Batcher("predict", compute, max_batch=8, max_wait_s=0.0, max_queue=8)
        if alone:
            calls = [b.submit([1], None, 5.0)]
        else:
            calls = [b.submit([i], None, 5.0) for i in range(4)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        compute.fail = None
        after = await b.submit([7], None, 5.0)
        await b.drain_and_stop(1.0)
        return results, after

    results, after = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == [14]


def test_a_full_queue_refuses_while_an_idle_lane_job_computes():
    compute = Compute(delay_s=0.3)

    async def main():
        b, first = await busy(compute, "predict", 2, 0)
        queued = [asyncio.ensure_future(b.submit([i], None, 5.0)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await b.submit([3], None, 5.0)
        out = await asyncio.gather(first, *queued)
        await b.drain_and_stop(1.0)
        return out

    assert run(main()) == [[0], [2], [4]]


def test_with_a_batching_window_a_lone_request_waits_for_company():
    """max_wait_s > 0 asks lone requests to wait for others: the idle lane stays shut."""
    compute = Compute()

    async def main():
        b = Batcher("explain", compute, max_batch=8, max_wait_s=0.2, max_queue=8)
        first = asyncio.ensure_future(b.submit([1], None, 5.0))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(b.submit([2], None, 5.0))
        out = await asyncio.gather(first, second)
        await b.drain_and_stop(1.0)
        return out

    assert run(main()) == [[2], [4]]
    assert compute.batches == [[1, 2]]


def test_model_thread_runs_the_configured_intra_op_threads():
    """The batcher's model thread applies the process's intra-op thread count to OpenMP before its
    first job: a fresh thread's OpenMP team is one thread per core, which oneDNN's LSTM used, so two
    workers on two cores spun against each other (/explain on version 4 ran 6x slower)."""
    import ctypes
    from pathlib import Path

    import torch

    torch_lib = str(Path(torch.__file__).parent / "lib")
    gomp = [line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
            if "libgomp" in line and line.split()[-1].startswith(torch_lib)]
    if not gomp:
        pytest.skip("torch does not ship its OpenMP runtime here")
    lib = ctypes.CDLL(gomp[0])  # torch's own copy (other packages may load another): its settings count
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batcher = Batcher("explain", max_batch=4, max_wait_s=0.0, max_queue=4)
        assert batcher.executor.submit(lib.omp_get_max_threads).result() == 1
        batcher.executor.shutdown()
    finally:
        torch.set_num_threads(before)
