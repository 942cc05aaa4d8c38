"""Scoring batches: the incremental `Filling` lays a batch out exactly as first fit of the whole list in
every row shape (the cheapest that holds it), and `split` cuts a stream into full batches."""

from __future__ import annotations

import numpy as np

from mrrm_jax.backbones.molmo2.packing import Molmo2Media
from mrrm_jax.data import packing
from mrrm_jax.scoring.batch_shapes import BatchShapes

BUDGET = packing.RowBudget(row_tokens=128, row_crops=8, row_pooled=64, row_examples=4, max_responses=4)


def _example(tokens: int, crops: int) -> dict:
    example = {"tokens": np.zeros((1, tokens), np.int32), "read_positions": np.zeros((1, 2), np.int32)}
    if crops:
        example.update(crops=np.zeros((1, crops, 1, 1), np.uint8), pooling=np.zeros((1, 4 * crops, 4), np.int32))
    return example


def _stream(seed: int, count: int = 60) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [_example(int(rng.integers(5, 129)), int(rng.integers(0, 9)) if rng.random() < 0.5 else 0)
            for _ in range(count)]


def _first_fit(examples: list[dict], budget: packing.RowBudget) -> list[list[int]] | None:
    """First fit of the whole list, written out here: each example into the first row with room for its
    tokens, crops, pooled tokens and one more example; None when one is larger than a row."""
    rows = []
    for index, example in enumerate(examples):
        if example["tokens"].shape[1] > budget.row_tokens or _crops(example) > budget.row_crops:
            return None
        for row in rows:
            if (sum(examples[i]["tokens"].shape[1] for i in row) + example["tokens"].shape[1] <= budget.row_tokens
                    and sum(map(_crops, (examples[i] for i in row))) + _crops(example) <= budget.row_crops
                    and 4 * (sum(map(_crops, (examples[i] for i in row))) + _crops(example)) <= budget.row_pooled
                    and len(row) < budget.row_examples):
                row.append(index)
                break
        else:
            rows.append([index])
    return rows


def _crops(example: dict) -> int:
    return example["crops"].shape[1] if "crops" in example else 0


def _cheapest(shapes: BatchShapes, examples: list[dict]):
    """(rows x row tokens, placement) of the cheapest shape, by first fit of the whole list; None when no
    shape holds the examples in `max_rows` rows."""
    with_media = any(map(_crops, examples))
    best = None
    for budget in shapes.shapes[with_media]:
        rows = _first_fit(examples, budget)
        if rows is not None and len(rows) <= shapes.max_rows:
            cost = next(r for r in shapes.row_buckets if r >= len(rows)) * budget.row_tokens
            best = min(best, (cost, rows), key=lambda c: c[0]) if best else (cost, rows)
    return best


def test_filling_lays_out_as_first_fit_of_the_whole_batch():
    shapes = BatchShapes(BUDGET, Molmo2Media((1, 1)), max_rows=4)
    for seed in range(5):
        examples, filling = _stream(seed), shapes.filling()
        for end in range(1, len(examples) + 1):
            grown = filling.added([examples[end - 1]])
            expected = _cheapest(shapes, examples[:end])
            if expected is None:
                assert grown is None, (seed, end)
                break
            layout = grown.layout()
            assert (layout.num_rows * layout.budget.row_tokens, layout.rows) == expected, (seed, end)
            assert bool(layout.budget.row_crops) == any("crops" in e for e in examples[:end])
            filling = grown
        else:
            raise AssertionError("the stream never filled a batch: make it longer")


def test_a_record_s_examples_are_added_together_or_not_at_all():
    shapes = BatchShapes(BUDGET, Molmo2Media((1, 1)), max_rows=1)
    filling = shapes.filling().added([_example(100, 0)])
    assert filling.added([_example(20, 0), _example(20, 0)]) is None  # the second would need a row more
    assert filling.layout().rows == [[0]]  # unchanged
    assert filling.added([_example(20, 0)]).layout().rows == [[0, 1]]


def test_split_cuts_full_consecutive_batches_and_puts_an_oversize_example_alone():
    shapes = BatchShapes(BUDGET, Molmo2Media((1, 1)), max_rows=2)
    examples = _stream(7, 40)
    examples.insert(13, _example(300, 0))  # longer than a row
    batches = shapes.split(examples)
    assert [i for indices, _ in batches for i in indices] == list(range(len(examples)))
    for indices, layout in batches:
        if indices == [13]:
            assert layout.budget.row_tokens >= 300 and layout.rows == [[0]]
            continue
        assert (layout.num_rows * layout.budget.row_tokens, layout.rows) == _cheapest(shapes, [examples[i] for i in indices])
        following = indices[-1] + 1
        if following < len(examples) and following != 13:  # a batch ends only when the next would not fit
            assert _cheapest(shapes, [examples[i] for i in indices + [following]]) is None
