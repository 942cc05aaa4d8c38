"""The Molmo2 language model: the shared Qwen3-style decoder (models/decoder.py) with Molmo2's rope,
scaled (`rope_parameters`) on the layers of `rope_scaling_layers` and plain on the others."""

from __future__ import annotations

import jax.numpy as jnp

from mrrm_jax.models import rope
from mrrm_jax.models.decoder import TextDecoder


class LanguageModel(TextDecoder):
    """embeddings [B, T, D] -> final-norm hidden states [B, T, D] (with a KV cache: and the cache, see
    models/decoder.py)."""

    def __call__(self, embeds_btd, positions_bt, segment_ids_bt, is_vision_bt, cache=None, cache_index_b=None):
        cfg = self.config.text
        rope_params = dict(cfg.rope)
        tables = [rope.rope_tables(positions_bt, *rope.inverse_frequencies(rope_params, cfg.head_dim,
                                                                         cfg.max_position_embeddings, scaled),
                                   embeds_btd.dtype)
                  for scaled in (True, False)]
        cos_rbtd, sin_rbtd = jnp.stack([c for c, _ in tables]), jnp.stack([s for _, s in tables])
        rope_index_l = jnp.asarray([0 if scaled else 1 for scaled in cfg.scaled_rope_layers], jnp.int32)
        return self.decode(embeds_btd, cos_rbtd, sin_rbtd, rope_index_l, segment_ids_bt, is_vision_bt,
                           cache=cache, cache_index_b=cache_index_b)
