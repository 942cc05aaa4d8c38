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
of the row still takes the row's k-th pooled feature (`backbones/molmo2/packing.py`). grain's own packers pack 1-D features
without re-basing index-valued ones (pooling, read positions), so rows are assembled here.

A Qwen3-VL row (`backbones/qwen3_vl/packing.py`) has M-RoPE positions [3, T] instead (each example's from its own
rope index, so they restart at 0 too) and, instead of crops and pooling, `row_patches` ViT patches:
the examples' patches one after another, so the row's k-th vision pad takes its k-th merged token
(4 patches); the ViT's attention segments (one per media item and temporal patch) are re-based like
the token segments:

    patches            [patches of example 1 | patches of example 2 | zero padding]
    patch_segment_ids  [1 1 1 1 2 2 2 2      | 3 3 3 3             | 0 0 0 0]   two video frames, an image
    patch_positions, patch_grid: each example's, as `vision_layout` gives them
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
    row_patches: int = 0  # Qwen3-VL's ViT patches (a multiple of 4: whole merged tokens); 0 for Molmo2

    def fits(self, used: dict, example: dict) -> bool:
        counts = media_counts(example)
        return (used["tokens"] + example["tokens"].shape[1] <= self.row_tokens
                and all(used[name] + counts[name] <= self.capacity(name) for name in counts)
                and used["examples"] < self.row_examples)

    def capacity(self, resource: str) -> int:
        return {"crops": self.row_crops, "pooled": self.row_pooled, "patches": self.row_patches}[resource]

    def fullness(self, examples: list[dict]) -> float:
        """The largest share of any row budget that `examples` use together: 1.0 is a row nothing more fits."""
        totals = {name: sum(media_counts(e)[name] for e in examples) for name in MEDIA_RESOURCES}
        return max(sum(e["tokens"].shape[1] for e in examples) / self.row_tokens,
                   *(totals[name] / max(self.capacity(name), 1) for name in totals),
                   len(examples) / self.row_examples)


# Media resources of a row, each counted by the first axis of one example array: Molmo2's ViT crops
# and pooled image tokens, Qwen3-VL's ViT patches.
MEDIA_RESOURCES = {"crops": "crops", "pooled": "pooling", "patches": "patches"}


def media_counts(example: dict) -> dict[str, int]:
    return {name: example[field].shape[1] if field in example else 0 for name, field in MEDIA_RESOURCES.items()}


def exceeds(example: dict, budget: RowBudget) -> list[str]:
    """What of `example` an empty row of `budget` cannot hold, with the numbers ([] when it fits)."""
    media = media_counts(example)
    counts = {"tokens": example["tokens"].shape[1], "crops": media["crops"], "pooled image tokens": media["pooled"],
              "patches": media["patches"], "responses": example["read_positions"].shape[1],
              "pooled patches per token": example["pooling"].shape[2] if "pooling" in example else 0}
    limits = {"tokens": budget.row_tokens, "crops": budget.row_crops, "pooled image tokens": budget.row_pooled,
              "patches": budget.row_patches, "responses": budget.max_responses,
              "pooled patches per token": budget.pool_slots}
    return [f"{counts[name]} {name} (limit {limits[name]})" for name in counts if counts[name] > limits[name]]


# What an empty row has used of its budget (`RowBudget.fits`).
EMPTY_ROW = {"tokens": 0, "examples": 0, **dict.fromkeys(MEDIA_RESOURCES, 0)}


def with_example(used: dict, example: dict) -> dict:
    """A row's used resources with `example` added (a new dict)."""
    media = media_counts(example)
    return {"tokens": used["tokens"] + example["tokens"].shape[1], "examples": used["examples"] + 1,
            **{name: used[name] + media[name] for name in media}}


def first_fitting_row(used_rows, example: dict, budget: RowBudget) -> int:
    """The first of the rows (their used resources) that `example` fits; len(used_rows): a new row."""
    return next((row for row, used in enumerate(used_rows) if budget.fits(used, example)), len(used_rows))


