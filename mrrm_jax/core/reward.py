"""The multi-response reward: read positions -> value head -> scores [B, N] -> N-way losses.

Scores follow the paper: `score = head(h) / sqrt(H)` with `h` the final-norm hidden state at the
response's read position (the token just before its `<|resp_sep|>`, or the last token for the last
response). Padded responses (read position -1) score -inf, so they vanish from every softmax.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrrm_jax.core import lora

POOLINGS = ("last", "first", "first_last_concat", "first_last_add", "first_last_sub", "response_mean")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The release's `reward_model_config.json` options; the defaults are the paper's."""

    head_type: str = "mlp"  # "mlp": Linear(H, hidden) -> SiLU -> Linear(hidden, 1); "linear": Linear(H, 1)
    hidden_dim: int = 1024
    pooling: str = "last"  # one of POOLINGS; all but "last" need `response_starts` in the batch
    scale_by_sqrt_hidden: bool = True

    def __post_init__(self):
        if self.head_type not in ("mlp", "linear"):
            raise ValueError(f"head_type={self.head_type!r}: expected 'mlp' or 'linear'")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling={self.pooling!r}: expected one of {POOLINGS}")


class ValueHead(nn.Module):
    """Pooled response features [..., F] -> one scalar each [...] (before the 1/sqrt(H) scaling)."""

    config: HeadConfig

    @nn.compact
    def __call__(self, features):
        init = dict(kernel_init=nn.initializers.normal(0.01), bias_init=nn.initializers.zeros)
        x = features.astype(jnp.float32)
        if self.config.head_type == "mlp":
            x = jax.nn.silu(nn.Dense(self.config.hidden_dim, name="0", **init)(x))
            return nn.Dense(1, name="2", **init)(x)[..., 0]
        return nn.Dense(1, name="0", **init)(x)[..., 0]


def pool(hidden_btd, read_positions, response_starts=None, pooling: str = "last"):
    """Features [B, ..., F] of each response; F = D, or 2D for "first_last_concat".

    `read_positions` [B, N] (one example per row) or [B, E, N] (packed rows), indices into T.
    """
    index_shape = read_positions.shape
    flat = lambda idx: idx.reshape(index_shape[0], -1)
    take = lambda idx: jnp.take_along_axis(hidden_btd, jnp.clip(flat(idx), 0)[..., None], axis=1)
    last = take(read_positions)
    if pooling == "last":
        features = last
    elif response_starts is None:
        raise ValueError(f"pooling={pooling!r} needs `response_starts` in the batch")
    elif pooling == "first":
        features = take(response_starts)
    elif pooling == "first_last_concat":
        features = jnp.concatenate([take(response_starts), last], axis=-1)
    elif pooling == "first_last_add":
        features = take(response_starts) + last
    elif pooling == "first_last_sub":
        features = last - take(response_starts)
    else:  # response_mean: mean over [start, read position] of each response
        t = jnp.arange(hidden_btd.shape[1])
        inside_bmt = (t >= flat(response_starts)[..., None]) & (t <= flat(read_positions)[..., None])
        total = jnp.einsum("bmt,btd->bmd", inside_bmt.astype(jnp.float32), hidden_btd.astype(jnp.float32))
        features = total / jnp.maximum(inside_bmt.sum(-1, keepdims=True), 1)
    return features.reshape(*index_shape, features.shape[-1])


def scores(head: ValueHead, head_params, hidden_btd, batch: dict):
    """Float32 scores shaped like `read_positions` ([B, N] or packed [B, E, N]); -inf where it is -1."""
    features = pool(hidden_btd, batch["read_positions"], batch.get("response_starts"), head.config.pooling)
    values = head.apply({"params": head_params}, features)
    if head.config.scale_by_sqrt_hidden:
        values = values / math.sqrt(hidden_btd.shape[-1])
    return jnp.where(batch["read_positions"] >= 0, values, -jnp.inf)


# -- labels and losses -------------------------------------------------------------------------

def check_rankings(rankings, num_responses: int, record: str = "record") -> np.ndarray:
    """Training needs N >= 2 responses and one integer rank per response (1 = best, ties allowed)."""
    if num_responses < 2:
        raise ValueError(f"{record}: training needs at least 2 responses, got {num_responses}")
    if rankings is None or len(rankings) != num_responses:
        got = "none" if rankings is None else len(rankings)
        raise ValueError(f"{record}: field 'rankings' needs {num_responses} entries (one per response), got {got}")
    rankings = np.asarray(rankings)
    if not np.issubdtype(rankings.dtype, np.integer) or rankings.min() < 1:
        raise ValueError(f"{record}: field 'rankings' must be integers >= 1 (1 = best), got {rankings.tolist()}")
    return rankings


