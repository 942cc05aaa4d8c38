"""Conversion and loading: config parsing against transformers, errors, sharded restore."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from transformers import Molmo2Config as HFMolmo2Config

from mrrm_jax.backbones import checkpoint
from mrrm_jax.interop import convert
from mrrm_jax.backbones.molmo2 import Molmo2Config
from tests import oracle


def _legacy_config(native: dict) -> dict:
    """The native config.json rewritten with the original release's keys (as Molmo2Config accepts)."""
    legacy = json.loads(json.dumps(native))
    vision = legacy.pop("vision_config")
    vision["image_default_input_size"] = vision.pop("image_size")
    vision["image_patch_size"] = vision.pop("patch_size")
    vision["image_num_pos"] = vision.pop("num_position_embeddings")
    legacy["vit_config"] = vision
    legacy["adapter_config"]["vit_layers"] = legacy["adapter_config"].pop("vision_feature_layer")
    text = legacy["text_config"]
    text["qkv_bias"] = text.pop("attention_bias")
    text["layer_norm_eps"] = text.pop("rms_norm_eps")
    return legacy


@pytest.mark.parametrize("layout", ["native", "legacy"])
def test_config_parsing_matches_transformers(layout):
    native = oracle.tiny_hf_config().to_dict()
    raw = native if layout == "native" else _legacy_config(native)
    ours, theirs = Molmo2Config.from_hf_dict(raw), HFMolmo2Config.from_dict(raw)
    v, a, t = theirs.vision_config, theirs.adapter_config, theirs.text_config
    feature_layers = tuple(i % v.num_hidden_layers for i in a.vision_feature_layer)
    assert ours.adapter.feature_layers == feature_layers
    assert ours.vision.num_layers == max(feature_layers) + 1 <= v.num_hidden_layers
    assert (ours.vision.hidden_size, ours.vision.patch_size, ours.vision.num_patches) == (
        v.hidden_size, v.patch_size, v.num_position_embeddings)
    assert (ours.text.hidden_size, ours.text.num_layers, ours.text.num_heads, ours.text.num_kv_heads,
            ours.text.head_dim, ours.text.attention_bias, ours.text.rms_norm_eps, ours.text.qk_norm_type) == (
        t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
        t.attention_bias, t.rms_norm_eps, t.qk_norm_type)
    assert dict(ours.text.rope) == dict(t.rope_parameters)
    assert ours.text.scaled_rope_layers == tuple(i in t.rope_scaling_layers for i in range(t.num_hidden_layers))
    assert ours.image_patch_id == theirs.image_patch_id
    assert Molmo2Config.from_json(ours.to_json()) == ours


def test_presets_match_the_released_4b_dimensions():
    cfg = Molmo2Config.molmo2_4b()
    assert (cfg.text.hidden_size, cfg.text.num_layers, cfg.text.num_heads, cfg.text.num_kv_heads,
            cfg.text.head_dim, cfg.text.intermediate_size, cfg.text.embedding_rows) == (2560, 36, 32, 8, 128, 9728, 152064)
    assert (cfg.vision.num_layers, cfg.vision.num_patches, cfg.adapter.feature_layers) == (25, 729, (24, 18))


def test_other_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="model_type='llava'"):
        Molmo2Config.from_hf_dict({"model_type": "llava"})


def _copy_with(tiny, tmp_path, edit):
    """The native tiny checkpoint with its tensors edited by `edit(dict)`."""
    out = tmp_path / "edited"
    shutil.copytree(tiny.native_dir, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def test_unknown_tensor_is_named(tiny_models, tmp_path):
    hf_dir = _copy_with(tiny_models, tmp_path, lambda t: t.update({"model.extra_head.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ValueError, match="model.extra_head.weight"):
        convert.convert_dir(hf_dir, tmp_path / "out")


def test_missing_tensor_is_named(tiny_models, tmp_path):
    hf_dir = _copy_with(tiny_models, tmp_path, lambda t: t.pop("model.language_model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="language_model/layers/1/mlp/up_proj/kernel"):
        convert.convert_dir(hf_dir, tmp_path / "out")
    assert not (tmp_path / "out" / "params").exists()  # nothing written


def test_wrong_shape_is_named(tiny_models, tmp_path):
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    hf_dir = _copy_with(tiny_models, tmp_path, lambda t: t.update({key: t[key][:-1]}))
    with pytest.raises(ValueError, match="language_model/layers/0/self_attn/q_proj/kernel"):
        convert.convert_dir(hf_dir, tmp_path / "out")


def test_converted_leaves_equal_the_torch_weights(tiny_models):
    _, params = checkpoint.load_base(tiny_models.converted_original)
    state = {k: v.numpy() for k, v in tiny_models.torch_model.state_dict().items()}
    lm = params["language_model"]
    np.testing.assert_array_equal(lm["layers"]["self_attn"]["k_proj"]["kernel"][2],
                                  state["model.language_model.layers.2.self_attn.k_proj.weight"].T)
    np.testing.assert_array_equal(lm["layers"]["mlp"]["gate_proj"]["kernel"][1],
                                  state["model.language_model.layers.1.mlp.gate_proj.weight"].T)
    np.testing.assert_array_equal(lm["embed_tokens"]["embedding"], state["model.language_model.embed_tokens.weight"])


def test_load_straight_into_a_sharding(tiny_models):
    script = textwrap.dedent(f"""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from mrrm_jax.backbones import checkpoint
        from mrrm_jax.interop import convert
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("fsdp", "tensor"))
        _, plain = checkpoint.load_base({str(tiny_models.converted_native)!r})
        def spec(x):  # layers over nothing, last axis over 'tensor' when it divides
            axes = [None] * x.ndim
            if x.ndim >= 2 and x.shape[-1] % 2 == 0:
                axes[-1] = "tensor"
            if x.ndim >= 2 and x.shape[-2] % 2 == 0:
                axes[-2] = "fsdp"
            return NamedSharding(mesh, P(*axes))
        shardings = jax.tree.map(spec, plain)
        _, sharded = checkpoint.load_base({str(tiny_models.converted_native)!r}, shardings=shardings)
        for a, b, s in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
            assert b.sharding == s, (b.sharding, s)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        print("OK", len(jax.tree.leaves(sharded)))
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
