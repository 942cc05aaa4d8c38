"""Value head, losses, LoRA as a parameter transform, and the cost of a LoRA training step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrrm_jax.core import lora
from mrrm_jax.core import reward
from mrrm_jax.backbones.molmo2 import Molmo2, Molmo2Config
from tests.test_compile import _batch, _config


def test_cross_entropy_at_two_responses_is_bradley_terry():
    scores_bn = jnp.array([[0.3, -1.2], [2.0, 2.5]])
    labels_b = jnp.array([0, 1])
    bt = -jax.nn.log_sigmoid(jnp.array([0.3 - -1.2, 2.5 - 2.0]))
    np.testing.assert_allclose(reward.cross_entropy(scores_bn, labels_b), bt, rtol=1e-6)


def test_padded_responses_take_no_probability():
    # Two examples, N = 3 and N = 2 in one batch: the missing response scores -inf.
    scores_bn = jnp.array([[1.0, 0.0, -1.0], [0.5, 1.5, -jnp.inf]])
    got = reward.cross_entropy(scores_bn, jnp.array([0, 1]))
    want = [-jax.nn.log_softmax(jnp.array([1.0, 0.0, -1.0]))[0], -jax.nn.log_softmax(jnp.array([0.5, 1.5]))[1]]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_ties_are_broken_uniformly_and_reproducibly():
    rng = np.random.default_rng(0)
    labels = [reward.label_from_rankings([2, 1, 1, 3], rng) for _ in range(2000)]
    assert set(labels) == {1, 2} and abs(np.mean(np.array(labels) == 1) - 0.5) < 0.05
    again = np.random.default_rng(0)
    assert labels[:20] == [reward.label_from_rankings([2, 1, 1, 3], again) for _ in range(20)]


def test_plackett_luce_by_hand():
    s = np.array([0.2, 1.0, -0.5])
    order = np.array([1, 0, 2])  # response 1 best, then 0, then 2
    by_hand = -((s[1] - np.log(np.exp(s).sum())) + (s[0] - np.log(np.exp(s[[0, 2]]).sum())))
    got = reward.plackett_luce(jnp.asarray(s)[None], jnp.asarray(order)[None])[0]
    np.testing.assert_allclose(got, by_hand, rtol=1e-6)
    padded = reward.plackett_luce(jnp.array([[0.2, 1.0, -0.5, -jnp.inf]]), jnp.array([[1, 0, 2, -1]]))[0]
    np.testing.assert_allclose(padded, by_hand, rtol=1e-6)
    np.testing.assert_array_equal(reward.order_from_rankings([2, 1, 3], np.random.default_rng(0)), [1, 0, 2])


def test_value_head_matches_the_release_layout():
    head = reward.ValueHead(reward.HeadConfig())
    params = head.init(jax.random.key(0), jnp.zeros((1, 64)))["params"]
    assert jax.tree.map(jnp.shape, params) == {"0": {"kernel": (64, 1024), "bias": (1024,)},
                                               "2": {"kernel": (1024, 1), "bias": (1,)}}
    assert float(jnp.abs(params["0"]["bias"]).max()) == 0 and 0.005 < float(params["0"]["kernel"].std()) < 0.015


def _reward_setup(num_layers=2):
    cfg = _config(num_layers)
    backbone, head = Molmo2(cfg), reward.ValueHead(reward.HeadConfig())
    batch = _batch(2, 16)
    batch.update(read_positions=np.array([[7, 11, 15], [9, 15, -1]], np.int32), labels=np.array([1, 0], np.int32))
    base = backbone.init(jax.random.key(0), batch)["params"]
    spec = lora.LoraSpec(rank=4)
    trainable = {"lora": lora.init(base, spec, jax.random.key(1)),
                 "head": head.init(jax.random.key(2), jnp.zeros((1, cfg.text.hidden_size)))["params"]}
    trainable["lora"] = jax.tree.map(lambda x: x + 0.05, trainable["lora"])  # non-zero B
    return backbone, head, base, trainable, batch, spec


@pytest.mark.slow
def test_gradients_reach_only_lora_factors_and_the_head():
    backbone, head, base, trainable, batch, spec = _reward_setup()
    grad_fn = jax.grad(lambda b, t: reward.loss(backbone, head, b, t, batch, spec, jax.random.key(3))[0],
                       argnums=(0, 1))
    base_grads, trainable_grads = grad_fn(base, trainable)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(base_grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(trainable_grads))


def test_padded_response_scores_minus_infinity():
    backbone, head, base, trainable, batch, spec = _reward_setup()
    scores_bn = reward.forward_scores(backbone, head, base, trainable, batch, spec)
    assert np.isneginf(scores_bn[1, 2]) and np.isfinite(scores_bn[:, :2]).all()


def test_merge_equals_the_factored_view():
    backbone, head, base, trainable, batch, spec = _reward_setup()
    factored = reward.forward_scores(backbone, head, base, trainable, batch, spec)
    merged = reward.forward_scores(backbone, head, lora.merge(base, trainable["lora"], spec),
                                   {"head": trainable["head"], "lora": {}}, batch)
    np.testing.assert_allclose(factored, merged, atol=1e-5)


def lora_step_flops_ratio(num_layers=2, seq_len=1024) -> tuple[float, float, float]:
    """(forward FLOPs, LoRA train-step FLOPs, ratio) at Molmo2-4B LM widths, text only.

    XLA's cost analysis counts a scan body once, so this is the per-layer ratio (plus the parts
    outside the scan). 1024 tokens is a typical example (one image, a short prompt, four ~100-token
    responses). The ratio grows with length because attention's backward costs twice its forward:
    2.19 at 1024 tokens, 2.25 at 2048 with the dense `xla` attention.
    """
    cfg = Molmo2Config.molmo2_4b(with_lm_head=False)
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, num_layers=num_layers))
    backbone, head = Molmo2(cfg), reward.ValueHead(reward.HeadConfig())
    batch = {"tokens": jnp.zeros((1, seq_len), jnp.int32), "positions": jnp.zeros((1, seq_len), jnp.int32),
             "segment_ids": jnp.ones((1, seq_len), jnp.int32), "read_positions": jnp.zeros((1, 4), jnp.int32),
             "labels": jnp.zeros((1,), jnp.int32)}
    base = jax.eval_shape(backbone.init, jax.random.key(0), batch)["params"]
    base = {k: v for k, v in base.items() if k == "language_model"}
    spec = lora.LoraSpec()
    trainable = {"lora": jax.eval_shape(lambda: lora.init(base, spec, jax.random.key(1))),
                 "head": jax.eval_shape(head.init, jax.random.key(2), jnp.zeros((1, cfg.text.hidden_size)))["params"]}

    def forward(base, trainable, batch):
        return reward.forward_scores(backbone, head, lora.merge(base, trainable["lora"], spec),
                                     {"head": trainable["head"]}, batch)

    def train_step(base, trainable, batch):
        return jax.grad(lambda t: reward.loss(backbone, head, base, t, batch, spec, jax.random.key(0))[0])(trainable)

    flops = lambda f, *args: jax.jit(f).lower(*args).compile().cost_analysis()["flops"]
    # The forward alone is the merged (scoring) forward; its merge cost is excluded by merging outside.
    merged = jax.eval_shape(lambda b, t: lora.merge(b, t["lora"], spec), base, trainable)
    forward_flops = flops(lambda b, t, x: reward.forward_scores(backbone, head, b, {"head": t["head"]}, x),
                          merged, trainable, batch)
    step_flops = flops(train_step, base, trainable, batch)
    return forward_flops, step_flops, step_flops / forward_flops


@pytest.mark.slow
def test_lora_training_step_costs_at_most_2_2_forwards():
    forward_flops, step_flops, ratio = lora_step_flops_ratio()
    print(f"forward {forward_flops:.3e} FLOPs, LoRA step {step_flops:.3e} FLOPs, ratio {ratio:.2f}")
    assert ratio <= 2.2


@pytest.mark.parametrize("rankings, n, message", [
    ([1], 1, "at least 2 responses"),
    ([1, 2, 3], 2, "needs 2 entries"),
    (None, 3, "got none"),
    ([0, 1], 2, "integers >= 1"),
])
def test_bad_training_targets_are_clear_errors(rankings, n, message):
    with pytest.raises(ValueError, match=message):
        reward.check_rankings(rankings, n, record="record 7")


def test_poolings_by_hand():
    hidden = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(2, 6, 3)
    reads, starts = jnp.array([[2, 5], [4, -1]]), jnp.array([[1, 3], [0, -1]])
    h = np.asarray(hidden)
    np.testing.assert_array_equal(reward.pool(hidden, reads)[0, 1], h[0, 5])
    np.testing.assert_array_equal(reward.pool(hidden, reads, starts, "first")[1, 0], h[1, 0])
    np.testing.assert_array_equal(reward.pool(hidden, reads, starts, "first_last_concat")[0, 0],
                                  np.concatenate([h[0, 1], h[0, 2]]))
    np.testing.assert_array_equal(reward.pool(hidden, reads, starts, "first_last_sub")[0, 1], h[0, 5] - h[0, 3])
    np.testing.assert_allclose(reward.pool(hidden, reads, starts, "response_mean")[0, 1], h[0, 3:6].mean(0))
    packed = reward.pool(hidden, reads[:, None], starts[:, None], "response_mean")
    assert packed.shape == (2, 1, 2, 3)