def first_fit(examples: list[dict], budget: RowBudget) -> list[list[int]]:
    """Example indices per row, first-fit in the given order. An example larger than a row is an error."""
    rows, used_rows = [], []
    for index, example in enumerate(examples):
        over = exceeds(example, budget)
        if over:
            raise ValueError(f"example {index} does not fit an empty row: {', '.join(over)}")
        row = first_fitting_row(used_rows, example, budget)
        if row == len(rows):
            rows.append([])
            used_rows.append(EMPTY_ROW)
        rows[row].append(index)
        used_rows[row] = with_example(used_rows[row], example)
    return rows


def row_layout(budget: RowBudget, media) -> dict[str, tuple[tuple[int, ...], type, int]]:
    """{field: (shape of one row without its leading 1, dtype, fill value)}: the packed row's arrays.

    `media`: the backbone's media layout (`backbones.media(config)`, e.g. `backbones/molmo2/packing.py`).
    `media_kind` indexes `pipeline.MEDIA_KINDS`.
    """
    tokens, slots = (budget.row_tokens,), (budget.row_examples, budget.max_responses)
    positions = tokens if media.position_rows == 1 else (media.position_rows, *tokens)
    return {"tokens": (tokens, np.int32, 0), "positions": (positions, np.int32, 0), "segment_ids": (tokens, np.int32, 0),
            **media.layout(budget),
            "read_positions": (slots, np.int32, -1), "response_starts": (slots, np.int32, -1),
            "order": (slots, np.int32, -1),
            "labels": ((budget.row_examples,), np.int32, -1), "media_kind": ((budget.row_examples,), np.int32, -1)}


def pack_row(examples: list[dict], budget: RowBudget, media) -> dict:
    """One packed row (a batch of 1) from one-row examples; see the module docstring for the arrays."""
    row = {name: np.full((1, *shape), fill, dtype) for name, (shape, dtype, fill) in row_layout(budget, media).items()}
    used = {"tokens": 0, "segments": 0, **dict.fromkeys(MEDIA_RESOURCES, 0)}
    for slot, example in enumerate(examples):
        token, length = used["tokens"], example["tokens"].shape[1]
        row["tokens"][0, token: token + length] = example["tokens"][0]
        row["positions"][0, ..., token: token + length] = example["positions"][0]
        # An example is one segment, or several (`joined`): its own ids 1, 2, ..., shifted past the row's
        segments_t = example["segment_ids"][0] if "segment_ids" in example else np.ones(length, np.int32)
        row["segment_ids"][0, token: token + length] = segments_t + used["segments"]
        used["segments"] += int(segments_t.max(initial=0))
        media.place(row, example, used)
        for field in ("read_positions", "response_starts"):
            indices = example[field][0] if field in example else np.full(example["read_positions"].shape[1], -1)
            row[field][0, slot, : len(indices)] = np.where(indices >= 0, indices + token, -1)
        if "order" in example:  # response indices within the example: no shift
            row["order"][0, slot, : example["order"].shape[1]] = example["order"][0]
        for field in ("labels", "media_kind"):
            row[field][0, slot] = example.get(field, np.array([-1]))[0]
        used["tokens"] += length
        for name, count in media_counts(example).items():
            used[name] += count
    return row


def joined(examples: list[dict], media) -> dict:
    """One example of several one-response sequences, each its own segment, read one score per sequence:
    a single-response reward model's group (`examples.training_example(separate=...)`). Packed like a
    row of its own, tight, so a response sees its prompt and media but no other response, with positions
    restarting at 0, exactly as when it is scored alone."""
    counts = [media_counts(e) for e in examples]
    total = {name: sum(c[name] for c in counts) for name in MEDIA_RESOURCES}
    budget = RowBudget(row_tokens=sum(e["tokens"].shape[1] for e in examples), row_crops=total["crops"],
                       row_pooled=total["pooled"], row_examples=len(examples), max_responses=1,
                       pool_slots=max((e["pooling"].shape[2] for e in examples if "pooling" in e), default=1),
                       row_patches=total["patches"])
    row = pack_row(examples, budget, media)
    for field in ("read_positions", "response_starts"):  # [1, sequences, 1] -> [1, responses]
        row[field] = row[field].reshape(1, -1)
    for field in ("order", "labels", "media_kind"):  # the group's, set by the caller
        del row[field]
    return row