def label_from_rankings(rankings, rng: np.random.Generator) -> int:
    """Index of the best-ranked response (rank 1 = best); ties broken uniformly at random."""
    rankings = np.asarray(rankings)
    best = np.flatnonzero(rankings == rankings.min())
    return int(rng.choice(best))


def cross_entropy(scores_bn, labels_b):
    """Per-example N-way cross-entropy [B]; -inf scores (padding) take no probability."""
    log_probs_bn = jax.nn.log_softmax(scores_bn, axis=-1)
    return -jnp.take_along_axis(log_probs_bn, labels_b[:, None], axis=-1)[:, 0]


OBJECTIVES = ("cross_entropy", "plackett_luce")


def plackett_luce(scores_bn, order_bn):
    """Listwise loss over the full ranking [B] (our extension, off by default).

    `order_bn[b]` lists response indices from best to worst (ties already broken), padded with -1.
    Loss = -sum_i [s_(i) - logsumexp(s_(i), ..., s_(n))] over the real responses.
    """
    valid_bn = order_bn >= 0
    ordered_bn = jnp.take_along_axis(scores_bn, jnp.clip(order_bn, 0), axis=-1)
    ordered_bn = jnp.where(valid_bn, ordered_bn, -jnp.inf)
    # logsumexp over each suffix: reverse cumulative logaddexp.
    suffix_bn = jax.lax.cumlogsumexp(ordered_bn, axis=ordered_bn.ndim - 1, reverse=True)
    terms_bn = jnp.where(valid_bn, ordered_bn - suffix_bn, 0.0)
    # The last real response's term is log 1 = 0; it is kept for clarity.
    return -terms_bn.sum(-1)


def order_from_rankings(rankings, rng: np.random.Generator) -> np.ndarray:
    """Best-to-worst response indices, ties broken uniformly at random (for `plackett_luce`)."""
    rankings = np.asarray(rankings)
    return np.lexsort((rng.permutation(len(rankings)), rankings))


# -- the reward model as a function of (base, trainable) ---------------------------------------

def forward_scores(backbone, head: ValueHead, base_params, trainable: dict, batch: dict, lora_spec=None, rng=None):
    """Scores [B, N]. `trainable` = {"head": ..., "lora": factors or {}, "base": optional sub-tree}.

    The base stays frozen. `trainable["base"]`, when present, is a sub-tree of the backbone's
    parameters trained in full (e.g. a randomly initialised demo model); it replaces those leaves.
    With `rng`, LoRA dropout is active (training); without, the pass is deterministic.
    """
    params = jax.lax.stop_gradient(base_params)  # frozen: no gradient can reach the base
    if trainable.get("base"):
        params = overlay(params, trainable["base"])
    if trainable.get("lora"):
        params = lora.apply(params, trainable["lora"], lora_spec)
    rngs = {} if rng is None else {"dropout": rng}
    hidden_btd = backbone.apply({"params": params}, batch, rngs=rngs)
    return scores(head, trainable["head"], hidden_btd, batch)


def overlay(tree: dict, sub: dict) -> dict:
    """`tree` with the leaves of the nested dict `sub` put in their place."""
    out = dict(tree)
    for key, value in sub.items():
        out[key] = overlay(tree[key], value) if isinstance(value, dict) else value
    return out


def example_losses(backbone, head: ValueHead, base_params, trainable: dict, batch: dict, lora_spec=None, rng=None,
                   objective: str = "cross_entropy"):
    """(per-example losses [E], real-example mask [E], scores) over every example slot of the batch.

    Packed rows hold several examples: scores [B, E, N] are flattened to one row per slot. Empty slots
    (label -1) have loss 0 and are False in the mask.
    """
    all_scores = forward_scores(backbone, head, base_params, trainable, batch, lora_spec, rng)
    labels_b = batch["labels"].reshape(-1)
    real_b = labels_b >= 0
    # Empty slots score -inf everywhere; zero them so no NaN arises even in unused branches.
    scores_bn = jnp.where(real_b[:, None], all_scores.reshape(-1, all_scores.shape[-1]), 0.0)
    if objective == "cross_entropy":
        per_example_b = cross_entropy(scores_bn, jnp.clip(labels_b, 0))
    elif objective == "plackett_luce":
        per_example_b = plackett_luce(scores_bn, batch["order"].reshape(-1, all_scores.shape[-1]))
    else:
        raise ValueError(f"objective={objective!r}: expected one of {OBJECTIVES}")
    return jnp.where(real_b, per_example_b, 0.0), real_b, all_scores


def loss(backbone, head: ValueHead, base_params, trainable: dict, batch: dict, lora_spec=None, rng=None,
         objective: str = "cross_entropy"):
    """Mean loss over the batch's examples, and the scores. Examples with label -1 are padding."""
    per_example_b, real_b, all_scores = example_losses(backbone, head, base_params, trainable, batch, lora_spec,
                                                       rng, objective)
    return per_example_b.sum() / jnp.maximum(real_b.sum(), 1), all_scores
