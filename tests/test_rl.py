"""RL adapters called as verl, tunix and TRL call them, against a live server on loopback (and tunix
in process): each prompt's rollouts scored as one group, equal to scoring that group directly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mrrm_jax.data import media
from mrrm_jax.rl import trl, tunix, verl
from mrrm_jax.rl.client import LocalScorer
from tests.benchmark_files import ANSWERS
from tests.test_serve import media_root, serve  # noqa: F401  (media_root is a fixture)

PROMPTS = ["Describe the picture.", "Which answer fits?"]


@pytest.fixture(scope="module")
def url(model, media_root):
    with serve(model, media_root=str(media_root)) as base:
        yield base


def _direct(model, media_root):
    """What the two groups score when given to the model directly: 3 answers with an image, 2 without."""
    return np.concatenate([model.score(PROMPTS[0], ANSWERS[:3], images=[media.load_image(media_root / "a.png")]),
                           model.score(PROMPTS[1], ANSWERS[:2])])


def test_verl_batch_reward_function(model, url, media_root):
    infos = [{"prompt": PROMPTS[0], "image": "a.png", "uid": "u0"}] * 3 + [{"prompt": PROMPTS[1], "uid": "u1"}] * 2
    rewards = verl.compute_score(data_sources=["mm"] * 5, solution_strs=ANSWERS[:3] + ANSWERS[:2],
                                 ground_truths=[""] * 5, extra_infos=infos, url=url)
    np.testing.assert_allclose(rewards, _direct(model, media_root), atol=1e-5)
    with pytest.raises(ValueError, match="extra_info needs the question"):
        verl.compute_score(["mm"], ["a"], [""], [{}], url=url)


def test_tunix_reward_fn_over_http_and_in_process(model, url, media_root):
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    completions = ANSWERS[:3] + ANSWERS[:3]
    images = ["a.png"] * 3 + [None] * 3
    expected = np.concatenate([model.score(PROMPTS[0], ANSWERS[:3], images=[media.load_image(media_root / "a.png")]),
                               model.score(PROMPTS[1], ANSWERS[:3])])
    over_http = tunix.make_reward_fn(url=url, num_generations=3)
    np.testing.assert_allclose(over_http(prompts=prompts, completions=completions, image=images, mode="train"),
                               expected, atol=1e-5)
    in_process = tunix.make_reward_fn(model=model, num_generations=3, media_root=media_root)
    np.testing.assert_allclose(in_process(prompts=prompts, completions=completions, image=images), expected, atol=1e-5)
    with pytest.raises(ValueError, match="blocks of num_generations"):
        over_http(prompts=prompts[:4], completions=completions[:4])


def test_in_process_scorer_in_both_modes(model, media_root):
    """`LocalScorer` scores groups as the model does: in one pass per group, or one per response."""
    groups = [{"prompt": PROMPTS[0], "responses": ANSWERS[:3], "image": "a.png"},
              {"prompt": PROMPTS[1], "responses": ANSWERS[:2]}]
    image = [media.load_image(media_root / "a.png")]
    np.testing.assert_allclose(np.concatenate(LocalScorer(model, media_root).score(groups)),
                               _direct(model, media_root), atol=1e-5)
    single = np.concatenate([model.score_single(PROMPTS[0], ANSWERS[:3], images=image),
                             model.score_single(PROMPTS[1], ANSWERS[:2])])
    np.testing.assert_allclose(np.concatenate(LocalScorer(model, media_root, mode="single").score(groups)), single,
                               atol=1e-5)
    assert not np.allclose(single, _direct(model, media_root), atol=1e-3)  # the two modes are different passes


def test_trl_reward_func_groups_by_prompt_within_the_slice(model, url, media_root):
    # Conversational, interleaved, and a partial group (the rest of it on another process).
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}],
               [{"role": "user", "content": PROMPTS[1]}]] * 2 + [
               [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}]]
    completions = [[{"role": "assistant", "content": text}] for text in
                   [ANSWERS[0], ANSWERS[0], ANSWERS[1], ANSWERS[1], ANSWERS[2]]]
    image = ["a.png", None, "a.png", None, "a.png"]
    rewards = trl.make_reward_func(url)(prompts=prompts, completions=completions, completion_ids=None, image=image,
                                        trainer_state=None)
    expected = _direct(model, media_root)
    np.testing.assert_allclose(np.asarray(rewards)[[0, 2, 4, 1, 3]], expected, atol=1e-5)


def test_server_command_line_refuses_bad_flags_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mrrm_jax.serve", f"--checkpoint={tmp_path / 'none'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and "Traceback" not in done.stderr
