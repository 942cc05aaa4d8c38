"""KV-cache sampling for a Molmo2 or Qwen3-VL policy: each prompt is prefilled once with its media, its
cache copied to its G samples, then all rows decode token by token in one jitted loop of static shapes.

The prompt batch is the backbone's model batch with one prompt per row, right-padded (`segment_ids`
1 on the prompt's tokens, 0 after). A row's generated tokens take the cache slots from its own prompt
length on, and the positions from its largest prompt position + 1 on: Molmo2's positions count the
row's tokens, and Qwen3-VL's M-RoPE continues every text axis after the media's (transformers'
`rope_deltas`: max position + 1 - length). Generation stops per row at a stop id (kept in the output),
and the whole loop when every row has stopped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mrrm_jax import backbones


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0  # what fills a row's tokens after its stop


def filtered_logits(logits_bv, sampling: Sampling):
    """Logits / temperature, with the tokens outside the top-p nucleus at -inf: the smallest set of most
    likely tokens whose probability reaches `top_p` (the token that crosses it included, as transformers'
    `TopPLogitsWarper`)."""
    logits_bv = logits_bv.astype(jnp.float32) / sampling.temperature
    if sampling.top_p >= 1.0:
        return logits_bv
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass of the tokens more likely than each
    kept_b = jnp.maximum((before_bv < sampling.top_p).sum(-1), 1)
    threshold_b1 = jnp.take_along_axis(sorted_bv, kept_b[:, None] - 1, axis=-1)
    return jnp.where(logits_bv >= threshold_b1, logits_bv, -jnp.inf)


def choose(logits_bv, key, sampling: Sampling):
    if sampling.temperature == 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits_bv, sampling), axis=-1).astype(jnp.int32)


def empty_cache(config, rows: int, slots: int) -> dict:
    text = config.text
    shape = (text.num_layers, rows, slots, text.num_kv_heads, text.head_dim)
    return {"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}


def next_positions(positions, segment_ids_bt):
    """[B]: the position a row's first generated token takes (its largest prompt position + 1)."""
    real = segment_ids_bt.reshape(segment_ids_bt.shape[0], *(1,) * (positions.ndim - 2), -1) > 0
    return jnp.where(real, positions, -1).reshape(positions.shape[0], -1).max(-1) + 1


def _last_logits(module, hidden_btd, lengths_b):
    return module.logits(hidden_btd[jnp.arange(hidden_btd.shape[0]), lengths_b - 1])


def sample(model, params: dict, prompts: dict, sampling: Sampling, key, samples: int = 1) -> dict:
    """`samples` continuations of each prompt row: {"tokens" [B * samples, N], "lengths" [B * samples]}
    (N = max_new_tokens; a row's tokens past its length are `pad_id`), rows in prompt order, each
    prompt's samples contiguous. `params`: the policy's parameters as the model applies them (a LoRA
    view included). Jit it with `model` and `sampling` static."""
    lengths_p = prompts["segment_ids"].astype(bool).sum(1).astype(jnp.int32)
    rows, steps = lengths_p.shape[0] * samples, sampling.max_new_tokens
    cache = empty_cache(model.config, lengths_p.shape[0], prompts["tokens"].shape[1] + steps)

    def prefill(module):
        hidden_ptd, filled = module(prompts, cache=cache)
        return _last_logits(module, hidden_ptd, lengths_p), filled

    logits_pv, cache = model.apply({"params": params}, method=prefill)
    repeat = lambda x, axis: jnp.repeat(x, samples, axis=axis)
    cache = jax.tree.map(lambda c: repeat(c, 1), cache)  # [L, B, S, ...]: rows on axis 1
    logits_bv, lengths_b = repeat(logits_pv, 0), repeat(lengths_p, 0)
    start_b = repeat(next_positions(prompts["positions"], prompts["segment_ids"]), 0)
    position_shape = (rows, *prompts["positions"].shape[1:-1], 1)
    stop_s = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)

    def step(module, token_b, i, cache):
        positions = jnp.broadcast_to((start_b + i).reshape(rows, *(1,) * (len(position_shape) - 1)), position_shape)
        batch = {"tokens": token_b[:, None], "positions": positions, "segment_ids": jnp.ones((rows, 1), jnp.int32)}
        hidden_b1d, cache = module(batch, cache=cache, cache_index_b=lengths_b + i)
        return module.logits(hidden_b1d[:, 0]), cache

    def body(carry):
        i, tokens_bn, done_b, logits_bv, cache, key = carry
        key, pick = jax.random.split(key)
        token_b = jnp.where(done_b, sampling.pad_id, choose(logits_bv, pick, sampling))
        tokens_bn = tokens_bn.at[:, i].set(token_b)
        done_b = done_b | jnp.isin(token_b, stop_s)
        logits_bv, cache = model.apply({"params": params}, token_b, i, cache, method=step)
        return i + 1, tokens_bn, done_b, logits_bv, cache, key

    def running(carry):
        i, _, done_b, *_ = carry
        return (i < steps) & ~done_b.all()

    tokens_bn = jnp.full((rows, steps), sampling.pad_id, jnp.int32)
    start = (jnp.int32(0), tokens_bn, jnp.zeros(rows, bool), logits_bv, cache, key)
    _, tokens_bn, *_ = jax.lax.while_loop(running, body, start)
    return {"tokens": tokens_bn, "lengths": response_lengths(tokens_bn, sampling)}


