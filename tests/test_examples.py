"""Training examples: shuffling with rankings, the length budget, and counted drops and skips."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from mrrm_jax.data import examples, formatting
from mrrm_jax.backbones import load_processor
from mrrm_jax.backbones.molmo2.hf_batch import batch_from_processor

RECORD = {"prompt": "Which colour is the square?",
          "responses": ["Red.", "It is blue, clearly.", "Green, I think.", "There is no square in this image."],
          "rankings": [2, 1, 3, 3]}


@pytest.fixture(scope="module")
def setup(processor_dir):
    return load_processor(processor_dir)


def _image():
    return {"images": [Image.fromarray(np.random.RandomState(0).randint(0, 256, (300, 400, 3), dtype=np.uint8))]}


def _build(setup, record=RECORD, media=None, budget=examples.Budget(), seed=0):
    processor = setup
    counts = collections.Counter()
    example = examples.training_example(record, media or {}, processor, budget,
                                        np.random.default_rng(seed), counts, "record 3")
    return example, counts


def _response_texts(setup, example):
    tokenizer = setup.tokenizer
    tokens = example["tokens"][0]
    return [tokenizer.decode(tokens[s: r + 1]).strip() for s, r in zip(example["response_starts"][0],
                                                                        example["read_positions"][0])]


def test_shuffle_is_seeded_and_rankings_follow_the_responses(setup):
    first, _ = _build(setup, seed=1)
    again, _ = _build(setup, seed=1)
    other, _ = _build(setup, seed=2)
    np.testing.assert_array_equal(first["tokens"], again["tokens"])
    assert not np.array_equal(first["tokens"], other["tokens"])
    for example in (first, other):
        texts = _response_texts(setup, example)
        rank_of = dict(zip(RECORD["responses"], RECORD["rankings"]))
        assert [rank_of[t] for t in texts] == list(example["rankings"][0])
        assert texts[example["labels"][0]] == "It is blue, clearly."  # rank 1


def test_images_take_the_processors_crops_then_fall_back_to_fewer(setup):
    """First the processor's own max_crops (what scoring uses), then the budget's smaller fallbacks."""
    full, counts = _build(setup, media=_image())
    alone = formatting.format_example(setup, RECORD["prompt"], ["a", "b"], **_image()).processor_outputs
    assert full["crops"].shape[1] == len(alone["pixel_values"]) and not counts
    vision_full = int((full["pooling"][0] >= 0).any(-1).sum())
    budget = examples.Budget(max_vision_tokens=vision_full - 1)
    reduced, counts = _build(setup, media=_image(), budget=budget)
    assert counts["crops_reduced"] == 1
    assert reduced["crops"].shape[1] < full["crops"].shape[1]


def test_responses_that_do_not_fit_are_dropped_and_counted(setup):
    full, _ = _build(setup, media=_image(), seed=3)
    length = full["tokens"].shape[1]
    example, counts = _build(setup, media=_image(), seed=3, budget=examples.Budget(max_tokens=length - 3))
    assert counts["response_dropped"] == 1 and example["read_positions"].shape[1] == 3
    ranks = example["rankings"][0]
    assert ranks[example["labels"][0]] == ranks.min()  # label re-derived from the survivors
    # The media, preprocessed once and reused across the drop, as a fresh formatting of the survivors.
    processor = setup
    fresh = batch_from_processor(formatting.format_example(
        processor, RECORD["prompt"], _response_texts(setup, example), **_image(),
        ).processor_outputs, processor.image_patch_id)
    assert set(fresh) <= set(example)
    for key, value in fresh.items():
        np.testing.assert_array_equal(example[key], value, err_msg=key)
    with pytest.raises(examples.Skip, match="record 3: .* tokens with 2 responses") as skip:
        _build(setup, budget=examples.Budget(max_tokens=20))
    assert skip.value.reason == "too_long"


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "x", "responses": ["only one"], "rankings": [1]}, "bad_rankings"),
    ({"prompt": "x", "responses": ["a", "b"], "rankings": [1, 2, 3]}, "bad_rankings"),
    ({"prompt": "x", "rankings": [1, 2]}, "bad_responses"),
    ({"prompt": "x", "responses": ["a", ""], "rankings": [1, 2]}, "bad_responses"),
])
def test_bad_records_are_skips_with_a_reason(setup, record, reason):
    with pytest.raises(examples.Skip) as skip:
        _build(setup, record=record)
    assert skip.value.reason == reason and "record 3" in str(skip.value)
