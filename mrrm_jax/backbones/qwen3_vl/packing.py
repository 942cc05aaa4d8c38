"""How Qwen3-VL's media sit in a packed row (`data/packing.py` packs the rest): the arrays per row, where
an example's media go, and what a run's row budget must hold for them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # names only: the data package imports the backbone table, which imports this
    from mrrm_jax.data.examples import Budget
    from mrrm_jax.data.packing import RowBudget


@dataclasses.dataclass(frozen=True)
class Qwen3VLMedia:
    """Qwen3-VL's row media: ViT patches with their per-patch arrays (`positions.vision_layout`); the
    patch segment ids (one per media item and temporal patch) of a later example shift by those before."""

    patch_dim: int  # values per patch (C * T * p * p)
    position_rows: int = 3  # positions [3, T]: M-RoPE (t, h, w)

    def layout(self, budget: RowBudget) -> dict:
        patches = budget.row_patches
        # Padding patches: grid (1, 1), so resampling the position table divides by nothing odd.
        return {"patches": ((patches, self.patch_dim), np.float32, 0), "patch_segment_ids": ((patches,), np.int32, 0),
                "patch_positions": ((patches, 2), np.int32, 0), "patch_grid": ((patches, 2), np.int32, 1)}

    def budget_problem(self, row: RowBudget, budget: Budget) -> str | None:
        """Why an example the length budget accepts may not fit an empty row's patches (4 per vision
        token: the 2 x 2 merge), or None."""
        if row.row_patches % 4 or 4 * budget.max_vision_tokens > row.row_patches:
            return (f"packing.row_patches={row.row_patches} must be a multiple of 4 and hold 4 x "
                    f"budget.max_vision_tokens={4 * budget.max_vision_tokens} patches: raise it or lower the budget")
        return None

    def processor_problem(self, row: RowBudget, budget: Budget, processor) -> str | None:
        return None  # the patches are bounded by the budget's vision tokens, checked at parse

    def place(self, row: dict, example: dict, used: dict) -> None:
        if "patches" not in example:
            return
        start, count = used["patches"], example["patches"].shape[1]
        segments_before = row["patch_segment_ids"][0, :start].max(initial=0)
        for field in ("patches", "patch_segment_ids", "patch_positions", "patch_grid"):
            values = example[field][0]
            row[field][0, start: start + count] = values + segments_before if field == "patch_segment_ids" else values
