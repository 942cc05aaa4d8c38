"""Host-side per-patch arrays of the Qwen3-VL ViT, from the media grids of one example.

transformers derives them inside the model from `grid_thw` with per-image loops
(`vision_utils.get_vision_interpolation_indices_and_weights`, `get_vision_position_ids`,
`get_vision_cu_seqlens`); here they are data, so the device program has static shapes. For an
image of 4 x 4 patches (grid (1, 4, 4)) followed by a 2-frame video of 2 x 2 patches (grid (2, 2, 2)):

    patch_segment_ids  1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 | 2 2 2 2 | 3 3 3 3
    patch_positions    (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) ... | (0,0) (0,1) (1,0) (1,1) | same
                       (merge-block order: each 2 x 2 block of patches is contiguous)

One segment per (media item, temporal patch): the ViT attends within a frame, never across.
"""

from __future__ import annotations

import numpy as np

from mrrm_jax.models.qwen3_vl.config import VisionConfig


def _merge_block_order(height: int, width: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w grid, in the processor's merge-block order."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    blocks = lambda x: x.reshape(height // merge, merge, width // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    return blocks(rows), blocks(cols)


def _bilinear_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two taps and weights per position, align_corners=True, in the reference's float32 arithmetic
    (`index * (side - 1) / (size - 1)`, not torch.linspace's, which rounds differently)."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), np.float32(0))
    return taps, weights.astype(np.float32)


def vision_layout(grids_thw, config: VisionConfig) -> dict[str, np.ndarray]:
    """Per-patch arrays for one example's media, in token order; grids_thw [N, 3] in patches.

    Returns, for P = sum(t * h * w) patches:
        patch_segment_ids [P] int32    1, 2, ... per (item, temporal patch); add an offset when packing
        patch_positions   [P, 2] int32 (row, col) for the 2-D rope
        patch_pos_index   [P, 4] int32 corners into the learned (side x side) position table
        patch_pos_weight  [P, 4] float32 their bilinear weights
    """
    merge, side = config.spatial_merge_size, config.grid_side
    # Empty first parts, so an example without media gives empty arrays of the right shapes.
    segments, positions = [np.zeros(0, np.int32)], [np.zeros((0, 2), np.int32)]
    index, weight = [np.zeros((0, 4), np.int32)], [np.zeros((0, 4), np.float32)]
    for t, h, w in np.asarray(grids_thw, np.int64).reshape(-1, 3).tolist():
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of spatial_merge_size={merge}")
        rows, cols = _merge_block_order(h, w, merge)
        row_taps, row_weights = _bilinear_taps(rows, h, side)
        col_taps, col_weights = _bilinear_taps(cols, w, side)
        frame_index = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
        frame_weight = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            segments.append(np.full(h * w, len(segments)))
            positions.append(np.stack([rows, cols], axis=-1))
            index.append(frame_index)
            weight.append(frame_weight)
    return {"patch_segment_ids": np.concatenate(segments).astype(np.int32),
            "patch_positions": np.concatenate(positions).astype(np.int32),
            "patch_pos_index": np.concatenate(index).astype(np.int32),
            "patch_pos_weight": np.concatenate(weight).astype(np.float32)}
