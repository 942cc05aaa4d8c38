"""Dynamic batching for the reward server: groups from concurrent requests packed into fixed-shape
rows and scored by ONE model thread.

A group (a prompt, its media and its G responses) is one example, i.e. one segment of a packed row
(`data/packing.py`): the segment mask keeps the groups of a row apart, so a group's scores do not
depend on what it was batched with. Batch shapes come from a fixed set, so serving never compiles:
`rows` is a power of two up to `max_rows` (rounded up to the device count); a row is the full `budget`
or its half, quarter, ... (`length_buckets` sizes: tokens, crops and pooled tokens scaled together), so
that a lone short group does not pay for a whole row; and a batch where no group has media has no crops
at all (no ViT). Each batch takes the cheapest shape (rows x row tokens) that holds it. That is
2 x length_buckets x (log2(max_rows) + 1) programs, all compiled by `warm_up()` before serving.

The model thread takes the first waiting group, then keeps taking groups until the rows are full or
`max_wait_s` has passed since that first group arrived; a group that no longer fits waits for the
next batch.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import queue
import threading
import time

import numpy as np

from mrrm_jax.data import packing

log = logging.getLogger(__name__)

# Packed-row fields the forward pass does not read.
_TRAINING_ONLY = ("labels", "media_kind")


class TooLarge(ValueError):
    """A group that cannot fit an empty row (HTTP 413); the message has the numbers."""


@dataclasses.dataclass
class _Job:
    example: dict
    future: concurrent.futures.Future
    enqueued: float


def _scaled(budget: packing.RowBudget, fraction: float, with_media: bool) -> packing.RowBudget:
    """A row shape `fraction` of `budget` (tokens, crops and pooled tokens), without media room if not
    `with_media`."""
    media = (math.ceil(budget.row_crops * fraction), math.ceil(budget.row_pooled * fraction)) if with_media else (0, 0)
    return dataclasses.replace(budget, row_tokens=math.ceil(budget.row_tokens * fraction), row_crops=media[0],
                               row_pooled=media[1])


class Batcher:
    def __init__(self, model, budget: packing.RowBudget, max_rows: int, max_wait_s: float, on_batch=None,
                 length_buckets: int = 3):
        self.model, self.budget, self.max_wait_s = model, budget, max_wait_s
        fractions = [0.5 ** k for k in reversed(range(length_buckets))]
        # with_media -> row shapes, smallest first
        self.shapes = {m: [_scaled(budget, f, m) for f in fractions] for m in (False, True)}
        self.patch_dim = (model.config.vision.num_patches, model.config.vision.patch_dim)
        devices = model.mesh.size
        self.row_buckets = sorted({-(-(1 << k) // devices) * devices for k in range(max(max_rows, 1).bit_length())
                                   if 1 << k <= max_rows} | {-(-max_rows // devices) * devices})
        self.max_rows = self.row_buckets[-1]
        self.on_batch = on_batch or (lambda groups, rows, fill, seconds: None)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._carry: _Job | None = None
        self._thread = threading.Thread(target=self._loop, name="model", daemon=True)

    def check(self, example: dict) -> None:
        """Raises `TooLarge` for a group no row can hold."""
        tokens, responses = example["tokens"].shape[1], example["read_positions"].shape[1]
        crops = example["crops"].shape[1] if "crops" in example else 0
        pooled = example["pooling"].shape[1] if "pooling" in example else 0
        limits = [("tokens", tokens, self.budget.row_tokens), ("crops", crops, self.budget.row_crops),
                  ("pooled image tokens", pooled, self.budget.row_pooled),
                  ("responses", responses, self.budget.max_responses)]
        over = [f"{count} {name} (limit {limit})" for name, count, limit in limits if count > limit]
        if over:
            raise TooLarge(f"the group is too large for one batch row: {', '.join(over)}")

    def submit(self, example: dict) -> concurrent.futures.Future:
        """Scores [N] of one group, when its batch has run."""
        self.check(example)
        job = _Job(example, concurrent.futures.Future(), time.monotonic())
        self._queue.put(job)
        return job.future

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def warm_up(self) -> int:
        """Compiles every batch shape (empty rows); returns how many programs the model has."""
        for shapes in self.shapes.values():
            for budget in shapes:
                for rows in self.row_buckets:
                    self.model.score_batch(self._pack([], [], budget, rows))
        return len(self.model.programs)

    def _layout(self, examples: list[dict]) -> tuple[packing.RowBudget, list[list[int]], int] | None:
        """(row shape, example indices per row, rows) of the cheapest shape that holds `examples` in at
        most `max_rows` rows; None when none does."""
        best = None
        for budget in self.shapes[any("crops" in e for e in examples)]:
            try:
                placement = packing.first_fit(examples, budget)
            except ValueError:  # an example longer than this row shape
                continue
            if len(placement) <= self.max_rows:
                rows = next(r for r in self.row_buckets if r >= len(placement))
                if best is None or rows * budget.row_tokens < best[2] * best[0].row_tokens:
                    best = (budget, placement, rows)
        return best

    def _pack(self, examples: list[dict], placement: list[list[int]], budget: packing.RowBudget, rows: int) -> dict:
        packed = [packing.pack_row([examples[i] for i in row], budget, self.patch_dim) for row in placement]
        packed += [packing.pack_row([], budget, self.patch_dim)] * (rows - len(packed))
        batch = {name: np.concatenate([row[name] for row in packed]) for name in packed[0]
                 if name not in _TRAINING_ONLY}
        if not budget.row_crops:  # a text-only program: no ViT at all
            del batch["crops"], batch["pooling"]
        return batch

    def _next_batch(self) -> list[_Job] | None:
        first = self._carry or self._queue.get()
        self._carry = None
        if first is None:
            return None
        jobs, deadline = [first], first.enqueued + self.max_wait_s
        while True:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return jobs
            if job is None:
                self._queue.put(None)  # stop after this batch
                return jobs
            if self._layout([j.example for j in jobs + [job]]) is None:
                self._carry = job
                return jobs
            jobs.append(job)

    def _loop(self) -> None:
        while (jobs := self._next_batch()) is not None:
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            start = time.monotonic()
            try:
                examples = [job.example for job in jobs]
                budget, placement, rows = self._layout(examples)
                scores_ben = self.model.score_batch(self._pack(examples, placement, budget, rows))
                for row, indices in enumerate(placement):
                    for slot, index in enumerate(indices):
                        count = examples[index]["read_positions"].shape[1]
                        jobs[index].future.set_result(scores_ben[row, slot, :count])
                fill = sum(e["tokens"].shape[1] for e in examples) / (rows * budget.row_tokens)
                self.on_batch(len(jobs), rows, fill, time.monotonic() - start)
            except Exception as error:  # the model thread must outlive any batch: fail its requests only
                log.exception("batch of %d groups failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
