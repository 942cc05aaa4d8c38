"""GRPO: advantages and the loss against hand-computed values, the KL of the policy to itself, a gradient
check on a tiny model, and the loop: its rewards against `RewardModel.score`, its exact resume."""

from __future__ import annotations

import json
import math
import os
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrrm_jax.backbones import checkpoint
from mrrm_jax.core import lora
from mrrm_jax.data import synthetic
from mrrm_jax.policy import objective, sampler

STD = objective.Objective(advantage="std")


def test_std_advantages_by_hand():
    # rewards 1 2 3 4: mean 2.5, unbiased std sqrt(5/3) = 1.2909944; 1.5 / (1.2909944 + 1e-4) = 1.1618049
    out = np.asarray(objective.advantages(jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]), 4, STD))
    np.testing.assert_allclose(out, [-1.1618049, -0.3872683, 0.3872683, 1.1618049, 0, 0, 0, 0], atol=1e-6)


def test_rank_advantages_by_hand():
    # ranks in the group 3 0 1.5 1.5 (ties at their mean rank), mapped 2 r / 3 - 1
    rank = objective.Objective(advantage="rank")
    np.testing.assert_allclose(np.asarray(objective.advantages(jnp.asarray([3.0, 1.0, 2.0, 2.0]), 4, rank)),
                               [1, -1, 0, 0], atol=1e-7)


def test_grpo_loss_by_hand():
    """Row 1 (A = +1): ratios 1.5 and 0.5 -> terms -min(1.5, 1.2) = -1.2 (clipped) and -min(0.5, 0.8) = -0.5.
    Row 2 (A = -1): ratios 1.5 and 0.5 -> terms 1.5 and 0.8 (clipped); its third token is masked out. The
    reference is 2x as likely as the policy on every token: k3 = 2 - ln 2 - 1 = 0.3068528."""
    logp = jnp.log(jnp.asarray([[0.3, 0.1, 0.2], [0.3, 0.1, 0.2]]))
    old = jnp.log(jnp.asarray([[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]]))
    ref = logp + math.log(2)
    mask = jnp.asarray([[1, 1, 0], [1, 1, 0]])
    loss, metrics = objective.grpo_loss(logp, old, ref, jnp.asarray([1.0, -1.0]), mask,
                                        objective.Objective(clip_eps=0.2, kl_coef=0.1))
    policy = (-1.2 - 0.5 + 1.5 + 0.8) / 4
    assert float(metrics["policy_loss"]) == pytest.approx(policy, abs=1e-6)
    assert float(metrics["kl"]) == pytest.approx(0.3068528, abs=1e-6)
    assert float(metrics["clip_fraction"]) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(policy + 0.1 * 0.3068528, abs=1e-6)


def test_token_logprobs_and_entropy_by_hand():
    logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25]]]))
    logp, entropy = objective.token_logprobs(logits, jnp.asarray([[1]]))
    assert float(logp[0, 0]) == pytest.approx(math.log(0.25), abs=1e-6)
    assert float(entropy[0, 0]) == pytest.approx(1.5 * math.log(2), abs=1e-6)
    # at temperature 2: softmax(log p / 2) = sqrt(p) normalised
    logp_t, _ = objective.token_logprobs(logits, jnp.asarray([[0]]), temperature=2.0)
    q = np.sqrt([0.5, 0.25, 0.25])
    assert float(logp_t[0, 0]) == pytest.approx(math.log(q[0] / q.sum()), abs=1e-6)


# -- on a tiny Molmo2 policy -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rollout(tiny_models):
    """The tiny Molmo2 policy, a text prompt, and two sampled responses of 6 tokens (one cut short)."""
    config, base = checkpoint.load_base(tiny_models.converted_native)
    model = sampler.policy(config)
    rng = np.random.RandomState(0)
    prompts = {"tokens": rng.randint(0, 150000, (1, 10)).astype(np.int32),
               "positions": np.arange(10, dtype=np.int32)[None], "segment_ids": np.ones((1, 10), np.int32)}
    tokens = jnp.asarray(rng.randint(0, 150000, (2, 6)), jnp.int32)
    batch = sampler.with_responses(prompts, tokens, jnp.asarray([6, 4]), 2)
    return model, base, batch, tokens


def _logp(model, params, batch, tokens):
    return objective.token_logprobs(sampler.token_logits(model, params, batch), tokens)[0]


