"""The Molmo2 adapter: attention pooling of ViT patches into image tokens, then a SwiGLU projector.

Each output token pools the patches named by one row of the pooling index array (`-1` = empty
slot). The query is the mean of the valid pooled patches; keys and values are the patches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrrm_jax.models.layers import Dense, swiglu
from mrrm_jax.models.molmo2.config import Molmo2Config


class PoolingAttention(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, query_k1d, patches_ksd, attend_ks):
        cfg, dt, pdt = self.config.adapter, self.config.dtype, self.config.param_dtype
        proj = lambda n, name: Dense(n, use_bias=cfg.attention_bias, dtype=dt, param_dtype=pdt, name=name)
        heads = lambda x, n: x.reshape(*x.shape[:-1], n, cfg.head_dim)
        q = heads(proj(cfg.num_heads * cfg.head_dim, "q_proj")(query_k1d), cfg.num_heads)
        k = heads(proj(cfg.num_kv_heads * cfg.head_dim, "k_proj")(patches_ksd), cfg.num_kv_heads)
        v = heads(proj(cfg.num_kv_heads * cfg.head_dim, "v_proj")(patches_ksd), cfg.num_kv_heads)
        out_k1nh = jax.nn.dot_product_attention(q, k, v, mask=attend_ks[:, None, None, :], implementation="xla")
        return proj(cfg.hidden_size, "o_proj")(out_k1nh.reshape(out_k1nh.shape[0], -1))


class ImageProjector(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, x):
        cfg, dt, pdt = self.config.adapter, self.config.dtype, self.config.param_dtype
        dense = lambda n, bias, name: Dense(n, use_bias=bias, dtype=dt, param_dtype=pdt, name=name)
        gate = dense(cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
        up = dense(cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
        return dense(self.config.text.hidden_size, False, "down_proj")(swiglu(gate, up))


class Adapter(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, features_bpd, pooling_bks):
        """features [B, patches, F*hidden] per row, pooling [B, K, S] -> tokens [B, K, text hidden].

        Rows of `pooling_bks` with no valid index produce values that must be ignored.
        """
        valid_bks = pooling_bks >= 0
        pooled_bksd = jax.vmap(lambda f_pd, idx_ks: f_pd[idx_ks])(features_bpd, jnp.clip(pooling_bks, 0))
        pooled_bksd = pooled_bksd * valid_bks[..., None].astype(pooled_bksd.dtype)
        num_valid_bk = jnp.maximum(valid_bks.sum(-1), 1).astype(pooled_bksd.dtype)
        query_bk1d = pooled_bksd.sum(-2, keepdims=True) / num_valid_bk[..., None, None]
        # An all-empty row would give a softmax over nothing (NaN, and NaN gradients through the
        # later `where`); let it attend everywhere instead: its output is never used.
        attend_bks = valid_bks | ~valid_bks.any(-1, keepdims=True)

        batch, tokens, slots, dim = pooled_bksd.shape
        pooled_kd = PoolingAttention(self.config, name="image_pooling_2d")(
            query_bk1d.reshape(batch * tokens, 1, dim), pooled_bksd.reshape(batch * tokens, slots, dim),
            attend_bks.reshape(batch * tokens, slots))
        tokens_bkd = ImageProjector(self.config, name="image_projector")(pooled_kd)
        return tokens_bkd.reshape(batch, tokens, -1)
