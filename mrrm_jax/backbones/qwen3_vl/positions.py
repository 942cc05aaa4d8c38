"""Qwen3-VL's host-side positions of one example: the LM's M-RoPE positions (temporal, height, width)
and the ViT's per-patch arrays (`vision_layout`).

The same numbers as transformers' `Qwen3VLModel.get_rope_index`, for one unpadded example: a text run
of length L takes `p, p+1, .., p+L-1` on all three rows, where p is the next free position. A run of
vision pads with merged grid (t, h, w) takes `p + (t_index, row, column)`, row-major over the grid, and
the next text continues from `p + max(h, w)` (= its largest position + 1, as t = 1). Qwen3-VL puts time in
the text timestamps, not the positions: every temporal patch of a video is its own vision item with
t = 1 (`get_rope_index` repeats a video's grid per patch), so its t index is always 0.

An image with grid (1, 4, 6) (merged 2 x 3: six pads P) after text a, then text b and a video with grid
(2, 2, 4) (two temporal patches, each merged 1 x 2: two pads V) after its timestamp texts s (one token
here, really `<0.5 seconds>` etc.); [ and ] are `<|vision_start|>` / `<|vision_end|>`:

    index     0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19 20 21 22
    tokens    a  [  P  P  P  P  P  P  ]  b  [  s  [  V  V  ]  s  [  V  V  ]  ]  c
    temporal  0  1  2  2  2  2  2  2  5  6  7  8  9 10 10 12 13 14 15 15 17 18 19
    height    0  1  2  2  2  3  3  3  5  6  7  8  9 10 10 12 13 14 15 15 17 18 19
    width     0  1  2  3  4  2  3  4  5  6  7  8  9 10 11 12 13 14 15 16 17 18 19

transformers' `mrope_position_deltas`, which generation needs and a reward model does not, is
`positions.max() + 1 - len(tokens)`. For a padded batch, transformers computes these positions per
example over the tokens its `attention_mask` keeps and writes 0 at the padding (left or right); a packed
row instead restarts them per segment (`data/packing.py`).
"""

from __future__ import annotations

import numpy as np

IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 151655, 151656  # `<|image_pad|>`, `<|video_pad|>`
TEXT, IMAGE, VIDEO = 0, 1, 2  # transformers' `mm_token_type_ids` values


def rope_index(tokens_t, image_grids_thw=None, video_grids_thw=None, *, spatial_merge_size: int = 2,
               image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID) -> np.ndarray:
    """Positions [3, T] (int32, from 0) of one example's tokens: rows temporal, height, width.

    `image_grids_thw` / `video_grids_thw`: [n, 3] patch grids (before the spatial merge) of the example's
    images / videos in order, as the processor returns them.
    """
    tokens_t = np.asarray(tokens_t)
    kinds_t = np.select([tokens_t == image_token_id, tokens_t == video_token_id], [IMAGE, VIDEO], TEXT)
    video_grids = _grids(video_grids_thw)
    frame_grids = np.repeat(video_grids, video_grids[:, 0], axis=0)
    frame_grids[:, 0] = 1
    grids = {IMAGE: list(_grids(image_grids_thw)), VIDEO: list(frame_grids)}
    used = {IMAGE: 0, VIDEO: 0}

    # Runs of equal kind, as transformers groups `mm_token_type_ids`: two vision items with no token
    # between them would be one run there too.
    starts = np.flatnonzero(np.diff(kinds_t, prepend=-1))
    ends = np.append(starts[1:], len(tokens_t))
    positions_3t = np.empty((3, len(tokens_t)), np.int32)
    next_position = 0
    for start, end in zip(starts, ends):
        kind = kinds_t[start]
        if kind == TEXT:
            positions_3t[:, start:end] = next_position + np.arange(end - start)
            next_position += end - start
            continue
        name = "image" if kind == IMAGE else "video frame"
        if used[kind] == len(grids[kind]):
            raise ValueError(f"the tokens have more {name} runs than the {len(grids[kind])} {name} grids given")
        t, h, w = grids[kind][used[kind]] // [1, spatial_merge_size, spatial_merge_size]
        used[kind] += 1
        if t * h * w != end - start:
            raise ValueError(f"{name} {used[kind] - 1} (tokens {start}:{end}): {end - start} pads, but its grid "
                             f"{t} x {h} x {w} (merged) needs {t * h * w}")
        positions_3t[:, start:end] = next_position + np.indices((t, h, w)).reshape(3, -1)
        next_position += max(h, w)
    for kind, name in ((IMAGE, "image"), (VIDEO, "video frame")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids given, but the tokens have {used[kind]} {name} runs")
    return positions_3t


def _grids(grids_thw) -> np.ndarray:
    return np.asarray(grids_thw if grids_thw is not None else [], np.int64).reshape(-1, 3)


# -- the ViT's per-patch arrays ----------------------------------------------------------------------

# Host-side per-patch arrays of the Qwen3-VL ViT, from the media grids of one example.
#
# transformers derives them inside the model from `grid_thw` with per-image loops
# (`vision_utils.get_vision_interpolation_indices_and_weights`, `get_vision_position_ids`,
# `get_vision_cu_seqlens`); here they are data, so the device program has static shapes. For an
# image of 4 x 4 patches (grid (1, 4, 4)) followed by a 2-frame video of 2 x 2 patches (grid (2, 2, 2)):
#
#     patch_segment_ids  1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 | 2 2 2 2 | 3 3 3 3
#     patch_positions    (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) ... | (0,0) (0,1) (1,0) (1,1) | same
#                        (merge-block order: each 2 x 2 block of patches is contiguous)
#     patch_grid         (4,4) for each of the first 16               | (2,2) ...          | (2,2) ...
#
# One segment per (media item, temporal patch): the ViT attends within a frame, never across.


def _merge_block_order(height: int, width: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w grid, in the processor's merge-block order."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    blocks = lambda x: x.reshape(height // merge, merge, width // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    return blocks(rows), blocks(cols)


def vision_layout(grids_thw, merge_size: int = 2) -> dict[str, np.ndarray]:
    """Per-patch arrays for one example's media, in token order; grids_thw [N, 3] in patches.

    Returns, for P = sum(t * h * w) patches:
        patch_segment_ids [P] int32    1, 2, ... per (item, temporal patch); add an offset when packing
        patch_positions   [P, 2] int32 (row, col) in its frame: the 2-D rope and the position-table lookup
        patch_grid        [P, 2] int32 (h, w) of its frame: the learned position table is resampled to it
    """
    # Empty first parts, so an example without media gives empty arrays of the right shapes.
    segments, positions, grids = [np.zeros(0, np.int32)], [np.zeros((0, 2), np.int32)], [np.zeros((0, 2), np.int32)]
    for t, h, w in np.asarray(grids_thw, np.int64).reshape(-1, 3).tolist():
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of the merge size {merge_size}")
        rows, cols = _merge_block_order(h, w, merge_size)
        for _ in range(t):
            segments.append(np.full(h * w, len(segments)))
            positions.append(np.stack([rows, cols], axis=-1))
            grids.append(np.tile([h, w], (h * w, 1)))
    return {"patch_segment_ids": np.concatenate(segments).astype(np.int32),
            "patch_positions": np.concatenate(positions).astype(np.int32),
            "patch_grid": np.concatenate(grids).astype(np.int32)}
