"""Compilation: one program per shape bucket, and a program size that does not grow with depth."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from mrrm_jax.backbones.molmo2 import AdapterConfig, Molmo2, Molmo2Config, TextConfig, VisionConfig


def _config(text_layers: int, vision_layers: int = 3) -> Molmo2Config:
    return Molmo2Config(
        vision=VisionConfig(hidden_size=32, intermediate_size=48, num_layers=vision_layers, num_heads=2, head_dim=16,
                            image_size=(56, 56)),
        adapter=AdapterConfig(feature_layers=(vision_layers - 1, 0), hidden_size=32, num_heads=2, num_kv_heads=2,
                              head_dim=16, intermediate_size=40),
        text=TextConfig(hidden_size=64, num_layers=text_layers, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=80, vocab_size=1000, additional_vocab_size=0),
        image_patch_id=900, vision_token_ids=(900, 901), with_lm_head=False)


def _batch(rows: int, length: int, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(0, 800, (rows, length)).astype(np.int32)
    tokens[:, 2:6] = 900  # four image-patch tokens per row
    return {"tokens": tokens, "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, length), np.int32),
            "crops": rng.randn(rows, 1, 16, 588).astype(np.float32),
            "pooling": rng.randint(-1, 16, (rows, 4, 4)).astype(np.int32)}


def test_one_compile_per_shape_bucket():
    model = Molmo2(_config(2))
    params = jax.jit(model.init)(jax.random.key(0), _batch(2, 16))
    forward = jax.jit(model.apply)
    for seed in range(3):  # new values, same shapes: no new program
        forward(params, _batch(2, 16, seed)).block_until_ready()
    assert forward._cache_size() == 1
    forward(params, _batch(2, 32)).block_until_ready()  # a new bucket: exactly one more
    assert forward._cache_size() == 2


def _program_ops(num_layers: int) -> int:
    model = Molmo2(_config(num_layers, vision_layers=num_layers))
    batch = jax.tree.map(jnp.asarray, _batch(1, 16))
    abstract = jax.eval_shape(model.init, jax.random.key(0), batch)
    hlo = jax.jit(model.apply).lower(abstract, batch).as_text()
    return len(re.findall(r"= \S+ stablehlo\.|stablehlo\.\w+", hlo))


def test_program_size_does_not_grow_with_depth():
    # The layers run under `scan`: 2 and 16 layers lower to the same number of operations (the
    # compile-time cost), where an unrolled stack would grow eightfold.
    assert _program_ops(2) == _program_ops(16)
