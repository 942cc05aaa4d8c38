"""How Molmo2's media sit in a packed row (`data/packing.py` packs the rest): the arrays per row, where
an example's media go, and what a run's row budget must hold for them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # names only: the data package imports the backbone table, which imports this
    from mrrm_jax.data.examples import Budget
    from mrrm_jax.data.packing import RowBudget


@dataclasses.dataclass(frozen=True)
class Molmo2Media:
    """Molmo2's row media: ViT crops, and per pooled image token the indices of its patches into the
    row's flattened crops (re-based: a later example's indices shift by the crops before it)."""

    patch_dim: tuple[int, int]  # (patches per crop, values per patch)
    position_rows: int = 1  # positions [T]: 1-D rope

    def layout(self, budget: RowBudget) -> dict:
        return {"crops": ((budget.row_crops, *self.patch_dim), np.uint8, 0),
                "pooling": ((budget.row_pooled, budget.pool_slots), np.int32, -1)}

    def budget_problem(self, row: RowBudget, budget: Budget) -> str | None:
        """Why an example the length budget accepts may not fit an empty row's pooled tokens, or None."""
        if budget.max_vision_tokens > row.row_pooled:
            return (f"budget.max_vision_tokens={budget.max_vision_tokens} exceeds packing.row_pooled={row.row_pooled}: "
                    "lower the budget or raise the row")
        return None

    def processor_problem(self, row: RowBudget, budget: Budget, processor) -> str | None:
        """Why one image at the processor's `max_crops` (+ its low-resolution view) or one video at the
        budget's first frame count may not fit an empty row's crops, or None (the processor is known
        only once its files are)."""
        max_crops = processor.options.max_crops
        needed = max(max_crops + 1, budget.max_frames)
        if needed > row.row_crops:
            return (f"packing.row_crops={row.row_crops} holds neither an image of the processor's "
                    f"max_crops={max_crops} (+1) nor a video of budget.max_frames={budget.max_frames}: "
                    f"raise row_crops to {needed} or lower those")
        return None

    def place(self, row: dict, example: dict, used: dict) -> None:
        if "crops" not in example:
            return
        crops, pooling, crop, pooled = example["crops"][0], example["pooling"][0], used["crops"], used["pooled"]
        if crops.dtype != np.uint8:  # normalised floats would be cast to garbage pixels
            raise ValueError(f"example crops are {crops.dtype}; packed rows hold uint8 pixels "
                             "(Molmo2Processor.media_head)")
        row["crops"][0, crop: crop + len(crops)] = crops
        row["pooling"][0, pooled: pooled + len(pooling), : pooling.shape[1]] = np.where(
            pooling >= 0, pooling + crop * self.patch_dim[0], -1)
