"""Segment-aware attention for (packed) multimodal sequences.

One segment is one example: its prompt, media and ALL of its responses (design decision 3).
Key k is visible from query q when

    same_segment(q, k) AND (k <= q OR (is_vision(q) AND is_vision(k)))

so the vision tokens of one example form one bidirectional block, even with text between two
images (as transformers' Molmo2 builds it from `mm_token_type_ids`), and everything else is
causal. Padding carries its own segment id (0), which keeps every query row non-empty.

For two examples packed in a row of 8 (segments 1 1 1 1 2 2 2 0, vision tokens at 1, 2 and 5):

    q\\k  0 1 2 3 4 5 6 7
    0    1 . . . . . . .
    1    1 1 1 . . . . .
    2    1 1 1 . . . . .
    3    1 1 1 1 . . . .
    4    . . . . 1 . . .
    5    . . . . 1 1 . .
    6    . . . . 1 1 1 .
    7    . . . . . . . 1

Response boundaries are NOT attention boundaries: later responses see earlier ones.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mrrm_jax.core.sharding import map_rows

# Finite, so a row whose every key is masked still has a finite softmax (padding rows never are).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def segment_mask(segment_ids_bt, is_vision_bt):
    """Boolean mask [B, 1, T, T] (query, key) from per-token arrays."""
    seq_len = segment_ids_bt.shape[1]
    causal_tt = jnp.arange(seq_len)[None, :] <= jnp.arange(seq_len)[:, None]
    same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    vision_pair_btt = is_vision_bt[:, :, None] & is_vision_bt[:, None, :]
    return (same_segment_btt & (causal_tt[None] | vision_pair_btt))[:, None]


def dense_attention(q_btnh, k_bskh, v_bskh, allowed_bts=None):
    """Dense (GQA) attention, scale 1/sqrt(head_dim), keys where `allowed_bts` [B, T, S] (None: all).

    Written for XLA:CPU, where it is ~3x faster than `jax.nn.dot_product_attention(implementation=
    "xla")` with the same numerics (float32 logits and softmax): each KV head's query heads are
    stacked along the rows ([B, kv, group * T, H]) so both products are plain batched matmuls without
    repeating K/V or transposing the [T, S] probabilities, and the mask enters as an additive bias of
    exactly that row layout, which XLA fuses into the softmax (a `select` on a broadcast mask, or a
    bias broadcast over the group axis, is a separate pass over the logits).
    """
    batch, seq_q, heads, head_dim = q_btnh.shape
    kv_heads = k_bskh.shape[2]
    group = heads // kv_heads
    q_bkmh = q_btnh.reshape(batch, seq_q, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    q_bkmh = q_bkmh.reshape(batch, kv_heads, group * seq_q, head_dim)  # rows m = (group, t)
    k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)
    logits_bkms = jnp.einsum("bkmh,bksh->bkms", q_bkmh, k_bksh, preferred_element_type=jnp.float32)
    logits_bkms = logits_bkms * jnp.float32(head_dim ** -0.5)
    if allowed_bts is not None:
        bias_bts = jnp.where(allowed_bts, jnp.float32(0), jnp.float32(MASK_VALUE))
        logits_bkms = logits_bkms + jnp.tile(bias_bts, (1, group, 1))[:, None]
    probs_bkms = jax.nn.softmax(logits_bkms, axis=-1).astype(v_bksh.dtype)
    out_bkmh = jnp.einsum("bkms,bksh->bkmh", probs_bkms, v_bksh)
    out_bkgth = out_bkmh.reshape(batch, kv_heads, group, seq_q, head_dim)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(batch, seq_q, heads, head_dim)


def active_blocks(codes_bt, block_q: int, block_k: int):
    """int32 [B * nq * nk]: 1 where a (q block, k block) pair may hold an allowed entry (conservative)."""
    batch, seq_len = codes_bt.shape
    seg_bqn = (codes_bt >> 1).reshape(batch, -1, block_q)
    vis_bqn = (codes_bt & 1).reshape(batch, -1, block_q)
    seg_bkn = (codes_bt >> 1).reshape(batch, -1, block_k)
    vis_bkn = (codes_bt & 1).reshape(batch, -1, block_k)
    q_lo, q_hi = seg_bqn.min(-1)[:, :, None], seg_bqn.max(-1)[:, :, None]
    k_lo, k_hi = seg_bkn.min(-1)[:, None, :], seg_bkn.max(-1)[:, None, :]
    overlap = (q_lo <= k_hi) & (k_lo <= q_hi)
    q_last = (jnp.arange(seq_len // block_q) + 1) * block_q - 1
    k_first = jnp.arange(seq_len // block_k) * block_k
    causal = (k_first[None, :] <= q_last[:, None])[None]
    vision = (vis_bqn.max(-1)[:, :, None] > 0) & (vis_bkn.max(-1)[:, None, :] > 0)
    return (overlap & (causal | vision)).astype(jnp.int32).reshape(-1)


def key_bounds(segment_ids_bt, is_vision_bt):
    """Per query token, the first and the last key index the mask may allow ([B, T] each): the start of
    its segment, and itself or, for a vision query, the last vision token of its segment."""
    batch, seq_len = segment_ids_bt.shape
    index_t = jnp.arange(seq_len)
    changes_bt = segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]
    starts_bt = jnp.pad(changes_bt, [(0, 0), (1, 0)], constant_values=True)
    ends_bt = jnp.pad(changes_bt, [(0, 0), (0, 1)], constant_values=True)
    first_bt = jax.lax.cummax(jnp.where(starts_bt, index_t, 0), axis=1)
    segment_end_bt = jax.lax.cummin(jnp.where(ends_bt, index_t, seq_len - 1), axis=1, reverse=True)
    # The last vision token up to the segment's end; a vision query is one itself, so it is in the segment.
    last_vision_bt = jax.lax.cummax(jnp.where(is_vision_bt, index_t, -1), axis=1)
    last_bt = jnp.where(is_vision_bt, jnp.take_along_axis(last_vision_bt, segment_end_bt, axis=1), index_t)
    return first_bt, last_bt


def _tiled(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, block: int, differentiable: bool):
    """Flash-style attention in plain XLA: [block x block] tiles with an online softmax. Query block i
    visits only the key blocks [lo_i, hi_i) that `key_bounds` allows any of its queries (over the batch):
    a while loop over that dynamic range, or, when `differentiable` (reverse-mode autodiff cannot go
    through a dynamic trip count), all key blocks with a `cond` that skips those outside it.

    Same layouts and bias as `dense_attention`.
    """
    batch, seq_len, heads, head_dim = q_btnh.shape
    kv_heads = k_btkh.shape[2]
    group = heads // kv_heads
    pad = -seq_len % block
    padded = lambda x, value: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    # Padding is one more segment (-1), so padded keys are masked for every real query.
    segment_ids_bt, is_vision_bt = padded(segment_ids_bt, -1), padded(is_vision_bt, False)
    blocks = (seq_len + pad) // block
    first_bnq, last_bnq = (x.reshape(batch, blocks, block) for x in key_bounds(segment_ids_bt, is_vision_bt))
    lo_n, hi_n = first_bnq.min((0, 2)) // block, last_bnq.max((0, 2)) // block + 1
    q_bkgth = padded(q_btnh, 0).reshape(batch, -1, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    k_bksh, v_bksh = padded(k_btkh, 0).transpose(0, 2, 1, 3), padded(v_btkh, 0).transpose(0, 2, 1, 3)
    scale = jnp.float32(head_dim ** -0.5)
    tile = lambda x, start, axis: jax.lax.dynamic_slice_in_dim(x, start, block, axis=axis)

    def query_block(i):
        q_bkmh = tile(q_bkgth, i * block, 3).reshape(batch, kv_heads, group * block, head_dim)
        seg_q, vis_q = tile(segment_ids_bt, i * block, 1), tile(is_vision_bt, i * block, 1)
        index_q = jnp.arange(block) + i * block

        def update(j, carry):
            max_bkm1, sum_bkm1, acc_bkmh = carry
            seg_k, vis_k, index_k = tile(segment_ids_bt, j * block, 1), tile(is_vision_bt, j * block, 1), \
                jnp.arange(block) + j * block
            allowed_bqk = (seg_q[:, :, None] == seg_k[:, None, :]) & (
                (index_k[None, None, :] <= index_q[None, :, None]) | (vis_q[:, :, None] & vis_k[:, None, :]))
            bias_bqk = jnp.where(allowed_bqk, jnp.float32(0), jnp.float32(MASK_VALUE))
            logits_bkmk = jnp.einsum("bkmh,bksh->bkms", q_bkmh, tile(k_bksh, j * block, 2),
                                     preferred_element_type=jnp.float32) * scale
            logits_bkmk = logits_bkmk + jnp.tile(bias_bqk, (1, group, 1))[:, None]
            new_max_bkm1 = jnp.maximum(max_bkm1, logits_bkmk.max(-1, keepdims=True))
            probs_bkmk = jnp.exp(logits_bkmk - new_max_bkm1)
            rescale_bkm1 = jnp.exp(max_bkm1 - new_max_bkm1)
            pv_bkmh = jnp.einsum("bkms,bksh->bkmh", probs_bkmk.astype(v_bksh.dtype), tile(v_bksh, j * block, 2),
                                 preferred_element_type=jnp.float32)
            return new_max_bkm1, sum_bkm1 * rescale_bkm1 + probs_bkmk.sum(-1, keepdims=True), \
                acc_bkmh * rescale_bkm1 + pv_bkmh

        # Starting from MASK_VALUE (not -inf), a tile whose entries are all masked adds garbage that the
        # first allowed key rescales by exp(MASK_VALUE - max) = 0; every row has one (its own token).
        carry = (jnp.full((batch, kv_heads, group * block, 1), MASK_VALUE, jnp.float32),
                 jnp.zeros((batch, kv_heads, group * block, 1), jnp.float32),
                 jnp.zeros((batch, kv_heads, group * block, head_dim), jnp.float32))
        if differentiable:
            in_range = lambda j, c: jax.lax.cond((lo_n[i] <= j) & (j < hi_n[i]), update, lambda _, c: c, j, c)
            _, sum_bkm1, acc_bkmh = jax.lax.fori_loop(0, blocks, in_range, carry)
        else:
            _, sum_bkm1, acc_bkmh = jax.lax.fori_loop(lo_n[i], hi_n[i], update, carry)
        return (acc_bkmh / sum_bkm1).astype(q_btnh.dtype).reshape(batch, kv_heads, group, block, head_dim)

    # One loop body for all query blocks (a Python loop would compile one per block).
    out_nbkgqh = jax.lax.map(query_block, jnp.arange(blocks))
    return out_nbkgqh.transpose(1, 0, 4, 2, 3, 5).reshape(batch, -1, heads, head_dim)[:, :seq_len]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, block: int = 256):
    """`_tiled` with the fast forward (dynamic key ranges); its gradients recompute through the
    differentiable form."""
    return _tiled(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, block, differentiable=False)


def _blockwise_forward(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, block):
    inputs = (q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt)
    return _blockwise(*inputs, block), inputs


def _blockwise_backward(block, inputs, d_out_btnh):
    q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt = inputs
    tiled = lambda q, k, v: _tiled(q, k, v, segment_ids_bt, is_vision_bt, block, differentiable=True)
    return (*jax.vjp(tiled, q_btnh, k_btkh, v_btkh)[1](d_out_btnh), None, None)


_blockwise.defvjp(_blockwise_forward, _blockwise_backward)


def _xla(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt):
    return dense_attention(q_btnh, k_btkh, v_btkh, segment_mask(segment_ids_bt, is_vision_bt)[:, 0])


def _pallas(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt):
    from mrrm_jax.models.segment_flash import segment_flash_attention  # Pallas imports are slow; on demand

    return map_rows(segment_flash_attention)(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt)


def _cudnn(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt):
    # cuDNN fused attention on GPU (bf16/fp16); it takes the mask densely, as it has no segment ids.
    mask_b1tt = segment_mask(segment_ids_bt, is_vision_bt)
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1tt, implementation="cudnn")


# "xla": dense reference, anywhere. "blockwise": the same mask in skipped tiles, plain XLA (CPU, and a
# GPU fallback); faster than "xla" from ~1k tokens, forward and backward (scoring's default for models
# saved with "xla"). "pallas": block-sparse flash kernel for TPU (interpret mode elsewhere, for tests).
# "cudnn": GPU.
BACKENDS = {"xla": _xla, "blockwise": _blockwise, "pallas": _pallas, "cudnn": _cudnn}


def inference_backend(saved: str) -> str:
    """The backend that scoring runs for a model saved with `saved`: the dense "xla" reference becomes
    "blockwise", the same mask and float32 softmax over each example's tiles only, not the whole packed
    row's [T, T] (3.5x faster per layer at 4096-token rows on CPU, and one tile in memory). Training
    keeps the saved backend: its gradients through "blockwise" recompute the forward."""
    return "blockwise" if saved == "xla" else saved


def segment_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, backend: str = "xla"):
    """Multi-head (GQA) attention under the segment-aware mask; scale 1/sqrt(head_dim).

    q [B, T, heads, head_dim], k/v [B, T, kv_heads, head_dim] -> [B, T, heads, head_dim].
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {sorted(BACKENDS)}")
    return BACKENDS[backend](q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt)
