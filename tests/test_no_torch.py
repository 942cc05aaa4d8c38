"""Without PyTorch (conftest's `no_torch_env`): the main job, the demo shrunk, then scoring and
evaluation of the reward model it exports. tests/test_reward_io.py imports a release the same way."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
def _run(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-S", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_demo_trains_and_its_reward_model_scores_and_evaluates(no_torch_env, tmp_path):
    workdir = tmp_path / "run"
    _run(["-m", "mrrm_jax.train", "--config=configs/demo.py", f"--workdir={workdir}",
          "--config.data.synthetic.train_images=12", "--config.data.synthetic.train_videos=12",
          "--config.data.synthetic.eval_images=4", "--config.data.synthetic.eval_videos=4",
          "--config.train.num_steps=2", "--config.train.warmup_steps=1", "--config.packing.window=8",
          "--config.checkpoint.every_steps=1000", "--config.eval.every_steps=1000", "--config.eval.controls=()"],
         no_torch_env)
    reward_dir, corpus = workdir / "reward_model", workdir / "data" / "eval" / "corpus.jsonl"
    _run(["-m", "mrrm_jax.score", f"--checkpoint={reward_dir}", f"--input={corpus}",
          f"--output={tmp_path / 'scores.jsonl'}"], no_torch_env)
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(scored) == 8 and all(np.isfinite(line["scores"]).all() and len(line["scores"]) == 4 for line in scored)
    _run(["-m", "mrrm_jax.evaluate", f"--checkpoint={reward_dir}", "--benchmark=jsonl", f"--data={corpus}",
          f"--media_root={corpus.parent}", f"--output={tmp_path / 'eval'}"], no_torch_env)
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["num_scored"] == 8
