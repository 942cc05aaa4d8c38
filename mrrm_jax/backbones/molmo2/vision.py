"""The Molmo2 ViT (SigLIP-family): patch embedding, learned positions, pre-norm blocks.

Only the outputs of `adapter.feature_layers` are kept; the scan carries one buffer per feature
layer instead of stacking every layer's output, so activation memory does not grow with depth.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrrm_jax.backbones.molmo2.preprocess import pixel_table
from mrrm_jax.models.attention import dense_attention
from mrrm_jax.models.layers import Dense, GeluMLP
from mrrm_jax.backbones.molmo2.config import Molmo2Config
from mrrm_jax.core.sharding import constrain_rows


def normalized_pixels(pixels_npd: jax.Array, cfg) -> jax.Array:
    """uint8 patch pixels [..., patch_dim] (channels innermost) -> float32, normalised with the
    processor's mean and std (`cfg`: the `VisionConfig`). A lookup of the preprocessing's own float32
    arithmetic, so bit-identical to normalising on the host as transformers does."""
    table_vc = jnp.asarray(pixel_table(cfg.image_mean, cfg.image_std))
    channel_d = np.arange(pixels_npd.shape[-1]) % cfg.num_channels
    return table_vc[pixels_npd, channel_d]


class VisionAttention(nn.Module):
    """Full (unmasked) multi-head attention within one crop."""

    config: Molmo2Config

    @nn.compact
    def __call__(self, x_npd):
        cfg, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        proj = lambda n, name: Dense(n, use_bias=cfg.attention_bias, dtype=dt, param_dtype=pdt, name=name)
        heads = (*x_npd.shape[:-1], cfg.num_heads, cfg.head_dim)
        q = proj(cfg.num_heads * cfg.head_dim, "q_proj")(x_npd).reshape(heads)
        k = proj(cfg.num_heads * cfg.head_dim, "k_proj")(x_npd).reshape(heads)
        v = proj(cfg.num_heads * cfg.head_dim, "v_proj")(x_npd).reshape(heads)
        out = dense_attention(q, k, v)
        return proj(cfg.hidden_size, "o_proj")(out.reshape(*x_npd.shape[:-1], -1))


class VisionLayer(nn.Module):
    config: Molmo2Config

    @nn.compact
    def __call__(self, carry, layer_index):
        h_npd, features_fnpd = carry
        h_npd = constrain_rows(h_npd)
        cfg = self.config.vision
        norm = lambda name: nn.LayerNorm(cfg.layer_norm_eps, dtype=self.config.dtype,
                                         param_dtype=self.config.param_dtype, name=name)
        h_npd = h_npd + VisionAttention(self.config, name="self_attn")(norm("layer_norm1")(h_npd))
        mlp = GeluMLP(cfg.intermediate_size, self.config.dtype, self.config.param_dtype, name="mlp")
        h_npd = h_npd + mlp(norm("layer_norm2")(h_npd))
        wanted_f = jnp.asarray(self.config.adapter.feature_layers) == layer_index
        features_fnpd = jnp.where(wanted_f[:, None, None, None], h_npd[None], features_fnpd)
        return (h_npd, features_fnpd), None


class VisionTower(nn.Module):
    """patches [N, P, patch_dim] -> concatenated feature-layer outputs [N, P, F * hidden]. uint8 patches
    are pixels, normalised here; float patches are normalised already (transformers' `pixel_values`)."""

    config: Molmo2Config

    @nn.compact
    def __call__(self, patches_npd):
        cfg, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        if patches_npd.dtype == jnp.uint8:
            patches_npd = normalized_pixels(patches_npd, cfg)
        h_npd = Dense(cfg.hidden_size, use_bias=True, dtype=dt, param_dtype=pdt, name="patch_embedding")(patches_npd)
        positions_pd = self.param("positional_embedding", nn.initializers.normal(0.02),
                                  (cfg.num_patches, cfg.hidden_size), pdt)
        h_npd = h_npd + positions_pd.astype(dt)[None]
        num_features = len(self.config.adapter.feature_layers)
        features_fnpd = jnp.zeros((num_features, *h_npd.shape), h_npd.dtype)
        layers = nn.scan(VisionLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=cfg.num_layers, unroll=self.config.scan_unroll)(self.config, name="layers")
        (_, features_fnpd), _ = layers((h_npd, features_fnpd), jnp.arange(cfg.num_layers))
        return jnp.concatenate(list(features_fnpd), axis=-1)
