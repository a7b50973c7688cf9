"""Dynamic batching as Triton's `dynamic_batching` does it, for `mpis serve`.

Requests to one model wait in a FIFO queue; one worker takes the oldest and, while the queued rows are
fewer than max_batch_size, waits up to max_queue_delay after that request's arrival for more, then runs
every queued request that fits as one batch and hands each its own rows back. A request is never split,
and order is kept. The model runs in one worker thread per model: one execution at a time (as a Triton
model with one instance; a TensorRT execution context is not thread-safe) while the event loop goes on
accepting requests, which are then batched together for the next execution. With batching off every
request is its own execution, which is what the benchmark compares against.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

Tensors = dict[str, np.ndarray]


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
        self.inference_count = 0  # rows inferred (Triton's statistics extension counts the same way)
        self.execution_count = 0  # model executions
        self.last_inference_ms = 0
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
        if len(batch) == 1:
            inputs = batch[0].inputs
        else:
            inputs = {name: np.concatenate([p.inputs[name] for p in batch]) for name in batch[0].inputs}
        try:
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, inputs)
        except Exception as err:  # the backend's failure belongs to these requests, not to the worker
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(err)
            return
        self.execution_count += 1
        self.inference_count += sum(p.rows for p in batch)
        self.last_inference_ms = int(time.time() * 1000)
        start = 0
        for pending in batch:
            if not pending.future.done():
                result = (
                    outputs if len(batch) == 1 else {k: v[start : start + pending.rows] for k, v in outputs.items()}
                )
                pending.future.set_result(result)
            start += pending.rows
