"""Packed scoring batches from a small fixed set of shapes, for every scorer: files, benchmarks, the server.

A group (a prompt, its media and its N responses) is one example, i.e. one segment of a packed row
(`data/packing.py`): the segment mask keeps the groups of a row apart, so a group's scores do not
depend on what it was batched with, and rows carry almost no padding (a padded batch would pay for
its longest example's tokens and crops in every row). The shapes: a batch has a power of two rows up
to `max_rows` (rounded up to the device count); a row is the full budget or its half, quarter, ...
(`length_buckets`; tokens, crops and pooled tokens scaled together), so that a lone short group does
not pay for a whole row; and a batch without media has no crops at all (no ViT). Each batch takes
the cheapest shape (rows x row tokens) that holds it: at most 2 x length_buckets x (row buckets)
programs.

`deterministic`: one batch shape per media kind (a full row, `max_rows` rows) and each example a row
of its own, at its start, never batched with an example of the other kind: a group then goes through
the same program at the same offset whatever else is in the batch, so its scores are bit-identical
however it was batched (XLA's results can differ in the last bit between batch shapes; on CPU a
group scored in a 1-row and a 2-row batch differs by ~2e-8). It costs the packing: a batch holds at
most `max_rows` groups and every row is paid for in full.

An example larger than a full row (a long video, many responses) gets a one-row shape of its own,
rounded up (`oversize`), so that offline scoring never refuses a record for its size; the server
refuses it instead (`too_large`), as it compiles every shape before serving.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mrrm_jax.data import packing

# Packed-row fields the forward pass does not read.
_TRAINING_ONLY = ("labels", "media_kind", "order")


@dataclasses.dataclass(frozen=True)
class Layout:
    budget: packing.RowBudget  # the shape of each row
    rows: list[list[int]]  # example indices per packed row
    num_rows: int  # rows in the batch: len(rows) rounded up to a row bucket


def row_budget(processor, row_tokens: int, row_crops: int, row_examples: int, max_responses: int) -> packing.RowBudget:
    """A packed row's capacity; its media room follows from the processor (`row_media`)."""
    return packing.RowBudget(row_tokens=row_tokens, row_examples=row_examples, max_responses=max_responses,
                             **processor.row_media(row_tokens, row_crops))


def _scaled(budget: packing.RowBudget, fraction: float, with_media: bool) -> packing.RowBudget:
    """A row shape `fraction` of `budget` (tokens and every media resource), without media room if not
    `with_media`. Qwen3-VL's patches stay whole merged tokens (multiples of 4)."""
    media = (math.ceil(budget.row_crops * fraction), math.ceil(budget.row_pooled * fraction),
             4 * math.ceil(budget.row_patches * fraction / 4)) if with_media else (0, 0, 0)
    return dataclasses.replace(budget, row_tokens=math.ceil(budget.row_tokens * fraction), row_crops=media[0],
                               row_pooled=media[1], row_patches=media[2])


def _has_media(example: dict) -> bool:
    return any(packing.media_counts(example).values())


def _has_media_room(budget: packing.RowBudget) -> bool:
    return bool(budget.row_crops or budget.row_patches)


