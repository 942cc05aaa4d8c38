"""Qwen3-VL: ViT -> merged vision tokens REPLACE the placeholder embeddings -> language model, with
the deepstack features added after its first layers (transformers' `Qwen3VLModel`).

The batch is a dict of fixed-shape arrays, one row per packed sequence:

    tokens            [B, T] int32     ids; `<|image_pad|>` / `<|video_pad|>` where vision goes
    positions         [B, 3, T] int32  (t, h, w) M-RoPE positions, restarting for every example
    segment_ids       [B, T] int32     1, 2, ... per example in the row; 0 for padding
    patches           [B, P, C*T*p*p]  (optional) the row's patches: its images and video frames in
                                       token order, each in merge-block order; P a multiple of 4
    patch_segment_ids [B, P] int32     one id per (media item, temporal patch) of the row; 0: padding
    patch_positions   [B, P, 2] int32  (row, col) of each patch in its frame (2-D rope, learned positions)
    patch_grid        [B, P, 2] int32  (h, w) of each patch's frame

The patch arrays come from `data/qwen3_vl_positions.vision_layout`. The k-th placeholder token of a row takes the
row's k-th merged token (4 patches), so the placeholders must be in the patches' order.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mrrm_jax.models.layers import Dense
from mrrm_jax.backbones.qwen3_vl.config import Qwen3VLConfig
from mrrm_jax.backbones.qwen3_vl.language import LanguageModel
from mrrm_jax.backbones.qwen3_vl.vision import VisionTower


class Qwen3VL(nn.Module):
    config: Qwen3VLConfig

    def setup(self):
        self.visual = VisionTower(self.config)
        self.language_model = LanguageModel(self.config)
        if self.config.with_lm_head and not self.config.text.tie_word_embeddings:
            self.lm_head = Dense(self.config.text.vocab_size, dtype=self.config.dtype,
                                 param_dtype=self.config.param_dtype)

    @staticmethod
    def init_batch(config: Qwen3VLConfig) -> dict:
        """One token and one merged token's patches: enough to create every parameter."""
        patches = config.vision.merge_unit
        return {"tokens": np.zeros((1, 1), np.int32), "positions": np.zeros((1, 3, 1), np.int32),
                "segment_ids": np.ones((1, 1), np.int32),
                "patches": np.zeros((1, patches, config.vision.patch_dim), np.float32),
                "patch_segment_ids": np.ones((1, patches), np.int32),
                "patch_positions": np.zeros((1, patches, 2), np.int32),
                "patch_grid": np.full((1, patches, 2), 2, np.int32)}

    def vision_tokens(self, batch: dict):
        """(merged tokens [B, P / 4, D], deepstack features [K, B, P / 4, D]) of the row's patches."""
        return self.visual(batch["patches"], batch["patch_segment_ids"], batch["patch_positions"],
                           batch["patch_grid"])

    def __call__(self, batch: dict, cache=None, cache_index_b=None):
        """Final-norm hidden states [B, T, D]. With a KV cache (generation): (hidden states, the cache
        updated), see models/decoder.py."""
        tokens_bt = batch["tokens"]
        embeds_btd = self.language_model.embed(tokens_bt)
        deepstack_kbtd = None
        if batch.get("patches") is not None:
            merged_bnd, deepstack_kbnd = self.vision_tokens(batch)
            is_vision_bt = (tokens_bt == self.config.image_token_id) | (tokens_bt == self.config.video_token_id)
            # The k-th placeholder of a row takes the row's k-th merged token (transformers: masked_scatter).
            index_bt = jnp.clip(jnp.cumsum(is_vision_bt, axis=1) - 1, 0, merged_bnd.shape[1] - 1)
            rows_b1 = jnp.arange(tokens_bt.shape[0])[:, None]
            vision_b1 = is_vision_bt[..., None]
            embeds_btd = jnp.where(vision_b1, merged_bnd[rows_b1, index_bt].astype(embeds_btd.dtype), embeds_btd)
            deepstack_kbtd = jnp.where(vision_b1[None], deepstack_kbnd[:, rows_b1, index_bt], 0)
        out = self.language_model(embeds_btd, batch["positions"], batch["segment_ids"], deepstack_kbtd, cache,
                                  cache_index_b)
        if self.is_initializing() and self.config.with_lm_head:
            self.logits(out)  # creates the lm_head parameters
        return out

    def logits(self, hidden_btd):
        """LM logits [B, T, vocab]: for parity tests and generation, never on the reward path. Tied to
        the embedding when `tie_word_embeddings` (Qwen3-VL-4B: `lm_head.weight` is not even saved)."""
        if self.config.text.tie_word_embeddings:
            return hidden_btd @ self.language_model.embed_tokens.embedding.astype(hidden_btd.dtype).T
        return self.lm_head(hidden_btd)
