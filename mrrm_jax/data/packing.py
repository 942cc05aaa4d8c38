"""Packing several multi-response examples into fixed-size rows.

One segment = one example: its prompt, media and ALL its responses (design decision 3). A row holds
`row_tokens` tokens, `row_crops` ViT crops, `row_pooled` pooled image tokens and at most
`row_examples` examples. Two examples in a row of 14 tokens (b = bos, P = image patch, q = prompt,
a = response text, | = `<|resp_sep|>`, . = padding); the first has a 2-patch image:

    index           0 1 2 3 4 5 6   7 8 9 10 11   12 13
    tokens          b P P q a | a   b q a |  a    .  .
    segment_ids     1 1 1 1 1 1 1   2 2 2 2  2    0  0     padding is segment 0
    positions       0 1 2 3 4 5 6   0 1 2 3  4    0  0     restart per example
    read_positions  [[4, 6], [9, 11]]    per example: the token before each `|`, then its last token
    labels          [label_1, label_2]   -1 in empty example slots (media_kind likewise)
    order           per example: its response indices best to worst (`plackett_luce`), -1 padded
    crops           [crops of example 1, zero padding]
    pooling         [pooled rows of example 1 (indices into this row's crops), -1 rows]

Scores come out [rows, row_examples, max_responses], -inf where a read position is -1.
The pooled rows of a later example are shifted by the crops before it, so the k-th `<im_patch>`
of the row still takes the row's k-th pooled feature. grain's own packers pack 1-D features
without re-basing index-valued ones (pooling, read positions), so rows are assembled here.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class RowBudget:
    row_tokens: int
    row_crops: int
    row_pooled: int
    row_examples: int
    max_responses: int
    # Patches pooled per image token: 4 for Molmo2's 2x2 image pooling, 9 for its 3x3 video pooling.
    # Fixed, so rows with and without video have one shape.
    pool_slots: int = 9

    def fits(self, used: dict, example: dict) -> bool:
        return (used["tokens"] + example["tokens"].shape[1] <= self.row_tokens
                and used["crops"] + _num(example, "crops") <= self.row_crops
                and used["pooled"] + _num(example, "pooling") <= self.row_pooled
                and used["examples"] < self.row_examples)

    def fullness(self, examples: list[dict]) -> float:
        """The largest share of any row budget that `examples` use together: 1.0 is a row nothing more fits."""
        return max(sum(e["tokens"].shape[1] for e in examples) / self.row_tokens,
                   sum(_num(e, "crops") for e in examples) / max(self.row_crops, 1),
                   sum(_num(e, "pooling") for e in examples) / max(self.row_pooled, 1),
                   len(examples) / self.row_examples)


def _num(example: dict, field: str) -> int:
    return example[field].shape[1] if field in example else 0


def exceeds(example: dict, budget: RowBudget) -> list[str]:
    """What of `example` an empty row of `budget` cannot hold, with the numbers ([] when it fits)."""
    counts = {"tokens": example["tokens"].shape[1], "crops": _num(example, "crops"),
              "pooled image tokens": _num(example, "pooling"), "responses": example["read_positions"].shape[1],
              "pooled patches per token": example["pooling"].shape[2] if "pooling" in example else 0}
    limits = {"tokens": budget.row_tokens, "crops": budget.row_crops, "pooled image tokens": budget.row_pooled,
              "responses": budget.max_responses, "pooled patches per token": budget.pool_slots}
    return [f"{counts[name]} {name} (limit {limits[name]})" for name in counts if counts[name] > limits[name]]


def first_fit(examples: list[dict], budget: RowBudget) -> list[list[int]]:
    """Example indices per row, first-fit in the given order. An example larger than a row is an error."""
    rows, used = [], []
    for index, example in enumerate(examples):
        over = exceeds(example, budget)
        if over:
            raise ValueError(f"example {index} does not fit an empty row: {', '.join(over)}")
        for row, counts in zip(rows, used):
            if budget.fits(counts, example):
                break
        else:
            row, counts = [], {"tokens": 0, "crops": 0, "pooled": 0, "examples": 0}
            rows.append(row)
            used.append(counts)
        row.append(index)
        counts["tokens"] += example["tokens"].shape[1]
        counts["crops"] += _num(example, "crops")
        counts["pooled"] += _num(example, "pooling")
        counts["examples"] += 1
    return rows


def row_layout(budget: RowBudget, patch_dim: tuple[int, int]) -> dict[str, tuple[tuple[int, ...], type, int]]:
    """{field: (shape of one row without its leading 1, dtype, fill value)}: the packed row's arrays.

    `patch_dim` = (patches per crop, values per patch). `media_kind` indexes `pipeline.MEDIA_KINDS`.
    """
    tokens, slots = (budget.row_tokens,), (budget.row_examples, budget.max_responses)
    return {"tokens": (tokens, np.int32, 0), "positions": (tokens, np.int32, 0), "segment_ids": (tokens, np.int32, 0),
            "crops": ((budget.row_crops, *patch_dim), np.float32, 0),
            "pooling": ((budget.row_pooled, budget.pool_slots), np.int32, -1),
            "read_positions": (slots, np.int32, -1), "response_starts": (slots, np.int32, -1),
            "order": (slots, np.int32, -1),
            "labels": ((budget.row_examples,), np.int32, -1), "media_kind": ((budget.row_examples,), np.int32, -1)}


def pack_row(examples: list[dict], budget: RowBudget, patch_dim: tuple[int, int]) -> dict:
    """One packed row (a batch of 1) from one-row examples; see the module docstring for the arrays."""
    patches = patch_dim[0]
    row = {name: np.full((1, *shape), fill, dtype) for name, (shape, dtype, fill) in row_layout(budget, patch_dim).items()}
    token, crop, pooled = 0, 0, 0
    for slot, example in enumerate(examples):
        length = example["tokens"].shape[1]
        row["tokens"][0, token: token + length] = example["tokens"][0]
        row["positions"][0, token: token + length] = example["positions"][0]
        row["segment_ids"][0, token: token + length] = slot + 1
        if "crops" in example:
            crops, pooling = example["crops"][0], example["pooling"][0]
            row["crops"][0, crop: crop + len(crops)] = crops
            row["pooling"][0, pooled: pooled + len(pooling), : pooling.shape[1]] = np.where(
                pooling >= 0, pooling + crop * patches, -1)
            crop, pooled = crop + len(crops), pooled + len(pooling)
        for field in ("read_positions", "response_starts"):
            indices = example[field][0] if field in example else np.full(example["read_positions"].shape[1], -1)
            row[field][0, slot, : len(indices)] = np.where(indices >= 0, indices + token, -1)
        if "order" in example:  # response indices within the example: no shift
            row["order"][0, slot, : example["order"].shape[1]] = example["order"][0]
        for field in ("labels", "media_kind"):
            row[field][0, slot] = example.get(field, np.array([-1]))[0]
        token += length
    return row
