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

import jax
import jax.numpy as jnp

from mrrm_jax.sharding import map_rows


def segment_mask(segment_ids_bt, is_vision_bt):
    """Boolean mask [B, 1, T, T] (query, key) from per-token arrays."""
    seq_len = segment_ids_bt.shape[1]
    causal_tt = jnp.arange(seq_len)[None, :] <= jnp.arange(seq_len)[:, None]
    same_segment_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    vision_pair_btt = is_vision_bt[:, :, None] & is_vision_bt[:, None, :]
    return (same_segment_btt & (causal_tt[None] | vision_pair_btt))[:, None]


def _xla(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt):
    mask_b1tt = segment_mask(segment_ids_bt, is_vision_bt)
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1tt, implementation="xla")


def _pallas(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt):
    from mrrm_jax.models.segment_flash import segment_flash_attention  # Pallas imports are slow; on demand

    return map_rows(segment_flash_attention)(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt)


def _cudnn(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt):
    # cuDNN fused attention on GPU (bf16/fp16); it takes the mask densely, as it has no segment ids.
    mask_b1tt = segment_mask(segment_ids_bt, is_vision_bt)
    return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1tt, implementation="cudnn")


# "xla": dense reference, anywhere. "pallas": block-sparse flash kernel for TPU (interpret mode
# elsewhere, for tests). "cudnn": GPU.
_BACKENDS = {"xla": _xla, "pallas": _pallas, "cudnn": _cudnn}


def segment_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, backend: str = "xla"):
    """Multi-head (GQA) attention under the segment-aware mask; scale 1/sqrt(head_dim).

    q [B, T, heads, head_dim], k/v [B, T, kv_heads, head_dim] -> [B, T, heads, head_dim].
    """
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not available; choose one of {sorted(_BACKENDS)}")
    return _BACKENDS[backend](q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt)
