"""Padding single examples into one fixed-shape batch, with sizes rounded up to buckets.

Buckets keep the number of compiled programs small: a batch is padded to the next multiple of
`token_bucket` tokens and to the next power of two of pooled tokens and responses. Crops are padded
to the batch's largest count only: every padded crop costs a full ViT pass (Molmo2 makes few
distinct counts: 1 + its tiling, or the number of frames). With `geometric=True` (scoring a whole
benchmark, where lengths are anything) tokens are rounded up to the next of 128 x {1, 1.5, 2, 3, 4,
6, 8, ...} and crops to the next of 1, 2, 3, 4, 6, 8, ... instead: at most a third padding, and a
number of programs that grows with the logarithm of the longest example.
"""

from __future__ import annotations

import numpy as np

# field -> padding value; every field is [1, ...] per example, padded on its axes >= 1.
PAD_VALUES = {"tokens": 0, "positions": 0, "segment_ids": 0, "crops": 0, "pooling": -1,
              "read_positions": -1, "response_starts": -1, "labels": -1}


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def geometric_bucket(n: int, unit: int = 1) -> int:
    """The smallest of unit x {1, 2, 3, 4, 6, 8, 12, 16, ...} (powers of two and 1.5 times them) >= n."""
    if n <= 0:
        return 0
    size = unit
    while size < n:
        size *= 2
    three_quarters = size * 3 // 4
    return three_quarters if three_quarters * 4 == size * 3 and three_quarters >= max(n, unit) else size


def collate(examples: list[dict], token_bucket: int = 128, batch_size: int | None = None,
            geometric: bool = False) -> dict:
    """Stack per-example batches of one row each; `batch_size` pads with empty rows."""
    rows = batch_size or len(examples)
    fields = set().union(*examples)
    # Text-only examples next to ones with media get zero crops and zero pooled tokens.
    for name in ("crops", "pooling"):
        if name in fields:
            like = next(e[name] for e in examples if name in e)
            examples = [e if name in e else {**e, name: np.zeros((1, 0, *like.shape[2:]), like.dtype)}
                        for e in examples]
    batch = {}
    for name in fields:
        arrays = [e[name] for e in examples]
        shape = [max(a.shape[axis] for a in arrays) for axis in range(1, arrays[0].ndim)]
        if name in ("tokens", "positions", "segment_ids"):
            shape[0] = (geometric_bucket(shape[0], token_bucket) if geometric
                        else -(-shape[0] // token_bucket) * token_bucket)
        elif name == "crops" and geometric:
            shape[0] = geometric_bucket(shape[0])
        elif name in ("pooling", "read_positions", "response_starts"):
            shape[0] = _pow2(shape[0])
        out = np.full((rows, *shape), PAD_VALUES[name], arrays[0].dtype)
        for row, a in enumerate(arrays):
            out[(row, *(slice(0, s) for s in a.shape[1:]))] = a[0]
        batch[name] = out
    return batch