def test_kl_of_the_policy_to_itself_is_zero_with_the_adapter_at_zero(rollout):
    model, base, batch, tokens = rollout
    spec = lora.LoraSpec(rank=4, alpha=8, dropout=0.0)
    factors = lora.init(base, spec, jax.random.key(0))  # B = 0
    policy = _logp(model, lora.apply(base, factors, spec, dropout=False), batch, tokens)
    reference = _logp(model, base, batch, tokens)
    _, metrics = objective.grpo_loss(policy, policy, reference, jnp.asarray([1.0, -1.0]), batch["response_mask"],
                                     objective.Objective())
    assert float(metrics["kl"]) == 0.0
    np.testing.assert_array_equal(np.asarray(policy), np.asarray(reference))


def test_grpo_gradient_matches_finite_differences(rollout):
    """d loss / d LoRA factors along a random direction: jax.grad against a central difference."""
    model, base, batch, tokens = rollout
    spec = lora.LoraSpec(rank=2, alpha=4, dropout=0.0, targets=(r"language_model/layers/self_attn/[qv]_proj/kernel",))
    factors = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape),
                           lora.init(base, spec, jax.random.key(0)))
    old = _logp(model, lora.apply(base, factors, spec, dropout=False), batch, tokens) - 0.05
    ref = _logp(model, base, batch, tokens)
    advantages = jnp.asarray([0.7, -1.3])

    def loss(f):
        logp = _logp(model, lora.apply(base, f, spec, dropout=False), batch, tokens)
        return objective.grpo_loss(logp, old, ref, advantages, batch["response_mask"], objective.Objective())[0]

    direction = jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape), factors)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(jax.grad(loss)(factors)),
                                                          jax.tree.leaves(direction)))
    # The loss curves on the scale of 1e-2 along a unit-normal direction; 1e-3 is in its linear range
    # and far above float32's rounding of the loss.
    h = 1e-3
    shifted = lambda s: jax.tree.map(lambda x, d: x + s * h * d, factors, direction)
    numeric = (float(loss(shifted(1))) - float(loss(shifted(-1)))) / (2 * h)
    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx(numeric, rel=3e-2)


