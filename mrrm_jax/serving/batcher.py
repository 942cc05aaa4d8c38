"""Dynamic batching for the reward server: groups from concurrent requests packed into fixed-shape
rows and scored by ONE model thread.

A group (a prompt, its media and its G responses) is one example, i.e. one segment of a packed row.
Batch shapes come from the fixed set of `batch_shapes.BatchShapes`, all compiled by `warm_up()`
before serving, so serving never compiles; a group larger than a full row is refused (`TooLarge`).

The model thread takes the first waiting group, then keeps taking groups until the rows are full or
`max_wait_s` has passed since that first group arrived; a group that no longer fits waits for the
next batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time

from mrrm_jax.scoring.batch_shapes import BatchShapes
from mrrm_jax.data import packing
from mrrm_jax import backbones

log = logging.getLogger(__name__)


class TooLarge(ValueError):
    """A group that cannot fit an empty row (HTTP 413); the message has the numbers."""


@dataclasses.dataclass
class _Job:
    example: dict
    future: concurrent.futures.Future
    enqueued: float


class ModelDown(RuntimeError):
    """The model thread is not running (HTTP 503): it stopped, or died of an error it could not survive."""


class Batcher:
    """`deterministic`: every batch has the same shape and each group a row of its own at its start
    (`BatchShapes`), so a group's scores are bit-identical whatever it is batched with."""

    def __init__(self, model, budget: packing.RowBudget, max_rows: int, max_wait_s: float, on_batch=None,
                 length_buckets: int = 3, deterministic: bool = False):
        self.model, self.budget, self.max_wait_s = model, budget, max_wait_s
        self.shapes = BatchShapes(budget, backbones.media(model.config), max_rows, model.mesh.size, length_buckets,
                                  deterministic)
        self.row_buckets = self.shapes.row_buckets
        self.on_batch = on_batch or (lambda groups, rows, fill, seconds: None)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None
        self._thread = threading.Thread(target=self._run, name="model", daemon=True)
        self._batch_started: float | None = None  # when the running batch began; None between batches
        self._running: list[_Job] = []  # the running batch's jobs
        self.stopped_by: str | None = None  # why the model thread ended, once it has

    def check(self, example: dict) -> None:
        """Raises `TooLarge` for a group no row can hold."""
        over = self.shapes.too_large(example)
        if over:
            raise TooLarge(f"the group is too large for one batch row: {', '.join(over)}")

    def submit(self, example: dict) -> concurrent.futures.Future:
        """Scores [N] of one group, when its batch has run."""
        self.check(example)
        if not self.alive():
            raise ModelDown(f"the model thread is not running ({self.stopped_by or 'not started'})")
        job = _Job(example, concurrent.futures.Future(), time.monotonic())
        self._queue.put(job)
        return job.future

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def busy_s(self) -> float:
        """How long the running batch has been on the model (0 between batches)."""
        started = self._batch_started
        return 0.0 if started is None else time.monotonic() - started

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def warm_up(self) -> int:
        """Compiles every batch shape (empty rows); returns how many programs the model has."""
        for layout in self.shapes.empty_layouts():
            self.model.score_batch(self.shapes.pack([], layout))
        return len(self.model.programs)

    def _next_batch(self):
        """The next batch's jobs and layout (`batch_shapes.Filling`: each job placed as it is taken);
        None once stopped."""
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        jobs, filling = [first], self.shapes.filling().added([first.example])
        deadline = first.enqueued + self.max_wait_s
        while True:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return jobs, filling.layout()
            if job is None:
                self._queue.put(None)  # stop after this batch
                return jobs, filling.layout()
            grown = filling.added([job.example])
            if grown is None:
                self._carry = job
                return jobs, filling.layout()
            jobs.append(job)
            filling = grown

    def _run(self) -> None:
        try:
            self._loop()
            self.stopped_by = "stopped"
        except BaseException as error:  # recorded for /health and every later request
            self.stopped_by = f"died: {type(error).__name__}: {error}"
            log.exception("the model thread died")
            waiting = self._running + ([self._carry] if self._carry else [])
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
            down = ModelDown(f"the model thread is not running ({self.stopped_by})")
            for job in filter(None, waiting):  # answered now, not at their deadline
                if job.future.running() or job.future.set_running_or_notify_cancel():
                    job.future.set_exception(down)

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            jobs, layout = batch
            running = self._running = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not running:
                continue
            examples = [job.example for job in running]
            if len(running) < len(jobs):  # cancelled requests: lay out the rest again (rare)
                layout = self.shapes.layout(examples)
            start = self._batch_started = time.monotonic()
            try:
                scores_ben = self.model.score_batch(self.shapes.pack(examples, layout))
                for job, scores_n in zip(running, self.shapes.unpack(examples, layout, scores_ben)):
                    job.future.set_result(scores_n)
                fill = sum(e["tokens"].shape[1] for e in examples) / (layout.num_rows * layout.budget.row_tokens)
                self.on_batch(len(running), layout.num_rows, fill, time.monotonic() - start)
            except Exception as error:  # the model thread must outlive any batch: fail its requests only
                log.exception("batch of %d groups failed", len(running))
                for job in running:
                    if not job.future.done():
                        job.future.set_exception(error)
            finally:
                self._batch_started = None
