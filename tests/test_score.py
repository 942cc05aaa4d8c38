"""Scoring: the Python API, batching without leakage, the JSONL command line, the single baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mrrm_jax.scoring.reward_model import RewardModel, score_file

RESPONSES = ["A red square on a blue background.", "A cat.", "Two circles, one green.", "Nothing at all."]


def _image(seed=0, size=(160, 120)):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (*size[::-1], 3), dtype=np.uint8))


def test_scores_do_not_depend_on_the_batch_they_are_in(model):
    alone = model.score("What is in the picture?", RESPONSES, images=[_image()])
    assert alone.shape == (4,) and np.isfinite(alone).all()
    other = model.example("A much longer prompt " * 20, RESPONSES[:2], images=[_image(1, (300, 200))])
    text_only = model.example("No image here.", RESPONSES[:3])
    mine = model.example("What is in the picture?", RESPONSES, images=[_image()])
    batched = model.score_examples([other, text_only, mine])
    np.testing.assert_allclose(batched[2], alone, atol=1e-5)
    np.testing.assert_allclose(batched[1], model.score("No image here.", RESPONSES[:3]), atol=1e-5)


def test_single_mode_scores_each_response_alone(model):
    single = model.score_single("What is in the picture?", RESPONSES[:3], images=[_image()])
    one = model.score("What is in the picture?", [RESPONSES[1]], images=[_image()])
    assert single.shape == (3,)
    np.testing.assert_allclose(single[1], one[0], atol=1e-5)


def test_command_line_scores_good_records_and_reports_bad_ones(model, tmp_path):
    _image().save(tmp_path / "a.png")
    records = [
        {"id": "ok", "prompt": "Describe.", "responses": RESPONSES[:2], "image": "a.png"},
        {"id": "missing", "prompt": "Describe.", "responses": RESPONSES[:2], "image": "nope.png"},
        {"id": "no-responses", "prompt": "Describe."},
        {"id": "empty", "prompt": "Describe.", "responses": ["fine", ""]},
        {"id": "text", "prompt": "Pick one.", "responses": RESPONSES},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\nnot json\n")
    scored, failed = score_file(model, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert (scored, failed) == (2, 4) and len(out) == 6
    by_id = {o.get("id", o["index"]): o for o in out}
    assert len(by_id["ok"]["scores"]) == 2 and len(by_id["text"]["scores"]) == 4
    assert "nope.png" in by_id["missing"]["error"]
    assert "responses" in by_id["no-responses"]["error"]
    assert "empty" in by_id["empty"]["error"]
    assert "error" in by_id[5]
    np.testing.assert_allclose(by_id["text"]["scores"], model.score("Pick one.", RESPONSES), atol=1e-5)


@pytest.mark.parametrize("pooling", ["first", "response_mean", "first_last_concat"])
def test_release_poolings_score_consistently(model, pooling):
    import jax
    import jax.numpy as jnp

    from mrrm_jax.core import reward

    config = reward.HeadConfig(pooling=pooling)
    width = model.config.text.hidden_size * (2 if pooling == "first_last_concat" else 1)
    head = reward.ValueHead(config).init(jax.random.key(0), jnp.zeros((1, width)))["params"]
    other = RewardModel(model.config, model.params, config, head, model.processor)
    alone = other.score("Which?", RESPONSES[:3])
    batched = other.score_examples([other.example("Longer prompt " * 9, RESPONSES), other.example("Which?", RESPONSES[:3])])
    assert np.isfinite(alone).all()
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)


def test_packed_batches_and_a_vit_in_passes_score_each_example_as_alone(model, tiny_reward_dir):
    """Small rows (several per batch, text and media together), the ViT two crops a pass (passes with no
    crop in use skipped), and an example longer than a row (a row of its own): every example's scores
    equal it alone through the plain forward (the whole ViT at once, no packing)."""
    from mrrm_jax.core import reward

    frames = np.random.RandomState(3).randint(0, 256, (4, 48, 64, 3), np.uint8)
    video = {"fps": 2.0, "total_num_frames": 4, "duration": 2.0}
    examples = [model.example("What is in the picture?", RESPONSES, images=[_image()]),
                model.example("Compare them.", RESPONSES[:2], images=[_image(1, (300, 200)), _image(2, (90, 120))]),
                model.example("No image here.", RESPONSES[:3]),
                model.example("What happens?", RESPONSES[1:], video=frames, video_metadata=video),
                model.example("A long question " * 80, RESPONSES)]
    lengths = [e["tokens"].shape[1] for e in examples]
    crops = [e["crops"].shape[1] if "crops" in e else 0 for e in examples]
    row_tokens = -(-max(lengths[:4]) // 64) * 64
    assert lengths[4] > row_tokens, lengths
    small = RewardModel.load(tiny_reward_dir, rows=2, row_tokens=row_tokens, row_crops=max(crops), vision_crops=2)
    got = small.score_examples(examples)
    for example, scores in zip(examples, got):
        trainable = {"head": model.head_params, "lora": {}}
        alone = reward.forward_scores(model.backbone, model.head, model.params, trainable, example)[0]
        np.testing.assert_allclose(scores, alone, atol=1e-5)
    assert len(small.shapes.split(examples)) >= 3  # several batches, the long example alone
