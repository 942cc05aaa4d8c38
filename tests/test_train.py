"""Training: the demo runs end to end, resumes exactly after SIGTERM, and refuses bad setups clearly."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from mrrm_jax.scoring import reward_model
from mrrm_jax.training import spec as run_spec
from mrrm_jax.training import trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(**overrides):
    """The demo, shrunk: a small corpus, a few steps, every step logged."""
    cfg = demo.get_config()
    cfg.data.synthetic = dict(train_images=24, train_videos=24, eval_images=6, eval_videos=6)
    cfg.train.num_steps, cfg.train.warmup_steps, cfg.log_every = 8, 2, 1
    cfg.checkpoint.every_steps, cfg.eval.every_steps = 4, 1000  # step 8: a periodic and the final save meet
    cfg.packing.window = 16
    return override(cfg, **overrides)


def override(cfg, **overrides):
    """`cfg` with dotted keys set, as `--config.a.b=v` would."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


def train(cfg, workdir, stop=None) -> dict:
    return trainer.train(run_spec.parse(cfg), workdir, stop)


def losses(workdir: pathlib.Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if m["kind"] == "train"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    results = train(small_config(), workdir)
    return workdir, results


def test_demo_trains_and_evaluates_with_controls(straight):
    workdir, results = straight
    assert set(results) == {"eval", "eval_black", "eval_frozen"}
    assert results["eval"]["examples_image"] == 6 and results["eval"]["examples_video"] == 6
    assert sorted(losses(workdir)) == list(range(1, 9))
    assert (workdir / "checkpoints" / "8").is_dir() and list((workdir / "tensorboard").iterdir())


def test_the_finished_run_leaves_a_reward_model_that_scores(straight):
    workdir, _ = straight
    model = reward_model.RewardModel.load(workdir / trainer.REWARD_MODEL_DIR)
    record = json.loads((workdir / "data" / "eval" / "corpus.jsonl").read_text().splitlines()[0])
    scored, failed = reward_model.score_file(model, workdir / "data" / "eval" / "corpus.jsonl", workdir / "scores.jsonl")
    assert (scored, failed) == (12, 0)
    first = json.loads((workdir / "scores.jsonl").read_text().splitlines()[0])
    assert len(first["scores"]) == len(record["responses"]) and all(map(math.isfinite, first["scores"]))


def test_a_checkpoint_of_another_config_is_refused(straight):
    workdir = straight[0]
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(run_spec.ConfigError, match=r"another config \(train.learning_rate: checkpoint 0.001, now 0.5"):
        train(small_config(**{"train.learning_rate": 0.5}), workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(run_spec.ConfigError, match="data.train='/no/such.jsonl' does not exist"):
        train(small_config(**{"data.train": "/no/such.jsonl"}), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_a_mesh_the_devices_do_not_fit_is_a_clear_error(tmp_path):
    with pytest.raises(run_spec.ConfigError, match=r"config.mesh: mesh .* needs 2 devices, there are 1"):
        train(small_config(**{"mesh.data": 2}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_rejects_a_config_key_that_does_not_exist(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mrrm_jax.train", "--config=configs/demo.py", "--config.train.num_stepz=3",
         f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "num_stepz" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_demo_learns_from_the_media(tmp_path):
    """The demo, shorter: held-out best-of-4 accuracy far above chance, and back to chance without media."""
    cfg = demo.get_config()
    cfg.data.synthetic = dict(train_images=300, train_videos=300, eval_images=60, eval_videos=60)
    cfg.train.num_steps, cfg.checkpoint.every_steps, cfg.eval.every_steps = 175, 1000, 1000
    results = train(cfg, tmp_path)
    print(results)
    assert results["eval"]["accuracy_image"] >= 0.8 and results["eval"]["accuracy_video"] >= 0.8
    for control in ("eval_black", "eval_frozen"):
        assert results[control]["accuracy"] <= 0.45, control
    # The exported reward model (its own base: the demo trains base weights) scores as well, one
    # example at a time through `mrrm_jax.score` instead of packed rows.
    eval_file = tmp_path / "data" / "eval" / "corpus.jsonl"
    reward_model.score_file(reward_model.RewardModel.load(tmp_path / trainer.REWARD_MODEL_DIR), eval_file, tmp_path / "scores.jsonl")
    best = [int(np.argmin(json.loads(line)["rankings"])) for line in eval_file.read_text().splitlines()]
    picked = [int(np.argmax(json.loads(line)["scores"])) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert np.mean(np.equal(best, picked)) >= 0.8


def test_an_evaluation_with_nothing_to_score_or_with_nan_scores_is_an_error():
    """An eval where every record was skipped used to report accuracy 0.0; NaN scores would be ranked."""
    from mrrm_jax.core import sharding
    from mrrm_jax.data import pipeline

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    batch = {"tokens": np.zeros((1, 8), np.int32), "labels": np.array([[1, -1]], np.int32),
             "media_kind": np.zeros((1, 2), np.int32), "counts": np.zeros(len(pipeline.COUNT_KEYS), np.int64),
             "skips": []}
    empty = {**batch, "labels": np.full((1, 2), -1, np.int32)}
    scores = lambda value: (lambda state, base, global_batch: np.full((1, 2, 3), value, np.float32))
    state = {"step": np.int32(5)}
    assert trainer.evaluate(scores(0.5), state, None, [batch], mesh, empty)["examples_text"] == 1
    with pytest.raises(trainer.RunError, match="scored no example"):
        trainer.evaluate(scores(0.5), state, None, [empty, empty], mesh, empty)
    with pytest.raises(trainer.RunError, match="step 5: the model gave NaN scores"):
        trainer.evaluate(scores(np.nan), state, None, [batch], mesh, empty)


@pytest.mark.slow
def test_plackett_luce_trains_on_the_full_rankings_carried_through_packing(tmp_path):
    """The listwise objective reads each example's best-to-worst order from the packed rows."""
    results = train(small_config(**{"train.objective": "plackett_luce", "train.num_steps": 3,
                                            "checkpoint.every_steps": 3, "eval.controls": ()}), tmp_path)
    assert all(math.isfinite(loss) and loss > 0 for loss in losses(tmp_path).values())
    assert results["eval"]["examples_image"] == 6


def test_an_objective_that_does_not_exist_is_a_config_error(tmp_path):
    with pytest.raises(run_spec.ConfigError, match="train.objective='listwise': expected one of"):
        train(small_config(**{"train.objective": "listwise"}), tmp_path / "run")
