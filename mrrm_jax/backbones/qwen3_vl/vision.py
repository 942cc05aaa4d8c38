"""The Qwen3-VL ViT: patch embedding, resampled learned positions, 2-D rope, pre-LN blocks with
attention inside each (media item, temporal patch), the 2x2 patch merger and the deepstack mergers.

Every input is per patch (see `data/qwen3_vl_positions.vision_layout`), so one compiled program serves any mix of
images and videos in a row: the row's patches are one sequence whose `patch_segment_ids` keep
images and frames apart, as transformers' `cu_seqlens` does.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrrm_jax.models import rope
from mrrm_jax.models.attention import segment_attention
from mrrm_jax.models.layers import Dense, GeluMLP
from mrrm_jax.backbones.qwen3_vl.config import Qwen3VLConfig
from mrrm_jax.core.sharding import constrain_rows


def position_corners(positions_bp2, grid_bp2, side: int):
    """(index [B, P, 4] into the learned side x side table, weight [B, P, 4]): bilinear resampling
    (align_corners) of the table to each patch's frame grid, as transformers'
    `get_vision_interpolation_indices_and_weights`: source = i * (side - 1) / (size - 1) in float32, in
    that order (not torch.linspace's arithmetic, which rounds differently)."""
    sizes_bp2 = jnp.maximum(grid_bp2 - 1, 1).astype(jnp.float32)
    source_bp2 = positions_bp2.astype(jnp.float32) * jnp.float32(side - 1) / sizes_bp2
    floor_bp2 = jnp.floor(source_bp2)
    offsets = jnp.arange(2, dtype=jnp.float32)
    taps_bp22 = jnp.clip(floor_bp2.astype(jnp.int32)[..., None] + jnp.arange(2), 0, side - 1)
    weights_bp22 = jnp.maximum(1 - jnp.abs(source_bp2[..., None] - floor_bp2[..., None] - offsets), 0)
    index_bp4 = (taps_bp22[:, :, 0, :, None] * side + taps_bp22[:, :, 1, None, :]).reshape(*positions_bp2.shape[:2], 4)
    weight_bp4 = (weights_bp22[:, :, 0, :, None] * weights_bp22[:, :, 1, None, :]).reshape(*positions_bp2.shape[:2], 4)
    return index_bp4, weight_bp4


def _layer_norm(cfg: Qwen3VLConfig, name: str):
    # Two-pass variance, as torch's LayerNorm (the ViT's activations have large means).
    return nn.LayerNorm(cfg.vision.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                        use_fast_variance=False, name=name)


class VisionAttention(nn.Module):
    """Bidirectional attention within each patch segment; q/k rotated in float32, like the reference."""

    config: Qwen3VLConfig

    @nn.compact
    def __call__(self, x_bpd, cos_bph, sin_bph, segment_ids_bp):
        cfg, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        proj = lambda name: Dense(cfg.hidden_size, use_bias=True, dtype=dt, param_dtype=pdt, name=name)
        heads = (*x_bpd.shape[:-1], cfg.num_heads, cfg.head_dim)
        # transformers' fused `qkv` is [q; k; v] by rows; the converter splits it.
        q_bpnh, k_bpnh, v_bpnh = (proj(f"{p}_proj")(x_bpd).reshape(heads) for p in "qkv")
        rotate = lambda x: rope.apply_rope(x.astype(jnp.float32), cos_bph, sin_bph).astype(x.dtype)
        q_bpnh, k_bpnh = rotate(q_bpnh), rotate(k_bpnh)
        out_bpnh = segment_attention(q_bpnh, k_bpnh, v_bpnh, segment_ids_bp, jnp.ones_like(segment_ids_bp, bool),
                                     self.config.attention)
        return proj("proj")(out_bpnh.reshape(*x_bpd.shape[:-1], -1))


class VisionBlock(nn.Module):
    """One pre-LN block; the carry also holds the outputs of the deepstack layers seen so far."""

    config: Qwen3VLConfig

    @nn.compact
    def __call__(self, carry, layer_index, cos_bph, sin_bph, segment_ids_bp):
        h_bpd, deepstack_kbpd = carry
        h_bpd = constrain_rows(h_bpd)
        attention = VisionAttention(self.config, name="attn")
        h_bpd = h_bpd + attention(_layer_norm(self.config, "norm1")(h_bpd), cos_bph, sin_bph, segment_ids_bp)
        mlp = GeluMLP(self.config.vision.intermediate_size, self.config.dtype, self.config.param_dtype,
                      ("linear_fc1", "linear_fc2"), name="mlp")
        h_bpd = h_bpd + mlp(_layer_norm(self.config, "norm2")(h_bpd))
        wanted_k = jnp.asarray(self.config.vision.deepstack_layers) == layer_index
        deepstack_kbpd = jnp.where(wanted_k[:, None, None, None], h_bpd[None], deepstack_kbpd)
        return (h_bpd, deepstack_kbpd), None


class PatchMerger(nn.Module):
    """[B, P, D] -> [B, P / 4, out]: each 2x2 block of patches (contiguous: merge-block order) becomes one
    LM token. The final merger normalises each patch; the deepstack ones (`postshuffle`) the 4 * D vector."""

    config: Qwen3VLConfig
    postshuffle: bool

    @nn.compact
    def __call__(self, x_bpd):
        cfg, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        batch, patches, width = x_bpd.shape
        shuffle = lambda x: x.reshape(batch, patches // cfg.merge_unit, cfg.merge_unit * width)
        norm = _layer_norm(self.config, "norm")
        x_bnm = norm(shuffle(x_bpd)) if self.postshuffle else shuffle(norm(x_bpd))
        x_bnm = Dense(cfg.merge_unit * width, use_bias=True, dtype=dt, param_dtype=pdt, name="linear_fc1")(x_bnm)
        x_bnm = jax.nn.gelu(x_bnm, approximate=False)  # nn.GELU(): exact
        return Dense(cfg.out_hidden_size, use_bias=True, dtype=dt, param_dtype=pdt, name="linear_fc2")(x_bnm)


class VisionTower(nn.Module):
    """A row's patches -> (LM tokens [B, P / 4, out], deepstack features [K, B, P / 4, out]).

    patches_bpx [B, P, C*T*p*p]; segment_ids_bp [B, P] (0: padding); positions_bp2 [B, P, 2] (row, col);
    grid_bp2 [B, P, 2]: (h, w) of each patch's frame, to which the learned position grid is resampled.
    P must be a multiple of 4 (whole merge blocks).
    """

    config: Qwen3VLConfig

    @nn.compact
    def __call__(self, patches_bpx, segment_ids_bp, positions_bp2, grid_bp2):
        cfg, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        if patches_bpx.shape[1] % cfg.merge_unit:
            raise ValueError(f"{patches_bpx.shape[1]} patches per row: pad to a multiple of {cfg.merge_unit}")
        # The Conv3d (kernel = stride = (T, p, p)) on one (C, T, p, p) patch vector is a matmul.
        h_bpd = Dense(cfg.hidden_size, use_bias=True, dtype=dt, param_dtype=pdt, name="patch_embed")(patches_bpx)
        table_gd = self.param("pos_embed", nn.initializers.normal(0.02), (cfg.num_position_embeddings, cfg.hidden_size),
                              pdt)
        pos_index_bp4, pos_weight_bp4 = position_corners(positions_bp2, grid_bp2, cfg.grid_side)
        corners_bp4d = table_gd.astype(dt)[pos_index_bp4] * pos_weight_bp4[..., None].astype(dt)
        h_bpd = h_bpd + corners_bp4d.sum(axis=2)

        inv_freq, _ = rope.inverse_frequencies({"rope_theta": cfg.rope_theta}, cfg.head_dim // 2, 0, scaled=False)
        cos_bph, sin_bph = rope.axial_tables(positions_bp2, inv_freq, jnp.float32)
        deepstack_kbpd = jnp.zeros((len(cfg.deepstack_layers), *h_bpd.shape), h_bpd.dtype)
        blocks = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                         length=cfg.num_layers, unroll=self.config.scan_unroll)(self.config, name="layers")
        (h_bpd, deepstack_kbpd), _ = blocks((h_bpd, deepstack_kbpd), jnp.arange(cfg.num_layers), cos_bph, sin_bph,
                                            segment_ids_bp)
        merged_bnd = PatchMerger(self.config, postshuffle=False, name="merger")(h_bpd)
        deepstack_kbnd = [PatchMerger(self.config, postshuffle=True, name=f"deepstack_merger_{k}")(deepstack_kbpd[k])
                          for k in range(len(cfg.deepstack_layers))]
        return merged_bnd, jnp.stack(deepstack_kbnd) if deepstack_kbnd else merged_bnd[:0]
