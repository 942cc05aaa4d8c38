"""Interop with Hugging Face `transformers`: feed `Molmo2Processor` outputs to our model."""

from __future__ import annotations

import numpy as np


def batch_from_processor(inputs: dict, image_patch_id: int) -> dict:
    """`Molmo2Processor` outputs (numpy or torch; one or more rows) -> our batch layout (see model.py).

    The processor concatenates every crop of the batch and pools with global patch indices; we
    give each row its own crops and re-base the indices to them. Like transformers, pooled rows
    with no valid patch are dropped first (they have no `<im_patch>` token).
    """
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    tokens = inputs["input_ids"].astype(np.int32)
    mask = inputs["attention_mask"].astype(np.int32)
    # Positions count real tokens only, so a left-padded row starts at 0 like an unpadded one.
    batch = {"tokens": tokens, "segment_ids": mask, "positions": np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)}
    if "pixel_values" in inputs:
        pixels, pooling = inputs["pixel_values"], inputs["image_token_pooling"]
        grids = inputs["image_grids"]
        tokens_per_media = grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]
        crops_per_media = inputs["image_num_crops"]
    elif "pixel_values_videos" in inputs:
        pixels, pooling = inputs["pixel_values_videos"], inputs["video_token_pooling"]
        grids = inputs["video_grids"]
        tokens_per_media, crops_per_media = grids[:, 0] * grids[:, 1] * grids[:, 2], grids[:, 0]
    else:
        return batch
    pooling = pooling[(pooling >= 0).any(-1)]
    patches = pixels.shape[1]
    # Media go to rows in order, as many as each row has patch-token runs' worth of tokens.
    patch_tokens_per_row = (tokens == image_patch_id).sum(1)
    row_crops, row_pooling = [[] for _ in tokens], [[] for _ in tokens]
    crop_start, token_start, row = 0, 0, 0
    for n_tokens, n_crops in zip(tokens_per_media, crops_per_media):
        while sum(len(p) for p in row_pooling[row]) >= patch_tokens_per_row[row]:
            row += 1
        local_offset = sum(len(c) for c in row_crops[row]) * patches
        rows = pooling[token_start: token_start + n_tokens]
        row_pooling[row].append(np.where(rows >= 0, rows - crop_start * patches + local_offset, -1))
        row_crops[row].append(pixels[crop_start: crop_start + n_crops])
        crop_start, token_start = crop_start + n_crops, token_start + n_tokens
    max_crops = max(sum(len(c) for c in r) for r in row_crops)
    max_tokens = max(patch_tokens_per_row)
    crops = np.zeros((len(tokens), max_crops, patches, pixels.shape[2]), pixels.dtype)
    pool = np.full((len(tokens), max_tokens, pooling.shape[1]), -1, np.int32)
    for b in range(len(tokens)):
        if row_crops[b]:
            c, p = np.concatenate(row_crops[b]), np.concatenate(row_pooling[b])
            crops[b, : len(c)], pool[b, : len(p)] = c, p
    batch.update(crops=crops, pooling=pool)
    return batch
