"""The Qwen3-style text decoder that Molmo2 and Qwen3-VL share: GQA with QK RMSNorm, SwiGLU,
RMSNorm (pre-norm, or Molmo2's `norm_after`), layers under `scan`.

What differs between the models is data, not code:
- rope: the caller computes a small stack of cos/sin tables [R, B, T, head_dim] and each layer
  reads the table its scanned `rope_index` names (Molmo2: scaled / unscaled, by
  `rope_scaling_layers`; Qwen3-VL: one M-RoPE table);
- deepstack (Qwen3-VL): a stack of K additions [K, B, T, D], and a scanned per-layer
  `inject_index` (-1: none) naming the one added after that layer, so the scan never holds an
  [L, B, T, D] tensor.

Generation (policy/sampler.py) runs the same layers with a KV cache, `{"k", "v"}` [L, B, S, kv_heads,
head_dim] scanned with the layers: a prefill (`cache_index_b` None) attends as in training and writes
its keys and values at cache slots 0..T-1; a decoding step (`cache_index_b` [B]) writes each row's one
new token at its own slot and attends to the row's slots up to it. Rows keep their own lengths (prompts
right-padded): the padding's slots are never attended to before a generated token overwrites them.

`config.text` must provide hidden_size, num_layers, num_heads, num_kv_heads, head_dim,
intermediate_size, attention_bias, qk_norm_type, rms_norm_eps, norm_after and embedding_rows;
`config` itself dtype, param_dtype, attention, remat and scan_unroll.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrrm_jax.models import rope
from mrrm_jax.models.attention import dense_attention, segment_attention
from mrrm_jax.models.layers import Dense, RMSNorm, swiglu
from mrrm_jax.core.sharding import constrain_rows

# What a rematerialised layer keeps for the backward pass.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Attention(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x_btd, cos_btd, sin_btd, segment_ids_bt, is_vision_bt, cache=None, cache_index_b=None):
        """Output [B, T, D], and the layer's cache updated (None without one; see the module docstring)."""
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
        if cache is None or cache_index_b is None:
            out_btnh = segment_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, self.config.attention)
            if cache is not None:  # prefill: this pass's keys and values fill slots 0..T-1
                write = lambda c_bskh, x_btkh: jax.lax.dynamic_update_slice_in_dim(c_bskh, x_btkh.astype(c_bskh.dtype), 0, 1)
                cache = {"k": write(cache["k"], k_btkh), "v": write(cache["v"], v_btkh)}
        else:  # one decoding step (T = 1): each row's token goes to its slot and sees the slots up to it
            rows_b = jnp.arange(x_btd.shape[0])
            cache = {"k": cache["k"].at[rows_b, cache_index_b].set(k_btkh[:, 0].astype(cache["k"].dtype)),
                     "v": cache["v"].at[rows_b, cache_index_b].set(v_btkh[:, 0].astype(cache["v"].dtype))}
            slots_s = jnp.arange(cache["k"].shape[1])
            allowed_b1s = (slots_s[None, :] <= cache_index_b[:, None])[:, None]
            out_btnh = dense_attention(q_btnh, cache["k"].astype(q_btnh.dtype), cache["v"].astype(q_btnh.dtype),
                                       allowed_b1s)
        return proj(cfg.hidden_size, False, "o_proj")(out_btnh.reshape(*x_btd.shape[:-1], -1)), cache


class MLP(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x):
        cfg, dt, pdt = self.config.text, self.config.dtype, self.config.param_dtype
        dense = lambda n, name: Dense(n, dtype=dt, param_dtype=pdt, name=name)
        gate, up = dense(cfg.intermediate_size, "gate_proj")(x), dense(cfg.intermediate_size, "up_proj")(x)
        return dense(cfg.hidden_size, "down_proj")(swiglu(gate, up))


class DecoderLayer(nn.Module):
    config: object

    @nn.compact
    def __call__(self, h_btd, per_layer, cos_rbtd, sin_rbtd, segment_ids_bt, is_vision_bt, inject_kbtd,
                 cache_index_b):
        rope_index, inject_index, cache = per_layer
        cfg = self.config.text
        h_btd = constrain_rows(h_btd)
        cos_btd, sin_btd = cos_rbtd[rope_index], sin_rbtd[rope_index]
        attn_norm = RMSNorm(cfg.rms_norm_eps, self.config.param_dtype, name="input_layernorm")
        mlp_norm = RMSNorm(cfg.rms_norm_eps, self.config.param_dtype, name="post_attention_layernorm")
        attention, mlp = Attention(self.config, name="self_attn"), MLP(self.config, name="mlp")
        attend = lambda x_btd: attention(x_btd, cos_btd, sin_btd, segment_ids_bt, is_vision_bt, cache, cache_index_b)
        if cfg.norm_after:  # post-norm: normalise each sublayer's output
            attended_btd, cache = attend(h_btd)
            h_btd = h_btd + attn_norm(attended_btd)
            h_btd = h_btd + mlp_norm(mlp(h_btd))
        else:
            attended_btd, cache = attend(attn_norm(h_btd))
            h_btd = h_btd + attended_btd
            h_btd = h_btd + mlp(mlp_norm(h_btd))
        if inject_kbtd is not None:
            added_btd = inject_kbtd[jnp.maximum(inject_index, 0)].astype(h_btd.dtype)
            h_btd = h_btd + jnp.where(inject_index >= 0, added_btd, jnp.zeros_like(added_btd))
        return h_btd, cache


class TextDecoder(nn.Module):
    """embeddings [B, T, D] -> final-norm hidden states [B, T, D]; see the module docstring."""

    config: object

    def setup(self):
        cfg = self.config.text
        self.embed_tokens = nn.Embed(cfg.embedding_rows, cfg.hidden_size, dtype=self.config.dtype,
                                     param_dtype=self.config.param_dtype, embedding_init=nn.initializers.normal(0.02))
        layer = DecoderLayer
        if self.config.remat != "none":
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.config.remat], prevent_cse=False)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                              in_axes=(0,) + (nn.broadcast,) * 6,
                              length=cfg.num_layers, unroll=self.config.scan_unroll)(self.config)
        self.norm = RMSNorm(cfg.rms_norm_eps, self.config.param_dtype)

    def embed(self, tokens_bt):
        return self.embed_tokens(tokens_bt)

    def decode(self, embeds_btd, cos_rbtd, sin_rbtd, rope_index_l, segment_ids_bt, is_vision_bt,
               inject_kbtd=None, inject_index_l=None, cache=None, cache_index_b=None):
        """`rope_index_l` [L]: each layer's rope table; `inject_index_l` [L]: each layer's addition
        from `inject_kbtd` (-1: none; None: no additions at all). With a `cache` (see the module
        docstring): (hidden states, the cache updated)."""
        if inject_index_l is None:
            inject_index_l = jnp.full((self.config.text.num_layers,), -1, jnp.int32)
        h_btd, new_cache = self.layers(embeds_btd, (rope_index_l, inject_index_l, cache), cos_rbtd, sin_rbtd,
                                       segment_ids_bt, is_vision_bt, inject_kbtd, cache_index_b)
        return self.norm(h_btd) if cache is None else (self.norm(h_btd), new_cache)
