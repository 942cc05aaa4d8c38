"""Molmo2: ViT -> adapter -> image features ADDED at the `<im_patch>` embeddings -> language model.

The batch is a dict of fixed-shape arrays, one row per packed sequence:

    tokens       [B, T] int32   token ids (padding: any id, segment 0)
    positions    [B, T] int32   rope positions, restarting at 0 for every example
    segment_ids  [B, T] int32   1, 2, ... per example in the row; 0 for padding
    crops        [B, C, P, 588] uint8  (optional) the row's image crops / video frames, patchified pixels
                                       (the ViT normalises them; float crops: normalised already)
    pooling      [B, K, S] int32       (optional) for the row's k-th `<im_patch>` token, the indices of
                                       the S patches it pools, into the row's flattened C * P patches;
                                       -1 = empty slot; rows past the last patch token are all -1

Rows, crops and pooled tokens are padded to static sizes, so one compiled program serves every
batch of a shape bucket.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrrm_jax.models.layers import Dense
from mrrm_jax.backbones.molmo2.adapter import Adapter
from mrrm_jax.backbones.molmo2.config import Molmo2Config
from mrrm_jax.backbones.molmo2.language import LanguageModel
from mrrm_jax.backbones.molmo2.vision import VisionTower


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

    @staticmethod
    def init_batch(config: Molmo2Config) -> dict:
        """One token and one crop: enough to create every parameter."""
        return {"tokens": np.zeros((1, 1), np.int32), "positions": np.zeros((1, 1), np.int32),
                "segment_ids": np.ones((1, 1), np.int32),
                "crops": np.zeros((1, 1, config.vision.num_patches, config.vision.patch_dim), np.uint8),
                "pooling": np.zeros((1, 1, 4), np.int32)}

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

    def __call__(self, batch: dict, vision_features_bpd=None, cache=None, cache_index_b=None):
        """Final-norm hidden states [B, T, D]. `vision_features_bpd`: see `image_tokens`. With a KV cache
        (generation): (hidden states, the cache updated), see models/decoder.py."""
        tokens_bt = batch["tokens"]
        embeds_btd = self.language_model.embed(tokens_bt)
        if batch.get("pooling") is not None:  # scoring's loop passes the features without the crops
            image_bkd = self.image_tokens(batch.get("crops"), batch["pooling"], vision_features_bpd)
            is_patch_bt = tokens_bt == self.config.image_patch_id
            # The k-th `<im_patch>` of a row takes the row's k-th pooled feature.
            feature_index_bt = jnp.clip(jnp.cumsum(is_patch_bt, axis=1) - 1, 0, image_bkd.shape[1] - 1)
            features_btd = jnp.take_along_axis(image_bkd, feature_index_bt[..., None], axis=1)
            embeds_btd = embeds_btd + jnp.where(is_patch_bt[..., None], features_btd, 0).astype(embeds_btd.dtype)
        is_vision_bt = jnp.isin(tokens_bt, jnp.asarray(self.config.vision_token_ids))
        out = self.language_model(embeds_btd, batch["positions"], batch["segment_ids"], is_vision_bt, cache,
                                  cache_index_b)
        if self.is_initializing() and self.config.with_lm_head:
            self.logits(out)  # creates the lm_head parameters
        return out

    def logits(self, hidden_btd):
        """LM logits [B, T, vocab]; for parity tests and generation, never on the reward path."""
        return self.lm_head(hidden_btd)


# On CPU a ViT pass holds at most this many bytes of attention scores, a proxy for the pass's whole
# working set (chunking the attention alone, at 16 crops a pass, gained nothing: the MLP's and norms'
# buffers shrink with the pass too). Measured on 2 cores with the scoring command's malloc settings,
# the small ViT of bench/score_e2e.py (2 heads x 729 patches, 4.3 MB of scores a crop) over its 730
# read crops: 20.3-20.7 s in passes of 16 crops, 16.0-17.9 s in passes of 4 and of 2.
CPU_PASS_SCORES_BYTES = 16 << 20


def vision_pass_crops(config, vision_crops: int | None) -> int:
    """Crops per ViT pass: `vision_crops`, or by default 16 on an accelerator and on CPU as many as keep
    a pass's attention scores within `CPU_PASS_SCORES_BYTES` (at least one)."""
    if vision_crops is not None:
        return vision_crops
    if jax.default_backend() != "cpu":
        return 16
    scores_per_crop = config.vision.num_heads * config.vision.num_patches ** 2 * 4
    return max(1, CPU_PASS_SCORES_BYTES // scores_per_crop)


def hidden_states(model: Molmo2, params: dict, batch: dict, vision_crops: int | None, groups: int = 1) -> jax.Array:
    """`model.apply(params, batch)` as scoring runs it: the ViT over the read crops only
    (`_read_crop_features`, `vision_pass_crops(vision_crops)` at a time), then the language model one
    row of each of `groups` groups of rows (one group per device) at a time: its dense attention's
    [T, T] buffers are then one row's (4x less memory at the default 4 rows), and no row moves between
    devices."""
    vision_crops = vision_pass_crops(model.config, vision_crops)
    rows = batch["tokens"].shape[0]
    by_step = lambda x: x.reshape(groups, rows // groups, *x.shape[1:]).swapaxes(0, 1)
    # The crops stay out of the loop: the ViT has run on them before it.
    step_batches = {name: by_step(x) for name, x in batch.items() if name != "crops"}
    if "crops" in batch:
        features_spd = _read_crop_features(model, params, batch, vision_crops, groups)
        # Indexed in the loop rather than mapped over: XLA:CPU copied a mapped [S, G, C * P, width] whole.
        width = features_spd.shape[-1]
        step = lambda s, b: model.apply({"params": params}, b, features_spd[s].reshape(groups, -1, width))
    else:
        step = lambda s, b: model.apply({"params": params}, b)
    hidden_sgtd = jax.lax.map(lambda args: step(*args), (jnp.arange(rows // groups), step_batches))
    return hidden_sgtd.swapaxes(0, 1).reshape(rows, *hidden_sgtd.shape[2:])


def _read_crop_features(model: Molmo2, params: dict, batch: dict, vision_crops: int, groups: int) -> jax.Array:
    """ViT features [B / groups, groups * C * P, width] of the batch's crop slots, in `hidden_states`'s
    step order (step s holds rows s, B / groups + s, ...), computed only for the crops that pooled
    tokens read, `vision_crops` at a time (its memory is bounded by one pass). Packed rows fill their
    crop slots unevenly, so the read crops of each group of rows (no crop moves between devices) are
    gathered to the front, and the passes past the last are skipped; unread slots hold zeros or garbage."""
    crops_bcpx, pooling_bks = batch["crops"], batch["pooling"]
    rows, crops, patches, patch_dim = crops_bcpx.shape
    slots = rows // groups * crops  # crop slots of a group
    per_pass = max(1, min(slots, vision_crops // groups))  # crops of a group in one pass
    passes = -(-slots // per_pass)
    # The crop slot of every pooled patch; a -1 (empty) index goes to a slot past the end, then dropped.
    slot_bks = jnp.where(pooling_bks >= 0, pooling_bks // patches, crops)
    read_bc = jnp.zeros((rows, crops + 1), bool).at[jnp.arange(rows)[:, None, None], slot_bks].set(True)[:, :-1]
    read_gn = read_bc.reshape(groups, slots)
    order_gn = jnp.argsort(~read_gn, axis=1, stable=True)  # read slots first
    # The last pass may reach past the slots: its extra entries name slot `slots`, which the gather
    # clips to the last slot and the scatter drops.
    padded_order_gn = jnp.pad(order_gn, [(0, 0), (0, passes * per_pass - slots)], constant_values=slots)
    last_read = read_gn.sum(1).max()
    crops_gnpx = crops_bcpx.reshape(groups, slots, patches, patch_dim)
    vit = lambda c_gkpx: model.apply({"params": params}, c_gkpx.reshape(-1, patches, patch_dim),
                                     method=Molmo2.vision_features).reshape(groups, per_pass, patches, -1)

    def run(index_gk):
        return vit(jnp.take_along_axis(crops_gnpx, index_gk[:, :, None, None], axis=1, mode="clip"))

    width = jax.eval_shape(run, padded_order_gn[:, :per_pass]).shape[-1]
    group_g1, steps = jnp.arange(groups)[:, None], rows // groups

    def one_pass(features_sgcpd, first):
        # Each pass's features go straight to their slots, in step order: one buffer of the batch's
        # features, not the passes' outputs and then reordered copies. Slot n of a group is crop
        # n % C of its row n // C.
        index_gk = jax.lax.dynamic_slice_in_dim(padded_order_gn, first, per_pass, axis=1)
        put = lambda: features_sgcpd.at[index_gk // crops, group_g1, index_gk % crops].set(run(index_gk), mode="drop")
        return jax.lax.cond(first < last_read, put, lambda: features_sgcpd), None

    features_sgcpd = jnp.zeros((steps, groups, crops, patches, width), model.config.dtype)
    features_sgcpd, _ = jax.lax.scan(one_pass, features_sgcpd, jnp.arange(passes) * per_pass)
    return features_sgcpd.reshape(steps, groups * crops * patches, width)
