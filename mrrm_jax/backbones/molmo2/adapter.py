"""The Molmo2 adapter: attention pooling of ViT patches into image tokens, then a SwiGLU projector.

Each output token pools the patches named by one row of the pooling index array (`-1` = empty
slot). The query is the mean of the valid pooled patches; keys and values are the patches.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrrm_jax.models.layers import Dense, swiglu
from mrrm_jax.backbones.molmo2.config import Molmo2Config


def _gather(x_bpn, index_bks):
    """[B, K, S, n]: x's rows named by the indices, per batch row."""
    return jax.vmap(lambda x_pn, index_ks: x_pn[index_ks])(x_bpn, index_bks)


class PoolingAttention(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, query_bk1d, features_bpd, index_bks, attend_bks):
        """One pooled token [B, K, hidden] per row of `index_bks`, attending over the patches of
        `features_bpd` it names. Keys and values are projected per patch, then gathered: each patch
        feeds one pooled token at most, while most of the [K, S] slots are empty (2x2 image pooling in
        3x3 video slots; a row's unused tokens)."""
        cfg, dt, pdt = self.config.adapter, self.config.dtype, self.config.param_dtype
        proj = lambda n, name: Dense(n, use_bias=cfg.attention_bias, dtype=dt, param_dtype=pdt, name=name)
        heads = lambda x, n: x.reshape(*x.shape[:-1], n, cfg.head_dim)
        batch, tokens = index_bks.shape[:2]
        q = heads(proj(cfg.num_heads * cfg.head_dim, "q_proj")(query_bk1d), cfg.num_heads)
        k = heads(_gather(proj(cfg.num_kv_heads * cfg.head_dim, "k_proj")(features_bpd), index_bks), cfg.num_kv_heads)
        v = heads(_gather(proj(cfg.num_kv_heads * cfg.head_dim, "v_proj")(features_bpd), index_bks), cfg.num_kv_heads)
        flat = lambda x: x.reshape(batch * tokens, *x.shape[2:])
        out_k1nh = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=flat(attend_bks)[:, None, None, :],
                                                implementation="xla")
        return proj(cfg.hidden_size, "o_proj")(out_k1nh.reshape(batch, tokens, -1))


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
        index_bks = jnp.clip(pooling_bks, 0)
        # The query is the mean of the valid slots, as a weighted sum (a batched matrix-vector product:
        # written as a masked sum, XLA:CPU fuses that sum into the query projection, 10x slower).
        mean_weights_bks = valid_bks / jnp.maximum(valid_bks.sum(-1, keepdims=True), 1)
        query_bk1d = jnp.einsum("bks,bksd->bkd", mean_weights_bks.astype(features_bpd.dtype),
                                _gather(features_bpd, index_bks))[:, :, None]
        # An all-empty row would give a softmax over nothing (NaN, and NaN gradients through the
        # later `where`); let it attend everywhere instead: its output is never used.
        attend_bks = valid_bks | ~valid_bks.any(-1, keepdims=True)

        pooled_bkd = PoolingAttention(self.config, name="image_pooling_2d")(query_bk1d, features_bpd, index_bks,
                                                                             attend_bks)
        return ImageProjector(self.config, name="image_projector")(pooled_bkd)
