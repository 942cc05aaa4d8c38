"""Parity of the Flax Qwen3-VL with transformers' PyTorch Qwen3-VL (the oracle), float32 on CPU:
stage by stage, then the final-norm hidden states (and tied logits) of whole examples."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3VLConfig as HFQwen3VLConfig
from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_interpolation_indices_and_weights,
                                       get_vision_position_ids)

from mrrm_jax.backbones import checkpoint
from mrrm_jax.models import rope
from mrrm_jax.models.decoder import DecoderLayer
from mrrm_jax.models.layers import Dense
from mrrm_jax.backbones.qwen3_vl.positions import vision_layout
from mrrm_jax.backbones.qwen3_vl import Qwen3VL, Qwen3VLConfig
from mrrm_jax.backbones.qwen3_vl.vision import position_corners
from mrrm_jax.backbones.qwen3_vl.vision import PatchMerger, VisionBlock
from tests import qwen3_vl_oracle as qo

TOLERANCE = 1e-4  # max abs error (measured: stages ~1e-6, whole model ~3e-6)
GRIDS = [(1, 4, 6), (2, 6, 4), (1, 16, 14)]  # an image, a 2-frame video, an image past the 12 x 12 table


@pytest.fixture(scope="module")
def tiny(tiny_qwen):
    cfg, params = checkpoint.load_base(tiny_qwen.converted)
    return tiny_qwen, cfg, params


def _close(name, ours, theirs):
    err = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    print(f"{name}: max abs error {err:.2e}")
    assert err <= TOLERANCE, (name, err)


def _layer(params, index):
    return jax.tree.map(lambda x: x[index], params)


def test_config_parsing():
    assert Qwen3VLConfig.from_hf_dict(qo.QWEN3_VL_4B_CONFIG) == Qwen3VLConfig.qwen3_vl_4b()
    tiny_raw = qo.tiny_hf_dict()
    ours, theirs = Qwen3VLConfig.from_hf_dict(tiny_raw), HFQwen3VLConfig.from_dict(tiny_raw)
    v, t = theirs.vision_config, theirs.text_config
    assert (ours.vision.num_layers, ours.vision.hidden_size, ours.vision.num_heads, ours.vision.deepstack_layers,
            ours.vision.num_position_embeddings, ours.vision.rope_theta) == (
        v.depth, v.hidden_size, v.num_heads, tuple(v.deepstack_visual_indexes), v.num_position_embeddings,
        v.rope_parameters["rope_theta"])
    assert (ours.text.num_layers, ours.text.num_kv_heads, ours.text.head_dim, ours.text.rope_theta,
            ours.text.mrope_section, ours.text.tie_word_embeddings) == (
        t.num_hidden_layers, t.num_key_value_heads, t.head_dim, t.rope_parameters["rope_theta"],
        tuple(t.rope_parameters["mrope_section"]), theirs.tie_word_embeddings)
    assert '"model_type": "qwen3_vl"' in ours.to_json()
    assert Qwen3VLConfig.from_json(ours.to_json()) == ours


def test_converted_checkpoint_is_tied(tiny):
    tiny, cfg, params = tiny
    assert cfg.text.tie_word_embeddings and not cfg.with_lm_head and "lm_head" not in params
    assert tiny.torch_model.lm_head.weight is tiny.torch_model.model.language_model.embed_tokens.weight


# -- stages ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vision_inputs(tiny):
    """Patches of GRIDS, transformers' per-patch tensors and ours."""
    tiny, cfg, _ = tiny
    grid_thw = torch.tensor(GRIDS)
    patches = np.random.RandomState(1).randn(sum(t * h * w for t, h, w in GRIDS), 1536).astype(np.float32)
    return grid_thw, patches, vision_layout(GRIDS)


def test_patch_embed(tiny, vision_inputs):
    tiny, cfg, params = tiny
    _, patches, _ = vision_inputs
    with torch.no_grad():
        theirs = tiny.torch_model.model.visual.patch_embed(torch.tensor(patches)).numpy()
    ours = Dense(cfg.vision.hidden_size, use_bias=True).apply({"params": params["visual"]["patch_embed"]}, patches)
    _close("patch embed", ours, theirs)


