"""The Qwen3-VL backbone through the whole library: the CPU demo config trains, evaluates, exports, and
the exported reward model scores JSONL records (one with an image AND a video, which Qwen3-VL takes)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from configs import demo_qwen3vl
from mrrm_jax.scoring import reward_model
from mrrm_jax.training import spec as run_spec
from mrrm_jax.training import trainer
from tests.test_train import override


def _config(**overrides):
    return override(demo_qwen3vl.get_config(), **overrides)


def test_the_qwen3_vl_demo_trains_exports_and_scores(tmp_path):
    cfg = _config(**{"data.synthetic": dict(train_images=16, train_videos=16, eval_images=4, eval_videos=4),
                     "train.num_steps": 3, "train.warmup_steps": 1, "log_every": 1, "checkpoint.every_steps": 3,
                     "eval.every_steps": 1000, "packing.window": 16})
    results = trainer.train(run_spec.parse(cfg), tmp_path)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == 3 and np.isfinite(losses).all()
    assert results["eval"]["examples_image"] == 4 and results["eval"]["examples_video"] == 4

    eval_dir = tmp_path / "data" / "eval"
    records = [json.loads(line) for line in (eval_dir / "corpus.jsonl").read_text().splitlines()]
    image = next(r for r in records if "image" in r)
    video = next(r for r in records if "video" in r)
    both = {**image, "video": video["video"], "prompt": "Same colours?"}
    (eval_dir / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in (image, video, both)) + "\n")
    model = reward_model.RewardModel.load(tmp_path / trainer.REWARD_MODEL_DIR, row_tokens=512)
    reward_model.score_file(model, eval_dir / "mixed.jsonl", tmp_path / "scores.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [len(line["scores"]) for line in lines] == [4, 4, 4] and np.isfinite([line["scores"] for line in lines]).all()


@pytest.mark.slow
def test_the_qwen3_vl_demo_learns_from_the_media(tmp_path):
    """The demo, shorter: held-out best-of-4 accuracy >= 0.9 on images and videos, near chance without media."""
    cfg = _config(**{"data.synthetic": dict(train_images=300, train_videos=300, eval_images=60, eval_videos=60),
                     "train.num_steps": 175, "checkpoint.every_steps": 1000, "eval.every_steps": 1000})
    results = trainer.train(run_spec.parse(cfg), tmp_path)
    print(results)
    assert results["eval"]["accuracy_image"] >= 0.9 and results["eval"]["accuracy_video"] >= 0.9
    for control in ("eval_black", "eval_frozen"):
        assert results[control]["accuracy"] <= 0.45, control
