"""Dynamic batching as Triton's `dynamic_batching` does it, for `mpis serve`.

Requests to one model wait in a FIFO queue; one worker takes the oldest and, while the queued rows are
fewer than max_batch_size, waits up to max_queue_delay after that request's arrival for more, then runs
every queued request that fits as one batch and hands each its own rows back. A request is never split,
and order is kept. The model runs in one worker thread per model: one execution at a time (as a Triton
model with one instance; a TensorRT execution context is not thread-safe) while the event loop goes on
accepting requests, which are then batched together for the next execution. With batching off every
request is its own execution, which is what the benchmark compares against.

`Statistics` keeps the counters of Triton's statistics extension as Triton defines them: per request
success / fail / queue / compute_input / compute_infer / compute_output (each request of a batched
execution is charged that execution's compute times), per batch size the executions and their compute
times, and inference_count in rows. perf_analyzer reads these to find the model version and to report
the server-side split of the latency.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

Tensors = dict[str, np.ndarray]


@dataclass
class Duration:
    """Triton's StatisticDuration: how many, and their cumulative nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


COMPUTE_PHASES = ("compute_input", "compute_infer", "compute_output")
REQUEST_STATS = ("success", "fail", "queue", *COMPUTE_PHASES, "cache_hit", "cache_miss")


@dataclass
class Statistics:
    """One model's counters in the shape of Triton's ModelStatistics (cache_* stay 0: no response cache)."""

    inference_count: int = 0  # rows of successful requests (a request of batch 64 counts 64)
    execution_count: int = 0
    last_inference_ms: int = 0
    requests: dict[str, Duration] = field(default_factory=lambda: {name: Duration() for name in REQUEST_STATS})
    batches: dict[int, dict[str, Duration]] = field(
        default_factory=lambda: defaultdict(lambda: {name: Duration() for name in COMPUTE_PHASES})
    )

    def executed(self, rows: int, requests: int, queue_ns: int, phases: dict[str, int]) -> None:
        """One execution of `rows` rows from `requests` requests that waited `queue_ns` in all."""
        self.execution_count += 1
        self.inference_count += rows
        self.last_inference_ms = int(time.time() * 1000)
        self.requests["queue"].add(queue_ns, requests)
        for name, ns in phases.items():
            self.requests[name].add(ns * requests, requests)
            self.batches[rows][name].add(ns)

    def as_dict(self, name: str, version: str) -> dict:
        return {
            "name": name,
            "version": version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {key: d.as_dict() for key, d in self.requests.items()},
            "batch_stats": [
                {"batch_size": size, **{key: d.as_dict() for key, d in phases.items()}}
                for size, phases in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


@dataclass
class _Pending:
    inputs: Tensors
    rows: int
    arrived: float
    future: asyncio.Future


def _shapes(pending: _Pending) -> dict[str, tuple[int, ...]]:
    return {name: value.shape[1:] for name, value in pending.inputs.items()}


class DynamicBatcher:
    """Queue + worker for one model; `run` maps a batch of inputs to every output (rows along axis 0)."""

    def __init__(
        self, name: str, run: Callable[[Tensors], Tensors], max_batch_size: int, max_queue_delay_s: float | None
    ):
        self.name = name
        self._run = run
        self.max_rows = max_batch_size
        self.delay = max_queue_delay_s  # None: no batching, one request per execution
        self.stats = Statistics()
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0

    def start(self) -> None:
        """Start the worker on the running event loop (the server's lifespan calls this)."""
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"mpis-{self.name}")
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        for pending in self._queue:
            pending.future.cancel()
        self._executor.shutdown(wait=True)

    async def infer(self, inputs: Tensors, rows: int) -> Tensors:
        """Queue one request (`rows` along axis 0 of every input) and wait for its outputs."""
        loop = asyncio.get_running_loop()
        pending = _Pending(inputs, rows, loop.time(), loop.create_future())
        self._queue.append(pending)
        self._queued_rows += rows
        self._arrived.set()
        return await pending.future

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.delay is not None:
                deadline = self._queue[0].arrived + self.delay
                while self._queued_rows < self.max_rows and (remaining := deadline - loop.time()) > 0:
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except asyncio.TimeoutError:
                        break
            await self._execute(self._take())

    def _take(self) -> list[_Pending]:
        batch = [self._queue.popleft()]
        rows, shapes = batch[0].rows, _shapes(batch[0])
        while (
            self.delay is not None
            and self._queue
            and rows + self._queue[0].rows <= self.max_rows
            and _shapes(self._queue[0]) == shapes  # dims of -1 can differ between requests
        ):
            batch.append(self._queue.popleft())
            rows += batch[-1].rows
        self._queued_rows -= rows
        return [p for p in batch if not p.future.cancelled()]  # a cancelled request's client has gone

    async def _execute(self, batch: list[_Pending]) -> None:
        if not batch:
            return
        started = asyncio.get_running_loop().time()
        try:
            results, phases = await asyncio.get_running_loop().run_in_executor(self._executor, self._compute, batch)
        except Exception as err:  # the backend's failure belongs to these requests, not to the worker
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(err)
            return
        queued = round(sum(started - p.arrived for p in batch) * 1e9)
        self.stats.executed(sum(p.rows for p in batch), len(batch), queued, phases)
        for pending, result in zip(batch, results, strict=True):
            if not pending.future.done():
                pending.future.set_result(result)

    def _compute(self, batch: list[_Pending]) -> tuple[list[Tensors], dict[str, int]]:
        """Gather the inputs, run the model, split the outputs per request; the time of each phase."""
        clock = [time.monotonic_ns()]
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
        clock.append(time.monotonic_ns())
        outputs = self._run(inputs)
        clock.append(time.monotonic_ns())
        results, start = [], 0
        for pending in batch:
            results.append(
                outputs if len(batch) == 1 else {k: v[start : start + pending.rows] for k, v in outputs.items()}
            )
            start += pending.rows
        clock.append(time.monotonic_ns())
        return results, {name: clock[i + 1] - clock[i] for i, name in enumerate(COMPUTE_PHASES)}