def test_position_embedding_interpolation(tiny, vision_inputs):
    tiny, cfg, params = tiny
    grid_thw, _, layout = vision_inputs
    index, weight = get_vision_interpolation_indices_and_weights(grid_thw, cfg.vision.grid_side, align_corners=True,
                                                                 spatial_merge_size=2)
    our_index, our_weight = (np.asarray(a)[0] for a in position_corners(
        layout["patch_positions"][None], layout["patch_grid"][None], cfg.vision.grid_side))
    np.testing.assert_array_equal(our_index, index.numpy())
    np.testing.assert_array_equal(our_weight, weight.numpy())  # the same float32 arithmetic
    table = params["visual"]["pos_embed"]
    ours = (table[our_index] * our_weight[..., None]).sum(1)
    # Independent oracle: torch's bilinear resize (align_corners) of the learned grid, per image, in
    # merge-block order, repeated over t.
    side, dim = cfg.vision.grid_side, cfg.vision.hidden_size
    grid = torch.tensor(np.asarray(table)).reshape(1, side, side, dim).permute(0, 3, 1, 2)
    theirs = []
    for t, h, w in GRIDS:
        resized = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
        blocks = resized.reshape(h // 2, 2, w // 2, 2, dim).permute(0, 2, 1, 3, 4).reshape(-1, dim)
        theirs.append(blocks.repeat(t, 1))
    _close("position embedding", ours, torch.cat(theirs).numpy())


def test_vision_rotary(tiny, vision_inputs):
    tiny, cfg, _ = tiny
    grid_thw, patches, layout = vision_inputs
    visual = tiny.torch_model.model.visual
    position_ids = get_vision_position_ids(grid_thw, cfg.vision.spatial_merge_size)
    np.testing.assert_array_equal(layout["patch_positions"], position_ids.numpy())
    with torch.no_grad():
        cos, sin = visual.rotary_pos_emb(torch.tensor(patches), position_ids)
    our_cos, our_sin = _vision_rotary(cfg, layout)
    _close("vision rotary cos", our_cos[0], cos.numpy())
    _close("vision rotary sin", our_sin[0], sin.numpy())


def _vision_rotary(cfg, layout):
    inv_freq, _ = rope.inverse_frequencies({"rope_theta": cfg.vision.rope_theta}, cfg.vision.head_dim // 2, 0, False)
    return rope.axial_tables(layout["patch_positions"][None], inv_freq, jnp.float32)


def test_one_vision_block(tiny, vision_inputs):
    tiny, cfg, params = tiny
    grid_thw, _, layout = vision_inputs
    visual = tiny.torch_model.model.visual
    hidden = np.random.RandomState(2).randn(len(layout["patch_segment_ids"]), cfg.vision.hidden_size).astype(np.float32)
    with torch.no_grad():
        embeddings = visual.rotary_pos_emb(torch.tensor(hidden), get_vision_position_ids(grid_thw, 2))
        theirs = visual.blocks[1](torch.tensor(hidden), cu_seqlens=get_vision_cu_seqlens(grid_thw),
                                  position_embeddings=embeddings).numpy()
    cos, sin = _vision_rotary(cfg, layout)
    deepstack = jnp.zeros((2, 1, *hidden.shape))
    (ours, _), _ = VisionBlock(cfg).apply({"params": _layer(params["visual"]["layers"], 1)}, (hidden[None], deepstack),
                                          1, cos, sin, layout["patch_segment_ids"][None])
    _close("vision block", ours[0], theirs)


@pytest.mark.parametrize("merger", ["merger", "deepstack_merger_0", "deepstack_merger_1"])
def test_mergers(tiny, merger):
    tiny, cfg, params = tiny
    visual = tiny.torch_model.model.visual
    module = visual.merger if merger == "merger" else visual.deepstack_merger_list[int(merger[-1])]
    hidden = 3 + np.random.RandomState(3).randn(40, cfg.vision.hidden_size).astype(np.float32)  # a large mean
    with torch.no_grad():
        theirs = module(torch.tensor(hidden)).numpy()
    ours = PatchMerger(cfg, postshuffle=merger != "merger").apply({"params": params["visual"][merger]}, hidden[None])
    _close(merger, ours[0], theirs)


@pytest.fixture(scope="module")
def mixed_example():
    return qo.build_example(np.random.RandomState(4), [5, ("image", (1, 4, 6)), 4, ("video", (2, 4, 4)), 6])


def test_mrope_tables(tiny, mixed_example):
    tiny, cfg, _ = tiny
    positions = qo.hf_positions(tiny.torch_model, mixed_example)[None].repeat(2, 0)  # [B, 3, T]
    positions[1] += 1000  # far positions too
    with torch.no_grad():
        cos, sin = tiny.torch_model.model.language_model.rotary_emb(torch.zeros(1), torch.tensor(positions).transpose(0, 1))
    inv_freq, scaling = rope.inverse_frequencies({"rope_theta": cfg.text.rope_theta}, cfg.text.head_dim, 0, False)
    our_cos, our_sin = rope.mrope_tables(positions, inv_freq, cfg.text.mrope_section, scaling, jnp.float32)
    _close("M-RoPE cos", our_cos, cos.numpy())
    _close("M-RoPE sin", our_sin, sin.numpy())


def test_one_decoder_layer(tiny, mixed_example):
    tiny, cfg, params = tiny
    positions = qo.hf_positions(tiny.torch_model, mixed_example)[None]
    length = positions.shape[-1]
    hidden = np.random.RandomState(5).randn(1, length, cfg.text.hidden_size).astype(np.float32)
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
    language_model = tiny.torch_model.model.language_model
    with torch.no_grad():
        cos, sin = language_model.rotary_emb(torch.tensor(hidden), torch.tensor(positions).transpose(0, 1))
        theirs = language_model.layers[0](torch.tensor(hidden), position_embeddings=(cos, sin),
                                          attention_mask=causal).numpy()
    inv_freq, scaling = rope.inverse_frequencies({"rope_theta": cfg.text.rope_theta}, cfg.text.head_dim, 0, False)
    our_cos, our_sin = rope.mrope_tables(positions, inv_freq, cfg.text.mrope_section, scaling, jnp.float32)
    ours, _ = DecoderLayer(cfg).apply({"params": _layer(params["language_model"]["layers"], 0)}, hidden,
                                      (0, -1, None), our_cos[None], our_sin[None], np.ones((1, length), np.int32),
                                      np.zeros((1, length), bool), None, None)
    _close("decoder layer", ours, theirs)


# -- whole examples -------------------------------------------------------------------------------

def _ours(cfg, params, batch):
    model = Qwen3VL(cfg)
    if batch["patch_segment_ids"].max() == 0:  # text only
        batch = {k: batch[k] for k in ("tokens", "positions", "segment_ids")}
    hidden = jax.jit(model.apply)({"params": params}, batch)
    logits = jax.jit(lambda p, h: model.apply({"params": p}, h, method=Qwen3VL.logits))(params, hidden)
    return np.asarray(hidden), np.asarray(logits)


CASES = {
    "text_only": [[30]],
    "one_image": [[5, ("image", (1, 4, 6)), 9]],
    "two_images_of_different_sizes": [[3, ("image", (1, 6, 8)), 4, ("image", (1, 4, 2)), 5]],
    "video": [[4, ("video", (3, 4, 4)), 6]],
    "image_and_video": [[3, ("image", (1, 4, 4)), 2, ("video", (2, 6, 4)), 5]],
    "padded_batch_of_two": [[4, ("image", (1, 4, 4)), 3], [6, ("video", (2, 4, 6)), 2, ("image", (1, 2, 2)), 20]],
}


@pytest.mark.parametrize("case", CASES)
def test_final_hidden_states(tiny, case):
    tiny, cfg, params = tiny
    rng = np.random.RandomState(len(case))
    examples = [qo.build_example(rng, parts) for parts in CASES[case]]
    inputs = qo.hf_inputs(examples)
    with torch.no_grad():
        out = tiny.torch_model(**inputs, output_hidden_states=True)
    hidden, logits = _ours(cfg, params, qo.our_batch(tiny.torch_model, [[e] for e in examples]))
    real = inputs["attention_mask"].numpy().astype(bool)  # padding positions are unspecified
    _close(f"{case} hidden", hidden[real], out.hidden_states[-1].numpy()[real])
    _close(f"{case} logits", logits[real], out.logits.numpy()[real])


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_packed_row_equals_each_example_alone(tiny, backend):
    """An image example, a text example and a video example in one row (packed by data/packing.py):
    each part equals transformers on that example alone (no cross-contamination in the ViT or the LM),
    with the dense and the Pallas (interpret) kernels."""
    tiny, cfg, params = tiny
    rng = np.random.RandomState(7)
    examples = [qo.build_example(rng, [4, ("image", (1, 4, 6)), 7]), qo.build_example(rng, [12]),
                qo.build_example(rng, [3, ("video", (2, 4, 4)), 9])]
    batch = qo.our_batch(tiny.torch_model, [examples], seq_len=128)
    hidden, _ = _ours(cfg.replace(attention=backend), params, batch)
    start = 0
    for example in examples:
        with torch.no_grad():
            theirs = tiny.torch_model.model(**qo.hf_inputs([example])).last_hidden_state[0].numpy()
        _close(f"packed ({backend})", hidden[0, start:start + len(example.tokens)], theirs)
        start += len(example.tokens)


def test_conversion_errors_name_the_tensors(tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    from mrrm_jax.interop import convert

    tiny, _, _ = tiny
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny.hf_dir / "config.json").read_text())
    tensors = load_file(tiny.hf_dir / "model.safetensors")
    del tensors["model.visual.deepstack_merger_list.1.norm.weight"]
    tensors["model.visual.extra.weight"] = np.zeros(1, np.float32)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.visual\.extra\.weight"):
        convert.convert_dir(broken, tmp_path / "out")
    del tensors["model.visual.extra.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \['visual/deepstack_merger_1/norm/scale'\]"):
        convert.convert_dir(broken, tmp_path / "out2")
