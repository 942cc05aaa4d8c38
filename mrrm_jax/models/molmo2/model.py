"""Molmo2: ViT -> adapter -> image features ADDED at the `<im_patch>` embeddings -> language model.

The batch is a dict of fixed-shape arrays, one row per packed sequence:

    tokens       [B, T] int32   token ids (padding: any id, segment 0)
    positions    [B, T] int32   rope positions, restarting at 0 for every example
    segment_ids  [B, T] int32   1, 2, ... per example in the row; 0 for padding
    crops        [B, C, P, 588] float  (optional) the row's image crops / video frames, patchified
    pooling      [B, K, S] int32       (optional) for the row's k-th `<im_patch>` token, the indices of
                                       the S patches it pools, into the row's flattened C * P patches;
                                       -1 = empty slot; rows past the last patch token are all -1

Rows, crops and pooled tokens are padded to static sizes, so one compiled program serves every
batch of a shape bucket.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mrrm_jax.models.layers import Dense
from mrrm_jax.models.molmo2.adapter import Adapter
from mrrm_jax.models.molmo2.config import Molmo2Config
from mrrm_jax.models.molmo2.language import LanguageModel
from mrrm_jax.models.molmo2.vision import VisionTower


class Molmo2(nn.Module):
    config: Molmo2Config

    def setup(self):
        self.vision_tower = VisionTower(self.config)
        self.multi_modal_projector = Adapter(self.config)
        self.language_model = LanguageModel(self.config)
        # transformers' Molmo2 declares no `_tied_weights_keys`: even with `tie_word_embeddings` its
        # lm_head is an independent matrix, saved and used (and the embedding has more rows).
        if self.config.with_lm_head:
            self.lm_head = Dense(self.config.text.vocab_size, dtype=self.config.dtype,
                                 param_dtype=self.config.param_dtype)

    def vision_features(self, crops_npx):
        """ViT feature-layer outputs [N, P, F * vision hidden] of N crops."""
        return self.vision_tower(crops_npx)

    def image_tokens(self, crops_bcpx, pooling_bks, features_bpd=None):
        """[B, K, D]: one LM-width feature per pooled image token. `features_bpd` [B, C * P, F * vision
        hidden]: the crops' ViT features when computed already (the ViT is not run again)."""
        if features_bpd is None:
            batch, crops, patches, patch_dim = crops_bcpx.shape
            features_bpd = self.vision_features(crops_bcpx.reshape(batch * crops, patches, patch_dim)).reshape(
                batch, crops * patches, -1)
        return self.multi_modal_projector(features_bpd, pooling_bks)

    def __call__(self, batch: dict, vision_features_bpd=None):
        """Final-norm hidden states [B, T, D]. `vision_features_bpd`: see `image_tokens`."""
        tokens_bt = batch["tokens"]
        embeds_btd = self.language_model.embed(tokens_bt)
        if batch.get("crops") is not None:
            image_bkd = self.image_tokens(batch["crops"], batch["pooling"], vision_features_bpd)
            is_patch_bt = tokens_bt == self.config.image_patch_id
            # The k-th `<im_patch>` of a row takes the row's k-th pooled feature.
            feature_index_bt = jnp.clip(jnp.cumsum(is_patch_bt, axis=1) - 1, 0, image_bkd.shape[1] - 1)
            features_btd = jnp.take_along_axis(image_bkd, feature_index_bt[..., None], axis=1)
            embeds_btd = embeds_btd + jnp.where(is_patch_bt[..., None], features_btd, 0).astype(embeds_btd.dtype)
        is_vision_bt = jnp.isin(tokens_bt, jnp.asarray(self.config.vision_token_ids))
        hidden_btd = self.language_model(embeds_btd, batch["positions"], batch["segment_ids"], is_vision_bt)
        if self.is_initializing() and self.config.with_lm_head:
            self.logits(hidden_btd)  # creates the lm_head parameters
        return hidden_btd

    def logits(self, hidden_btd):
        """LM logits [B, T, vocab]; for parity tests and generation, never on the reward path."""
        return self.lm_head(hidden_btd)
