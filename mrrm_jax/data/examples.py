"""Training examples from records: validation, response shuffling, and the length budget.

A record is the paper's schema (`prompt`, `responses`, `rankings`, optional media). Per example, per
epoch, the responses are shuffled (rankings alongside) with a generator the caller derives from
(seed, epoch, record index), so the order is reproducible and differs between epochs. The budget
policy follows the release: images fall back from 8 crops to 4, 2, 1; videos drop frames evenly
(halving the frame count); then responses that still do not fit are dropped from the end of the
(shuffled) order and the label is re-derived from the survivors' ranks. An example that cannot fit
with two responses is skipped. Every drop and skip is counted by reason: nothing is lost silently.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from mrrm_jax.core import reward
from mrrm_jax.data import formatting, packing


@dataclasses.dataclass(frozen=True)
class Budget:
    max_tokens: int = 24576  # the paper's maximum sequence length
    max_vision_tokens: int = 16384  # image/frame block tokens
    crop_fallback: tuple[int, ...] = (8, 4, 2, 1)  # smaller max_crops tried in turn for images over budget
    max_frames: int = 64  # first video frame count tried; halved while over budget
    min_frames: int = 2


class Skip(Exception):
    """An example that cannot be used; `reason` is the counter key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def frames_to_keep(budget: Budget, processor) -> Callable[[dict], np.ndarray]:
    """`media.load_video`'s `keep`: from a video's metadata, every frame that any of the budget's video
    attempts can sample, i.e. all a decoder needs to keep."""
    attempts = processor.media_attempts(budget, None, video=True)

    def keep(metadata: dict) -> np.ndarray:
        return np.unique(np.concatenate([processor.frame_indices(metadata, **attempt) for attempt in attempts]))

    return keep


def training_example(record: dict, media: dict, processor, budget: Budget,
                     rng: np.random.Generator, counts: collections.Counter, record_id: str = "record",
                     separate=None) -> dict:
    """One-row model batch with `read_positions`, `response_starts` and `labels`; raises `Skip`.

    `media`: decoded media ({"images": [...]} and/or {"video": frames, "video_metadata": {...}}).
    `counts` receives one count per drop (e.g. "crops_reduced", "response_dropped").
    `separate`: None, all responses in one sequence (the multi-response model); or the backbone's
    media layout (`backbones.media`), each response in its own sequence with its own copy of the prompt
    and media (a single-response model, `packing.joined`). The budget holds all of them together.
    """
    responses = record.get("responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) and r for r in responses):
        raise Skip("bad_responses", f"{record_id}: field 'responses' must be a list of non-empty strings")
    try:
        rankings = reward.check_rankings(record.get("rankings"), len(responses), record_id)
    except ValueError as error:
        raise Skip("bad_rankings", str(error)) from error

    if media.get("images") and media.get("video") is not None and not processor.images_with_video:
        raise Skip("image_and_video", f"{record_id}: this model takes images or one video per example, not both")
    order = rng.permutation(len(responses))
    responses, rankings = [responses[i] for i in order], rankings[order]
    attempts = processor.media_attempts(budget, media.get("images"), media.get("video"))
    media_cache = {}  # the media preprocessed once per attempt, reused while responses are dropped
    def sequences(responses, options) -> list[formatting.FormattedExample]:
        groups = [responses] if separate is None else [[response] for response in responses]
        return [formatting.format_example(processor, record.get("prompt", ""), group, **media,
                                          media_cache=media_cache, **options) for group in groups]

    for attempt, options in enumerate(attempts):
        formatted = sequences(responses, options)
        vision_tokens = sum(int((f.processor_outputs["mm_token_type_ids"] > 0).sum()) for f in formatted)
        if vision_tokens <= budget.max_vision_tokens:
            break
    else:
        raise Skip("vision_too_long", f"{record_id}: {vision_tokens} vision tokens even with {options}")
    if attempt:
        counts["frames_reduced" if media.get("video") is not None else "crops_reduced"] += 1

    while (tokens := sum(len(f.input_ids) for f in formatted)) > budget.max_tokens:
        if len(responses) == 2:
            raise Skip("too_long", f"{record_id}: {tokens} tokens with 2 responses (budget {budget.max_tokens})")
        counts["response_dropped"] += 1
        if rankings[-1] == rankings.min() and (rankings == rankings.min()).sum() == 1:
            counts["best_response_dropped"] += 1  # the label moves to the best survivor: counted
        responses, rankings = responses[:-1], rankings[:-1]
        formatted = sequences(responses, options)

    parts = [{**processor.model_batch(f.processor_outputs), "read_positions": f.read_positions[None],
              "response_starts": f.response_starts[None]} for f in formatted]
    batch = parts[0] if separate is None else packing.joined(parts, separate)
    batch["labels"] = np.array([reward.label_from_rankings(rankings, rng)], np.int32)
    batch["rankings"] = rankings[None].astype(np.int32)
    # Drawn after the label, so adding it changed no earlier draw: best to worst, for `plackett_luce`.
    batch["order"] = reward.order_from_rankings(rankings, rng)[None].astype(np.int32)
    return batch
