"""Packing: several examples in one row score exactly as each example alone (design decision 3)."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from mrrm_jax.data import packing
from mrrm_jax import backbones
from mrrm_jax.scoring.reward_model import RewardModel


def _examples(model):
    rng = np.random.RandomState(0)
    image = Image.fromarray(rng.randint(0, 256, (120, 200, 3), dtype=np.uint8))
    frames = rng.randint(0, 256, (6, 90, 120, 3), dtype=np.uint8)
    return [
        model.example("What is shown?", ["A red square.", "A blue circle.", "Nothing."], images=[image]),
        model.example("Which answer is right?", ["Four.", "Five, because two plus three."]),
        model.example("What moves?", ["A ball, to the left.", "Nothing moves.", "A car.", "A bird."], video=frames,
                      video_metadata={"fps": 2.0, "total_num_frames": 6, "duration": 3.0}),
        model.example("Pick one.", ["Yes.", "No."], images=[image, image]),
    ]


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_packed_row_scores_equal_each_example_alone(model, backend):
    examples = _examples(model)
    used_tokens = sum(e["tokens"].shape[1] for e in examples)
    budget = packing.RowBudget(row_tokens=-(-(used_tokens + 7) // 128) * 128,  # kernel blocks are 128
                               row_crops=32, row_pooled=1024, row_examples=5, max_responses=4)
    assert packing.first_fit(examples, budget) == [[0, 1, 2, 3]]
    row = packing.pack_row(examples, budget, backbones.media(model.config))
    packed_model = RewardModel(model.config.replace(attention=backend), model.params, model.head.config,
                               model.head_params, model.processor)
    packed = np.asarray(packed_model._scores(model.params, model.head_params, row))[0]
    assert packed.shape == (5, 4) and np.isneginf(packed[4]).all()
    for slot, example in enumerate(examples):
        alone = model.score_examples([example])[0]
        n = len(alone)
        np.testing.assert_allclose(packed[slot, :n], alone, atol=1e-4)
        assert np.isneginf(packed[slot, n:]).all()


def test_first_fit_respects_every_budget():
    def example(tokens, crops, responses=2):
        e = {"tokens": np.zeros((1, tokens), np.int32), "read_positions": np.zeros((1, responses), np.int32)}
        if crops:
            e.update(crops=np.zeros((1, crops, 4, 3), np.uint8), pooling=np.zeros((1, crops, 2), np.int32))
        return e

    budget = packing.RowBudget(row_tokens=100, row_crops=4, row_pooled=4, row_examples=3, max_responses=4)
    examples = [example(60, 0), example(50, 2), example(30, 3), example(10, 0), example(5, 0), example(5, 0)]
    assert packing.first_fit(examples, budget) == [[0, 2, 3], [1, 4, 5]]
    with pytest.raises(ValueError, match="example 0 does not fit"):
        packing.first_fit([example(101, 0)], budget)


def test_fullness_is_the_fullest_budget():
    budget = packing.RowBudget(row_tokens=100, row_crops=4, row_pooled=8, row_examples=4, max_responses=4)
    text = {"tokens": np.zeros((1, 30), np.int32)}
    image = {"tokens": np.zeros((1, 20), np.int32), "crops": np.zeros((1, 3, 4, 3), np.uint8), "pooling": np.zeros((1, 2, 9))}
    assert budget.fullness([text]) == 0.3  # tokens 0.3, one example of 4: 0.25
    assert budget.fullness([text, image]) == 0.75  # crops 3 of 4 bind before tokens (0.5)
    assert budget.fullness([]) == 0.0


def test_single_response_example_scores_equal_each_response_alone(model):
    """`training_example(separate=...)` (a single-response RM's group): each response in its own sequence,
    packed after another example, scores as `score_single`, which runs every response as its own row."""
    from mrrm_jax.data import examples as examples_lib

    rng = np.random.RandomState(1)
    image = Image.fromarray(rng.randint(0, 256, (120, 200, 3), dtype=np.uint8))
    frames = rng.randint(0, 256, (4, 90, 120, 3), dtype=np.uint8)
    video = {"video": frames, "video_metadata": {"fps": 2.0, "total_num_frames": 4, "duration": 2.0}}
    media_layout = backbones.media(model.config)
    record = {"prompt": "What is shown?", "responses": ["A red square.", "A blue circle, small.", "Nothing."],
              "rankings": [2, 1, 3]}
    for media in ({"images": [image]}, video):
        group = examples_lib.training_example(record, media, model.processor, examples_lib.Budget(),
                                              np.random.default_rng(0), collections.Counter(), "record",
                                              separate=media_layout)
        assert group["read_positions"].shape == (1, 3) and group["segment_ids"].max() == 3
        tokens = group["tokens"][0]
        shuffled = [model.processor.tokenizer.decode(tokens[s: r + 1]).strip()
                    for s, r in zip(group["response_starts"][0], group["read_positions"][0])]
        assert sorted(shuffled) == sorted(record["responses"])
        first = model.example("Which answer is right?", ["Four.", "Five."])
        budget = packing.RowBudget(row_tokens=1024, row_crops=32, row_pooled=1024, row_examples=2, max_responses=3)
        row = packing.pack_row([first, group], budget, media_layout)
        packed = np.asarray(model._scores(model.params, model.head_params, row))[0]
        np.testing.assert_allclose(packed[1], model.score_single(record["prompt"], shuffled, **media), atol=1e-4)
        np.testing.assert_allclose(packed[0, :2], model.score_examples([first])[0], atol=1e-4)
