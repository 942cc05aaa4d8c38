"""The Molmo2 language model: a Qwen3-style decoder (GQA, QK RMSNorm, SwiGLU), layers under `scan`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrrm_jax.models import rope
from mrrm_jax.models.attention import segment_attention
from mrrm_jax.models.layers import Dense, RMSNorm, swiglu
from mrrm_jax.models.molmo2.config import Molmo2Config
from mrrm_jax.sharding import constrain_rows

# What a rematerialised layer keeps for the backward pass.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Attention(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, x_btd, cos_btd, sin_btd, segment_ids_bt, is_vision_bt):
        cfg, dt, pdt = self.config.text, self.config.dtype, self.config.param_dtype
        proj = lambda n, bias, name: Dense(n, use_bias=bias, dtype=dt, param_dtype=pdt, name=name)
        q_bte = proj(cfg.num_heads * cfg.head_dim, cfg.attention_bias, "q_proj")(x_btd)
        k_bte = proj(cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias, "k_proj")(x_btd)
        v_bte = proj(cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias, "v_proj")(x_btd)
        q_norm = RMSNorm(cfg.rms_norm_eps, pdt, name="q_norm")
        k_norm = RMSNorm(cfg.rms_norm_eps, pdt, name="k_norm")
        if cfg.qk_norm_type == "olmo":  # over the whole projection, before the head split
            q_bte, k_bte = q_norm(q_bte), k_norm(k_bte)
        heads = lambda x, n: x.reshape(*x.shape[:-1], n, cfg.head_dim)
        q_btnh, k_btkh, v_btkh = heads(q_bte, cfg.num_heads), heads(k_bte, cfg.num_kv_heads), heads(v_bte, cfg.num_kv_heads)
        if cfg.qk_norm_type == "qwen3":  # per head
            q_btnh, k_btkh = q_norm(q_btnh), k_norm(k_btkh)
        q_btnh, k_btkh = rope.apply_rope(q_btnh, cos_btd, sin_btd), rope.apply_rope(k_btkh, cos_btd, sin_btd)
        out_btnh = segment_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, self.config.attention)
        return proj(cfg.hidden_size, False, "o_proj")(out_btnh.reshape(*x_btd.shape[:-1], -1))


class MLP(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, x):
        cfg, dt, pdt = self.config.text, self.config.dtype, self.config.param_dtype
        dense = lambda n, name: Dense(n, dtype=dt, param_dtype=pdt, name=name)
        gate, up = dense(cfg.intermediate_size, "gate_proj")(x), dense(cfg.intermediate_size, "up_proj")(x)
        return dense(cfg.hidden_size, "down_proj")(swiglu(gate, up))


class DecoderLayer(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, h_btd, scaled_rope, rope_tables, segment_ids_bt, is_vision_bt):
        cfg = self.config.text
        h_btd = constrain_rows(h_btd)
        # Each layer picks the scaled or the unscaled table (`rope_scaling_layers`).
        (cos_s, sin_s), (cos_u, sin_u) = rope_tables
        cos_btd, sin_btd = jnp.where(scaled_rope, cos_s, cos_u), jnp.where(scaled_rope, sin_s, sin_u)
        attn_norm = RMSNorm(cfg.rms_norm_eps, self.config.param_dtype, name="input_layernorm")
        mlp_norm = RMSNorm(cfg.rms_norm_eps, self.config.param_dtype, name="post_attention_layernorm")
        attention, mlp = Attention(self.config, name="self_attn"), MLP(self.config, name="mlp")
        if cfg.norm_after:  # post-norm: normalise each sublayer's output
            h_btd = h_btd + attn_norm(attention(h_btd, cos_btd, sin_btd, segment_ids_bt, is_vision_bt))
            h_btd = h_btd + mlp_norm(mlp(h_btd))
        else:
            h_btd = h_btd + attention(attn_norm(h_btd), cos_btd, sin_btd, segment_ids_bt, is_vision_bt)
            h_btd = h_btd + mlp(mlp_norm(h_btd))
        return h_btd, None


class LanguageModel(nn.Module):
    """embeddings [B, T, D] -> final-norm hidden states [B, T, D]."""

    config: Molmo2Config

    def setup(self):
        cfg = self.config.text
        self.embed_tokens = nn.Embed(cfg.embedding_rows, cfg.hidden_size, dtype=self.config.dtype,
                                     param_dtype=self.config.param_dtype, embedding_init=nn.initializers.normal(0.02))
        layer = DecoderLayer
        if self.config.remat != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                              length=cfg.num_layers, unroll=self.config.scan_unroll)(self.config)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.config.param_dtype)

    def embed(self, tokens_bt):
        return self.embed_tokens(tokens_bt)

    def __call__(self, embeds_btd, positions_bt, segment_ids_bt, is_vision_bt):
        cfg = self.config.text
        rope_params = dict(cfg.rope)
        tables = tuple(
            rope.rope_tables(positions_bt, *rope.inverse_frequencies(rope_params, cfg.head_dim,
                                                                     cfg.max_position_embeddings, scaled),
                             embeds_btd.dtype)
            for scaled in (True, False))
        scaled_l = jnp.asarray(cfg.scaled_rope_layers)
        h_btd, _ = self.layers(embeds_btd, scaled_l, tables, segment_ids_bt, is_vision_bt)
        return self.norm(h_btd)
