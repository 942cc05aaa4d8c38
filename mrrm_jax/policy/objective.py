"""GRPO's objective: group-normalised advantages, the clipped ratio loss, the k3 KL to the reference.

Rows come in groups of G contiguous samples of one prompt (as `sampler.sample` returns them). Per
response token t of row b, with the ratio r = exp(logp - logp_old) and the row's advantage A:

    loss_t = -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta * (exp(q) - q - 1),   q = logp_ref - logp

(the second term is Schulman's k3 estimator of KL(policy || reference): unbiased, never negative) and
the loss is the token-level mean over every response token of the batch (long responses weigh by their
tokens, not per row). logp are log-probabilities under the sampling temperature (logits / T), the
distribution the tokens were drawn from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Objective:
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    advantage: str = "std"  # "std": (r - mean) / (std + eps) in the group; "rank": centred ranks in [-1, 1]
    std_eps: float = 1e-4

    def __post_init__(self):
        if self.advantage not in ("std", "rank"):
            raise ValueError(f"advantage={self.advantage!r}: expected 'std' or 'rank'")


def advantages(rewards_b, group_size: int, objective: Objective):
    """[B] advantages from [B] rewards in contiguous groups of `group_size`.

    "std": (r - group mean) / (group std + eps), the std unbiased (n - 1) as TRL's and verl's GRPO take
    it; a group of equal rewards gives 0. "rank": each reward's rank in its group (ties averaged) mapped
    linearly onto [-1, 1], which ignores the reward's scale (an RM's scores are list-conditioned; only
    their order within a group is meaningful)."""
    rewards_gk = rewards_b.astype(jnp.float32).reshape(-1, group_size)
    if objective.advantage == "std":
        mean_g1 = rewards_gk.mean(1, keepdims=True)
        std_g1 = jnp.sqrt(((rewards_gk - mean_g1) ** 2).sum(1, keepdims=True) / max(group_size - 1, 1))
        return ((rewards_gk - mean_g1) / (std_g1 + objective.std_eps)).reshape(-1)
    below_gk = (rewards_gk[:, :, None] > rewards_gk[:, None, :]).sum(-1)
    ties_gk = (rewards_gk[:, :, None] == rewards_gk[:, None, :]).sum(-1)
    rank_gk = below_gk + (ties_gk - 1) / 2  # 0 .. G - 1, ties at their mean rank
    return (2 * rank_gk / max(group_size - 1, 1) - 1).reshape(-1)


def token_logprobs(logits_bnv, tokens_bn, temperature: float = 1.0):
    """(log-probabilities [B, N] of `tokens_bn`, entropies [B, N]) under softmax(logits / temperature)."""
    logp_bnv = jax.nn.log_softmax(logits_bnv.astype(jnp.float32) / (temperature or 1.0), axis=-1)
    chosen_bn = jnp.take_along_axis(logp_bnv, tokens_bn[..., None], axis=-1)[..., 0]
    entropy_bn = -(jnp.exp(logp_bnv) * logp_bnv).sum(-1)
    return chosen_bn, entropy_bn


def grpo_loss(logp_bn, old_logp_bn, ref_logp_bn, advantages_b, mask_bn, objective: Objective, tokens=None):
    """(the loss, metrics): see the module docstring. `mask_bn`: the response tokens. `tokens`: the
    mean's denominator, when these rows are a micro-batch of a larger batch (that batch's response
    tokens): the micro-batches' losses, gradients and metrics then sum to the whole batch's."""
    mask_bn = mask_bn.astype(jnp.float32)
    tokens = jnp.maximum(mask_bn.sum(), 1.0) if tokens is None else tokens
    mean = lambda x_bn: (x_bn * mask_bn).sum() / tokens
    ratio_bn = jnp.exp(logp_bn - old_logp_bn)
    adv_b1 = advantages_b[:, None]
    unclipped_bn = ratio_bn * adv_b1
    clipped_bn = jnp.clip(ratio_bn, 1 - objective.clip_eps, 1 + objective.clip_eps) * adv_b1
    policy_bn = -jnp.minimum(unclipped_bn, clipped_bn)
    log_ref_ratio_bn = ref_logp_bn - logp_bn
    kl_bn = jnp.exp(log_ref_ratio_bn) - log_ref_ratio_bn - 1
    loss = mean(policy_bn + objective.kl_coef * kl_bn)
    # A token is clipped when the clipped term is the one taken and it differs (its gradient is then 0).
    clip_fraction = mean((clipped_bn < unclipped_bn).astype(jnp.float32))
    return loss, {"policy_loss": mean(policy_bn), "kl": mean(kl_bn), "clip_fraction": clip_fraction}