class BatchShapes:
    def __init__(self, budget: packing.RowBudget, media, max_rows: int, devices: int = 1, length_buckets: int = 3,
                 deterministic: bool = False):
        """`media`: the backbone's media layout (`models.backbones.media`)."""
        self.media, self.devices, self.deterministic = media, devices, deterministic
        self.budget = dataclasses.replace(budget, row_examples=1) if deterministic else budget
        fractions = [0.5 ** k for k in reversed(range(1 if deterministic else length_buckets))]
        # with_media -> row shapes, smallest first
        self.shapes = {m: [_scaled(self.budget, f, m) for f in fractions] for m in (False, True)}
        full = -(-max_rows // devices) * devices
        self.row_buckets = [full] if deterministic else sorted(
            {-(-(1 << k) // devices) * devices for k in range(max(max_rows, 1).bit_length()) if 1 << k <= max_rows}
            | {full})
        self.max_rows = self.row_buckets[-1]

    def too_large(self, example: dict) -> list[str]:
        """What of `example` exceeds a full row ([] when it fits)."""
        return packing.exceeds(example, self.budget)

    def filling(self) -> Filling:
        """An empty batch to add examples to."""
        return Filling(self, tuple((budget, (), ()) for with_media in (False, True) for budget in self.shapes[with_media]))

    def layout(self, examples: list[dict]) -> Layout | None:
        """The cheapest shape that holds `examples` in at most `max_rows` rows; None when none does."""
        filling = self.filling().added(examples)
        return None if filling is None else filling.layout()

    def oversize(self, example: dict) -> Layout:
        """One row of its own for an example larger than a full row: the budget grown by whole quarters
        (tokens, crops, pooled tokens) and responses to a multiple of 8, so that similar records share
        a program."""
        counts, b = packing.media_counts(example), self.budget
        grow = lambda need, unit: max(unit, -(-need // unit) * unit) if unit else need
        quarter = lambda size, multiple=1: multiple * -(-size // (4 * multiple))
        budget = dataclasses.replace(
            b, row_tokens=grow(example["tokens"].shape[1], quarter(b.row_tokens)),
            row_crops=grow(counts["crops"], quarter(b.row_crops)), row_pooled=grow(counts["pooled"], quarter(b.row_pooled)),
            row_patches=grow(counts["patches"], quarter(b.row_patches, 4)), row_examples=1,
            max_responses=grow(example["read_positions"].shape[1], 8))
        if not _has_media(example):
            budget = dataclasses.replace(budget, row_crops=0, row_pooled=0, row_patches=0)
        return Layout(budget, [[0]], self.devices)

    def split(self, examples: list[dict]) -> list[tuple[list[int], Layout]]:
        """`examples` as consecutive batches, each with its layout (indices into `examples`)."""
        batches, indices, filling = [], [], self.filling()
        for index, example in enumerate(examples):
            if self.too_large(example):
                if indices:
                    batches.append((indices, filling.layout()))
                batches.append(([index], self.oversize(example)))
                indices, filling = [], self.filling()
                continue
            grown = filling.added([example])
            if grown is None:  # a full batch: this example starts the next
                batches.append((indices, filling.layout()))
                indices, grown = [], self.filling().added([example])
            indices.append(index)
            filling = grown
        if indices:
            batches.append((indices, filling.layout()))
        return batches

    def pack(self, examples: list[dict], layout: Layout) -> dict:
        """The model batch of `examples` placed as `layout` says (empty rows to `num_rows`)."""
        budget = layout.budget
        packed = [packing.pack_row([examples[i] for i in row], budget, self.media) for row in layout.rows]
        packed += [packing.pack_row([], budget, self.media)] * (layout.num_rows - len(packed))
        batch = {name: np.concatenate([row[name] for row in packed]) for name in packed[0]
                 if name not in _TRAINING_ONLY}
        if not _has_media_room(budget):  # a text-only program: no ViT at all
            for name in self.media.layout(budget):
                del batch[name]
        return batch

    @staticmethod
    def unpack(examples: list[dict], layout: Layout, scores_ben: np.ndarray) -> list[np.ndarray]:
        """Scores [N_i] of each example, in `examples` order, from the batch's [rows, slots, N]."""
        out = [None] * len(examples)
        for row, indices in enumerate(layout.rows):
            for slot, index in enumerate(indices):
                out[index] = scores_ben[row, slot, : examples[index]["read_positions"].shape[1]]
        return out

    def empty_layouts(self):
        """A layout of every shape (no examples), for compiling them all ahead."""
        for shapes in self.shapes.values():
            for budget in shapes:
                for rows in self.row_buckets:
                    yield Layout(budget, [], rows)


@dataclasses.dataclass(frozen=True)
class Filling:
    """A batch filled one example at a time: the first-fit placement in every row shape that still holds
    it, kept up to date, so that adding an example costs one look at each shape's rows instead of a
    re-layout of the whole batch. First fit in arrival order places an example where `packing.first_fit`
    of the whole list would, and a shape that stops holding the batch never holds it again (rows only
    fill up). Adding returns a new `Filling` that shares all but the one changed row, so a caller can
    add a record's examples together or not at all.

    Shapes without media room come first, so that a text-only batch, which both hold equally cheaply,
    gets the program without a ViT.
    """

    shapes: BatchShapes
    # (row shape, example indices per row, used resources per row) of each shape that holds the batch
    placements: tuple[tuple[packing.RowBudget, tuple[tuple[int, ...], ...], tuple[dict, ...]], ...]
    size: int = 0  # examples in the batch

    def added(self, examples: list[dict]) -> Filling | None:
        """This batch with `examples` too (self unchanged); None when no shape holds them all."""
        placements, size = self.placements, self.size
        for example in examples:
            grown = []
            for budget, rows, used in placements:
                if packing.exceeds(example, budget):
                    continue
                if self.shapes.deterministic and _has_media(example) != _has_media_room(budget):
                    continue  # each kind its own program
                row = packing.first_fitting_row(used, example, budget)
                if row == self.shapes.max_rows:
                    continue
                before, indices = (used[row], rows[row]) if row < len(rows) else (packing.EMPTY_ROW, ())
                grown.append((budget, rows[:row] + (indices + (size,),) + rows[row + 1:],
                              used[:row] + (packing.with_example(before, example),) + used[row + 1:]))
            if not grown:
                return None
            placements, size = tuple(grown), size + 1
        return Filling(self.shapes, placements, size)

    def layout(self) -> Layout:
        """The cheapest shape (rows x row tokens) that holds the batch."""
        best = None
        for budget, rows, _ in self.placements:
            num_rows = next(r for r in self.shapes.row_buckets if r >= len(rows))
            if best is None or num_rows * budget.row_tokens < best.num_rows * best.budget.row_tokens:
                best = Layout(budget, [list(r) for r in rows], num_rows)
        return best
