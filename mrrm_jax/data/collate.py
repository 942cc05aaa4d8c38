"""Padding single examples into one fixed-shape batch, with sizes rounded up to buckets.

Buckets keep the number of compiled programs small: a batch is padded to the next multiple of
`token_bucket` tokens and to the next power of two of pooled tokens and responses. Crops are padded
to the batch's largest count only: every padded crop costs a full ViT pass (Molmo2 makes few
distinct counts: 1 + its tiling, or the number of frames).
"""

from __future__ import annotations

import numpy as np

# field -> padding value; every field is [1, ...] per example, padded on its axes >= 1.
PAD_VALUES = {"tokens": 0, "positions": 0, "segment_ids": 0, "crops": 0.0, "pooling": -1,
              "read_positions": -1, "response_starts": -1, "labels": -1}


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def collate(examples: list[dict], token_bucket: int = 128, batch_size: int | None = None) -> dict:
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
            shape[0] = -(-shape[0] // token_bucket) * token_bucket
        elif name in ("pooling", "read_positions", "response_starts"):
            shape[0] = _pow2(shape[0])
        out = np.full((rows, *shape), PAD_VALUES[name], arrays[0].dtype)
        for row, a in enumerate(arrays):
            out[(row, *(slice(0, s) for s in a.shape[1:]))] = a[0]
        batch[name] = out
    return batch