def test_update_in_micro_batches_equals_one_pass(rollout):
    """One row at a time (the gradients accumulated, the token-level mean over the whole batch's 10
    response tokens, not a mean of the rows' means) and both rows at once: the same log-probabilities,
    loss, metrics and update."""
    import optax
    from mrrm_jax.policy import loop

    model, base, batch, tokens = rollout
    spec = lora.LoraSpec(rank=2, alpha=4, dropout=0.0, targets=(r"language_model/layers/self_attn/[qv]_proj/kernel",))
    tx = optax.sgd(1.0)  # the update is the gradient
    state = loop.initial_state(base, spec, tx, 0)
    state["lora"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), state["lora"])
    whole, micro = (loop.programs(model, spec, sampler.Sampling(6), objective.Objective(), tx, rows)
                    for rows in (0, 1))
    logp = whole["policy_logp"](base, state["lora"], batch, tokens)
    np.testing.assert_allclose(micro["policy_logp"](base, state["lora"], batch, tokens), logp, atol=1e-6)
    ref = whole["ref_logp"](base, batch, tokens)
    np.testing.assert_allclose(micro["ref_logp"](base, batch, tokens), ref, atol=1e-6)
    args = (state, base, batch, tokens, logp - 0.05, ref, jnp.asarray([0.7, -1.3]))
    (new_whole, metrics_whole), (new_micro, metrics_micro) = whole["update"](*args), micro["update"](*args)
    assert metrics_micro.keys() == metrics_whole.keys()
    for name in metrics_whole:
        assert float(metrics_micro[name]) == pytest.approx(float(metrics_whole[name]), rel=1e-5, abs=1e-7), name
    for a, b in zip(jax.tree.leaves(new_micro["lora"]), jax.tree.leaves(new_whole["lora"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(jax.tree.leaves(new_whole["lora"]),
                                                               jax.tree.leaves(state["lora"])))


# -- the loop --------------------------------------------------------------------------------------

def _config(tiny_models, processor_dir, tiny_reward_dir, corpus: pathlib.Path, steps: int):
    import ml_collections

    config = ml_collections.ConfigDict()
    config.seed, config.log_every = 0, 1
    config.policy = dict(checkpoint=str(tiny_models.converted_native), processor_dir=str(processor_dir),
                         type="molmo2", dims={}, processor={}, dtype="float32", attention="xla", remat="none",
                         prompt=dict(tokens=512, crops=10, pooled=400, pool_slots=9, patches=0))
    config.sft = dict(steps=0, rows=2, learning_rate=1e-3, train=())
    config.lora = dict(rank=4, alpha=8.0, targets=(r"language_model/layers/self_attn/[qv]_proj/kernel",))
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.reward = dict(checkpoint=str(tiny_reward_dir), url="", api_key="", mode="multi", rows=4, row_tokens=2048,
                         row_crops=32)
    config.data = dict(train=str(corpus), eval=str(corpus), media_root="", blank_media=False, synthetic={})
    config.grpo = dict(num_steps=steps, prompts_per_step=2, group_size=2, updates_per_batch=2, learning_rate=1e-3,
                       clip_norm=1.0, clip_eps=0.2, kl_coef=0.04, advantage="std", micro_rows=0)
    config.sampling = dict(max_new_tokens=4, temperature=1.0, top_p=1.0)
    config.eval = dict(every_steps=100, prompts=2)
    config.checkpoint = dict(every_steps=1, keep=3)
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthetic.write_corpus(tmp_path_factory.mktemp("grpo_corpus"), 3, 2, seed=5)


def test_loop_rewards_equal_reward_model_score(tiny_models, processor_dir, tiny_reward_dir, corpus, model, tmp_path):
    from mrrm_jax.data import media
    from mrrm_jax.policy import loop

    run = loop.Run(_config(tiny_models, processor_dir, tiny_reward_dir, corpus, 1), tmp_path)
    prompts = run.train[2:4]  # an image prompt and a video prompt
    _, _, _, texts, rewards = run.rollouts(run.initial_state()["lora"], prompts, jax.random.key(3), 3)
    for index, prompt in enumerate(prompts):
        record = json.loads(corpus.read_text().splitlines()[int(prompt.record_id.split(":")[1]) - 1])
        loaded = {}
        if "image" in record:
            loaded["images"] = [media.load_image(corpus.parent / record["image"])]
        else:
            loaded["video"], loaded["video_metadata"] = media.load_video(corpus.parent / record["video"])
        expected = model.score(prompt.question, texts[index * 3:(index + 1) * 3], **loaded)
        np.testing.assert_allclose(rewards[index * 3:(index + 1) * 3], expected, atol=1e-5)


def test_loop_resumes_exactly(tiny_models, processor_dir, tiny_reward_dir, corpus, tmp_path):
    """3 steps straight, and 1 step + stop + resume for 2 more: the same metrics, the same LoRA factors."""
    from mrrm_jax.policy import loop

    config = lambda: _config(tiny_models, processor_dir, tiny_reward_dir, corpus, 3)
    loop.Run(config(), tmp_path / "straight").run(threading.Event())
    stopped = threading.Event()
    stopped.set()
    assert loop.Run(config(), tmp_path / "resumed").run(stopped)["steps"] == 1
    assert loop.Run(config(), tmp_path / "resumed").run(threading.Event())["steps"] == 3
    rows = lambda d: [r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "train"]
    straight, resumed = rows("straight"), rows("resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed):
        assert a == b


def test_cli_error_is_one_line(tmp_path):
    """`python -m mrrm_jax.grpo` without a reward model: one `error:` line and no traceback, before the
    policy's warm-up spends any time."""
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "mrrm_jax.grpo", "--config=configs/grpo_demo.py",
         "--config.reward.checkpoint=/no/such/reward_model", f"--workdir={tmp_path}"],
        cwd=repo, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == ["error: reward.checkpoint='/no/such/reward_model' is not a reward-model directory"], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "policy_base").exists()


def test_loop_on_two_devices_takes_the_same_steps(tiny_models, processor_dir, tiny_reward_dir, corpus, tmp_path):
    """2 steps on one device, and in a process with 2 (the base FSDP-sharded over them, the rollouts' rows
    split over them, the reward model's rows too): the same rewards, losses and KL."""
    import subprocess
    import sys
    from mrrm_jax.policy import loop

    loop.Run(_config(tiny_models, processor_dir, tiny_reward_dir, corpus, 2), tmp_path / "one").run(threading.Event())
    script = (
        "import sys, threading, types, pathlib, jax\n"
        "assert jax.device_count() == 2, jax.devices()\n"
        "from tests.test_grpo import _config\n"
        "from mrrm_jax.policy import loop\n"
        "models = types.SimpleNamespace(converted_native=sys.argv[1])\n"
        "config = _config(models, sys.argv[2], sys.argv[3], pathlib.Path(sys.argv[4]), 2)\n"
        "config.mesh = dict(data=1, fsdp=-1, tensor=1)\n"
        "run = loop.Run(config, pathlib.Path(sys.argv[5]))\n"
        "assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(run.policy.base))\n"
        "run.run(threading.Event())\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PJRT_NPROC": "8"}
    result = subprocess.run([sys.executable, "-c", script, str(tiny_models.converted_native), str(processor_dir),
                             str(tiny_reward_dir), str(corpus), str(tmp_path / "two")],
                            cwd=pathlib.Path(__file__).resolve().parents[1], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = lambda d: [r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
                      if r["kind"] == "train"]
    one, two = rows("one"), rows("two")
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        for name in ("reward_mean", "reward_std", "response_length", "loss", "kl", "entropy"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), name
