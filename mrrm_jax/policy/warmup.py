"""The SFT warm-up: a policy taught to answer like the corpus, on ALL of each record's responses (not only
the best), so it answers plausibly but unreliably: what GRPO then improves. Next-token cross-entropy on
the response tokens and the stop token, the prompt (and its media) as context; the sequences are built
exactly as the sampler's rollouts are (`sampler.with_responses`), so the warm-up teaches the policy the
layout it will sample in."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mrrm_jax.core import tree_paths
from mrrm_jax.policy import objective, sampler
from mrrm_jax.policy.prompts import PromptRows, Prompt


def response_tokens(tokenizer, texts: list[str], stop_id: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, steps], lengths [B]): each text's ids as plain text, then `stop_id`; cut at `steps`."""
    tokens, lengths = np.zeros((len(texts), steps), np.int32), np.zeros(len(texts), np.int32)
    for row, text in enumerate(texts):
        ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [stop_id])[:steps]
        tokens[row, : len(ids)], lengths[row] = ids, len(ids)
    return tokens, lengths


def warm_up(model, params: dict, prompts: list[Prompt], rows: PromptRows, train: tuple[str, ...], steps: int,
            batch_rows: int, learning_rate: float, max_new_tokens: int, stop_id: int, seed: int, log=print) -> dict:
    """`params` after `steps` of AdamW on the leaves whose paths match a `train` regex."""
    flat = tree_paths.flatten(params)
    trained = {p: v for p, v in flat.items() if any(re.fullmatch(t, p) for t in train)}
    if not trained:
        raise ValueError(f"sft.train {train} matches no parameter")
    frozen = {p: v for p, v in flat.items() if p not in trained}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(learning_rate, steps)))
    opt = tx.init(trained)
    usable = [p for p in prompts if p.responses]
    if not usable:
        raise ValueError("the SFT warm-up needs records with responses")

    @jax.jit
    def update(trained, opt, batch, tokens_bn):
        def loss_fn(trained):
            logits = sampler.token_logits(model, tree_paths.nest({**frozen, **trained}), batch)
            logp_bn, _ = objective.token_logprobs(logits, tokens_bn)
            mask_bn = batch["response_mask"]
            return -(logp_bn * mask_bn).sum() / jnp.maximum(mask_bn.sum(), 1)
        loss, grads = jax.value_and_grad(loss_fn)(trained)
        updates, opt = tx.update(grads, opt, trained)
        return optax.apply_updates(trained, updates), opt, loss

    rng = np.random.default_rng(seed)
    for step in range(1, steps + 1):
        chosen = [usable[i] for i in rng.choice(len(usable), batch_rows)]
        texts = [p.responses[rng.integers(len(p.responses))] for p in chosen]
        tokens_bn, lengths_b = response_tokens(rows.processor.tokenizer, texts, stop_id, max_new_tokens)
        batch = sampler.with_responses(rows.batch(chosen), tokens_bn, lengths_b, 1)
        trained, opt, loss = update(trained, opt, batch, tokens_bn)
        if step % 50 == 0 or step == steps:
            log(f"[sft] step {step}/{steps}  loss {float(loss):.4f}")
    return tree_paths.nest({**frozen, **jax.device_get(trained)})
