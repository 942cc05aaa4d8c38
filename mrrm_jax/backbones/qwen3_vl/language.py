"""The Qwen3-VL language model: the shared Qwen3 decoder (models/decoder.py) with interleaved M-RoPE,
a purely causal mask (transformers' `create_causal_mask`: unlike Molmo2, vision tokens do NOT see
each other bidirectionally) and the deepstack additions after the first layers."""

from __future__ import annotations

import jax.numpy as jnp

from mrrm_jax.models import rope
from mrrm_jax.models.decoder import TextDecoder


class LanguageModel(TextDecoder):
    """embeddings [B, T, D] -> final-norm hidden states [B, T, D].

    positions_b3t [B, 3, T]: (t, h, w) M-RoPE positions; deepstack_kbtd [K, B, T, D] or None: added
    to the hidden states after layer k (zero away from the vision tokens). With a KV cache: (hidden
    states, the cache), see models/decoder.py.
    """

    def __call__(self, embeds_btd, positions_b3t, segment_ids_bt, deepstack_kbtd=None, cache=None, cache_index_b=None):
        cfg = self.config.text
        inv_freq, scaling = rope.inverse_frequencies({"rope_theta": cfg.rope_theta}, cfg.head_dim,
                                                     cfg.max_position_embeddings, scaled=False)
        cos_btd, sin_btd = rope.mrope_tables(positions_b3t, inv_freq, cfg.mrope_section, scaling, embeds_btd.dtype)
        layers = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        inject_index_l = None
        if deepstack_kbtd is not None:
            inject_index_l = jnp.where(layers < deepstack_kbtd.shape[0], layers, -1)
        return self.decode(embeds_btd, cos_btd[None], sin_btd[None], jnp.zeros_like(layers), segment_ids_bt,
                           jnp.zeros(segment_ids_bt.shape, bool), deepstack_kbtd, inject_index_l, cache, cache_index_b)
