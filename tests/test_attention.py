"""The attention backends agree with the dense reference, forward and backward (design decision 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrrm_jax.models.attention import segment_attention, segment_mask
from mrrm_jax.models.segment_flash import active_blocks, segment_flash_attention


def test_mask_picture_from_the_docstring():
    segment_ids = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    is_vision = jnp.array([[0, 1, 1, 0, 0, 1, 0, 0]], bool)
    picture = ["10000000", "11100000", "11100000", "11110000", "00001000", "00001100", "00001110", "00000001"]
    want = np.array([[int(c) for c in row] for row in picture], bool)
    np.testing.assert_array_equal(segment_mask(segment_ids, is_vision)[0, 0], want)


def _packed_row(seq_len, rng):
    """Three examples and padding; the first has text between two images (one vision block)."""
    segment_ids = np.zeros(seq_len, np.int32)
    is_vision = np.zeros(seq_len, bool)
    bounds = [0, seq_len // 2, seq_len // 2 + seq_len // 8, seq_len - seq_len // 16]
    for seg, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
        segment_ids[start:stop] = seg
    is_vision[3:40] = is_vision[52:70] = True  # two images of example 1, text between them
    is_vision[bounds[2] + 2: bounds[2] + 30] = True  # a video in example 3
    return segment_ids, is_vision


@pytest.mark.parametrize("heads, kv_heads, blocks", [(4, 2, (32, 32)), (2, 2, (64, 32))])
def test_pallas_kernel_matches_xla_forward_and_backward(heads, kv_heads, blocks):
    rng = np.random.RandomState(0)
    batch, seq_len, head_dim = 2, 256, 16
    rows = [_packed_row(seq_len, rng), (np.ones(seq_len, np.int32), np.zeros(seq_len, bool))]
    segment_ids = jnp.asarray(np.stack([r[0] for r in rows]))
    is_vision = jnp.asarray(np.stack([r[1] for r in rows]))
    q = jnp.asarray(rng.randn(batch, seq_len, heads, head_dim), jnp.float32)
    k = jnp.asarray(rng.randn(batch, seq_len, kv_heads, head_dim), jnp.float32)
    v = jnp.asarray(rng.randn(batch, seq_len, kv_heads, head_dim), jnp.float32)
    d_out = jnp.asarray(rng.randn(batch, seq_len, heads, head_dim), jnp.float32)

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids, is_vision), q, k, v)
        return (out, *vjp(d_out))

    flash = lambda *args: segment_flash_attention(*args, block_q=blocks[0], block_k=blocks[1], interpret=True)
    for name, want, got in zip(["out", "dq", "dk", "dv"], run(segment_attention), run(flash)):
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


def test_block_table_skips_other_examples_and_the_future():
    segment_ids = np.repeat(np.array([1, 1, 2, 2], np.int32), 32)[None]
    active = np.asarray(active_blocks(jnp.asarray(2 * segment_ids), 32, 32)).reshape(4, 4)
    np.testing.assert_array_equal(active, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])


def test_key_bounds_of_the_module_example():
    """The module docstring's row (segments 1 1 1 1 2 2 2 0, vision at 1, 2 and 5): each query's first
    and last allowed key, read off its mask row."""
    from mrrm_jax.models.attention import key_bounds

    segment_ids = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]])
    is_vision = jnp.asarray([[0, 1, 1, 0, 0, 1, 0, 0]], bool)
    first, last = key_bounds(segment_ids, is_vision)
    np.testing.assert_array_equal(first, [[0, 0, 0, 0, 4, 4, 4, 7]])
    np.testing.assert_array_equal(last, [[0, 2, 2, 3, 4, 5, 6, 7]])


@pytest.mark.parametrize("seq_len, block", [(256, 64), (250, 64)])
def test_blockwise_xla_matches_dense_forward_and_backward(seq_len, block):
    """The tile-skipping XLA path (also a length that is not a multiple of the tile) == the dense mask."""
    from mrrm_jax.models.attention import _blockwise

    rng = np.random.RandomState(1)
    rows = [_packed_row(seq_len, rng), (np.ones(seq_len, np.int32), np.zeros(seq_len, bool))]
    segment_ids = jnp.asarray(np.stack([r[0] for r in rows]))
    is_vision = jnp.asarray(np.stack([r[1] for r in rows]))
    q = jnp.asarray(rng.randn(2, seq_len, 4, 16), jnp.float32)
    k, v = (jnp.asarray(rng.randn(2, seq_len, 2, 16), jnp.float32) for _ in range(2))
    d_out = jnp.asarray(rng.randn(2, seq_len, 4, 16), jnp.float32)

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids, is_vision), q, k, v)
        return (out, *vjp(d_out))

    blockwise = lambda *args: _blockwise(*args, block=block)
    dense, tiled = jax.jit(lambda: run(segment_attention))(), jax.jit(lambda: run(blockwise))()
    for name, want, got in zip(["out", "dq", "dk", "dv"], dense, tiled):
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


def test_pallas_bf16_key_gradients_sum_the_group_in_float32():
    """bf16, 4 query heads per KV head: dk/dv are summed over the group before the cast to bf16, so
    their error to the float32 reference stays within 1.15x that of XLA's dense attention in bf16.
    (Cast per query head and summed after, they were 1.22-1.33x over four seeds; now 1.00-1.10x.)"""
    rng = np.random.RandomState(0)
    seq_len, heads, kv_heads, head_dim = 256, 8, 2, 32
    segment_ids, is_vision = (jnp.asarray(x)[None] for x in _packed_row(seq_len, rng))
    q, d_out = (jnp.asarray(rng.randn(1, seq_len, heads, head_dim), jnp.bfloat16) for _ in range(2))
    k, v = (jnp.asarray(rng.randn(1, seq_len, kv_heads, head_dim), jnp.bfloat16) for _ in range(2))

    def key_grads(fn, dtype):
        _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, segment_ids, is_vision), *(x.astype(dtype) for x in (q, k, v)))
        return [np.asarray(g, np.float32) for g in vjp(d_out.astype(dtype))[1:]]

    want = key_grads(segment_attention, jnp.float32)
    error = lambda grads: [np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(grads, want)]
    flash = lambda *args: segment_flash_attention(*args, block_q=64, block_k=64, interpret=True)
    for name, got, xla in zip(["dk", "dv"], error(key_grads(flash, jnp.bfloat16)),
                              error(key_grads(segment_attention, jnp.bfloat16))):
        assert got <= 1.15 * xla, (name, got, xla)