def response_lengths(tokens_bn, sampling: Sampling):
    """[B]: tokens up to and including a row's first stop id (all N without one)."""
    steps = tokens_bn.shape[1]
    stops_bn = jnp.isin(tokens_bn, jnp.asarray(sampling.stop_ids or (-1,), jnp.int32))
    first_b = jnp.where(stops_bn.any(1), jnp.argmax(stops_bn, axis=1) + 1, steps)
    return first_b.astype(jnp.int32)


def with_responses(prompts: dict, tokens_bn, lengths_b, samples: int) -> dict:
    """The model batch of each prompt followed by its sampled response (rows as `sample` returns them):
    the response tokens take the slots, positions and segment its decoding gave them, so a full forward
    over it sees what the decoding saw. Adds `response_slots` [B, N] (the slot of response token j; the
    logits predicting it are at that slot - 1) and `response_mask` [B, N]."""
    repeat = lambda x: jnp.repeat(x, samples, axis=0)
    batch = {name: repeat(x) for name, x in prompts.items()}
    rows, steps = tokens_bn.shape
    lengths_p = batch["segment_ids"].astype(bool).sum(1).astype(jnp.int32)
    start_b = next_positions(batch["positions"], batch["segment_ids"])
    pad = lambda x, value: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, steps)], constant_values=value)
    slots_bn = lengths_p[:, None] + jnp.arange(steps)[None]
    mask_bn = jnp.arange(steps)[None] < lengths_b[:, None]
    rows_b1 = jnp.arange(rows)[:, None]
    batch["tokens"] = pad(batch["tokens"], 0).at[rows_b1, slots_bn].set(tokens_bn)
    batch["segment_ids"] = pad(batch["segment_ids"], 0).at[rows_b1, slots_bn].set(mask_bn.astype(jnp.int32))
    positions = pad(batch["positions"], 0)
    response_positions_bn = start_b[:, None] + jnp.arange(steps)[None]
    if positions.ndim == 2:
        batch["positions"] = positions.at[rows_b1, slots_bn].set(response_positions_bn)
    else:  # [B, A, T]: every axis continues alike
        batch["positions"] = positions.at[rows_b1, :, slots_bn].set(response_positions_bn[..., None])
    batch["response_slots"], batch["response_mask"] = slots_bn, mask_bn
    return batch


def model_batch(batch: dict) -> dict:
    """`batch` without the response bookkeeping, as the model takes it."""
    return {name: x for name, x in batch.items() if name not in ("response_slots", "response_mask")}


def token_logits(model, params: dict, batch: dict):
    """[B, N, vocab]: the policy's logits for each response token (full forward, teacher forced); only
    the response slots reach the LM head."""
    def run(module):
        hidden_btd = module(model_batch(batch))
        rows_b1 = jnp.arange(hidden_btd.shape[0])[:, None]
        return module.logits(hidden_btd[rows_b1, batch["response_slots"] - 1])
    return model.apply({"params": params}, method=run)


def policy(config):
    """The Flax module of a policy config (a backbone with its LM head)."""
    if not (config.with_lm_head or getattr(config.text, "tie_word_embeddings", False)):
        raise ValueError("a policy needs its LM head: this checkpoint has none (with_lm_head=False, untied)")
    return backbones.module(config)
