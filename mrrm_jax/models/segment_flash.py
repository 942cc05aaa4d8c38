"""A Pallas TPU flash-attention kernel for the segment-aware multimodal mask.

Splash attention takes its mask as static numpy, but our mask depends on the data: which tokens of
a row are image/frame tokens, and where its examples start and end. Here every block builds its
mask from two small per-token arrays,

    code[t] = 2 * segment_id[t] + is_vision[t]
    allowed(q, k) = segment(q) == segment(k) AND (k <= q OR (vision(q) AND vision(k)))

and a per-row table of active blocks, computed from per-block segment ranges and vision flags,
lets the kernel skip blocks that are certainly empty (other examples, or the future with no
vision token on both sides). Text between two images of one example is handled exactly, since
nothing is inferred from positions.

Layouts: q [B, H, T, D], k/v [B, KV, T, D] (GQA: query head h reads KV head h // (H / KV)).
The dk/dv kernel runs per KV head and reduces over the query blocks of all the group's query heads
in float32 VMEM, so dk/dv are written once, [B, KV, T, D], cast to the input dtype at the end.

The softmax statistics kept for the backward (logsumexp, and delta = rowsum(dO * O)) are stored as
rows, [B, H, 1, T] float32, blocks [1, block_q]: XLA tiles that (1, 128) on TPU, so no padding. The
backward computes its blocks transposed (keys on rows, [block_k, block_q]) so that these rows
broadcast as they are loaded; the forward writes its row by transposing the column once per query
block. Only the forward's running max and sum stay lane-replicated ([block_q, 128] VMEM scratch, as
in splash): a [block_q, 1] column would take the same padded VMEM tiles. On TPU, block_q and block_k
must be multiples of 128 (or the whole sequence), since the codes and statistics are [1, block] rows.
On CPU the kernels run in Pallas' interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mrrm_jax.models.attention import active_blocks

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp() of masked entries is exactly 0
LANES = 128


def _allowed(code_q, code_k, q_index, k_index):
    """Bool block mask from codes and token indices that broadcast to the block (either orientation)."""
    same_segment = jax.lax.shift_right_logical(code_q, 1) == jax.lax.shift_right_logical(code_k, 1)
    both_vision = ((code_q & 1) & (code_k & 1)) == 1
    return same_segment & ((k_index <= q_index) | both_vision)


def _block_index(active_ref, b, i, j, nq, nk):
    return active_ref[(b * nq + i) * nk + j]


def _forward_kernel(active_ref, q_ref, k_ref, v_ref, cq_ref, ck_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr,
                    *, scale, block_q, block_k, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when(_block_index(active_ref, b, i, j, nq, nk) != 0)
    def _compute():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        q_index = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        k_index = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
        s = jnp.where(_allowed(cq_ref[...], ck_ref[...], q_index, k_index), s, MASK_VALUE)
        m_prev = m_scr[...]
        m_new = jnp.maximum(m_prev, s.max(axis=-1, keepdims=True))  # [block_q, LANES], lanes equal
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new[:, :1])
        l_scr[...] = alpha * l_scr[...] + p.sum(axis=-1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv
        m_scr[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        o_ref[...] = (acc_scr[...] / l_scr[:, :1]).astype(o_ref.dtype)
        # Once per query block: the lane-replicated column, transposed, gives the stored row [1, block_q].
        lse_ref[...] = (m_scr[...] + jnp.log(l_scr[...])).T[:1].astype(lse_ref.dtype)


def _recompute(q_ref, k_ref, v_ref, cq_ref, ck_ref, do_ref, lse_ref, delta_ref, i, j, scale, block_q, block_k):
    """Backward quantities of one block, keys on rows [block_k, block_q]: the probabilities p and the
    score gradients ds. Transposed so that the per-query statistics broadcast as the rows they are stored as."""
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    s_kq = jax.lax.dot_general(k, q, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    k_index = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (block_k, block_q), 0)
    q_index = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_k, block_q), 1)
    allowed = _allowed(cq_ref[...], ck_ref[...], q_index, k_index)
    p_kq = jnp.where(allowed, jnp.exp(s_kq - lse_ref[...]), 0.0)
    dp_kq = jax.lax.dot_general(v, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p_kq, p_kq * (dp_kq - delta_ref[...])


def _dq_kernel(active_ref, q_ref, k_ref, v_ref, cq_ref, ck_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_scr,
               *, scale, block_q, block_k, nq, nk):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros_like(dq_scr)

    @pl.when(_block_index(active_ref, b, i, j, nq, nk) != 0)
    def _compute():
        _, ds_kq = _recompute(q_ref, k_ref, v_ref, cq_ref, ck_ref, do_ref, lse_ref, delta_ref, i, j, scale,
                              block_q, block_k)
        k = k_ref[...]
        dq_scr[...] += jax.lax.dot_general(ds_kq.astype(k.dtype), k, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32) * scale

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(active_ref, q_ref, k_ref, v_ref, cq_ref, ck_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                dk_scr, dv_scr, *, scale, block_q, block_k, nq, nk, groups):
    # Grid (B, KV, nk, groups, nq): one key block's gradients sum over the query blocks of every query
    # head of its group, in float32, and are cast once.
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when(_block_index(active_ref, b, i, j, nq, nk) != 0)
    def _compute():
        p_kq, ds_kq = _recompute(q_ref, k_ref, v_ref, cq_ref, ck_ref, do_ref, lse_ref, delta_ref, i, j, scale,
                                 block_q, block_k)
        q, do = q_ref[...], do_ref[...]
        dv_scr[...] += jax.lax.dot_general(p_kq.astype(do.dtype), do, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)
        dk_scr[...] += jax.lax.dot_general(ds_kq.astype(q.dtype), q, (((1,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32) * scale

    @pl.when((g == groups - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _specs(block_q, block_k, head_dim, groups, bhij):
    """BlockSpecs on a grid whose indices `bhij` maps to (batch, query head, query block, key block)."""
    at = lambda block, fn: pl.BlockSpec(block, lambda *ids: fn(*bhij(*ids)))
    return dict(
        q=at((None, None, block_q, head_dim), lambda b, h, i, j: (b, h, i, 0)),
        # lax.div truncates (h >= 0); Python's `//` lowers through `sign`, which Mosaic cannot lower off-TPU.
        kv=at((None, None, block_k, head_dim), lambda b, h, i, j: (b, jax.lax.div(h, groups), j, 0)),
        stats=at((None, None, 1, block_q), lambda b, h, i, j: (b, h, 0, i)),  # lse, delta: [B, H, 1, T]
        # codes: [B, T, 1] (a column per block) and [B, 1, T] (a row per block)
        q_column=at((None, block_q, 1), lambda b, h, i, j: (b, i, 0)),
        k_row=at((None, 1, block_k), lambda b, h, i, j: (b, 0, j)),
        q_row=at((None, 1, block_q), lambda b, h, i, j: (b, 0, i)),
        k_column=at((None, block_k, 1), lambda b, h, i, j: (b, j, 0)))


def _call(kernel, grid_shape, in_specs, out_specs, out_shape, scratch, interpret, *args):
    """The first three grid axes are independent; the rest are reductions into the scratch."""
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid_shape, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch)
    semantics = ("parallel",) * 3 + ("arbitrary",) * (len(grid_shape) - 3)
    params = pltpu.CompilerParams(dimension_semantics=semantics)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape, compiler_params=params,
                          interpret=interpret)(*args)


def _by_query_block(b, h, i, j, _active):
    return b, h, i, j


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, codes_column, codes_row, block_q, block_k, interpret):
    return _forward(q, k, v, codes_column, codes_row, block_q, block_k, interpret)[0]


def _forward(q, k, v, codes_column, codes_row, block_q, block_k, interpret):
    batch, heads, seq_len, head_dim = q.shape
    groups = heads // k.shape[1]
    nq, nk = seq_len // block_q, seq_len // block_k
    active = active_blocks(codes_column[..., 0], block_q, block_k)
    specs = _specs(block_q, block_k, head_dim, groups, _by_query_block)
    kernel = functools.partial(_forward_kernel, scale=head_dim ** -0.5, block_q=block_q, block_k=block_k, nq=nq, nk=nk)
    out, lse = _call(
        kernel, (batch, heads, nq, nk),
        [specs["q"], specs["kv"], specs["kv"], specs["q_column"], specs["k_row"]], [specs["q"], specs["stats"]],
        [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, 1, seq_len), jnp.float32)],
        [pltpu.VMEM((block_q, LANES), jnp.float32), pltpu.VMEM((block_q, LANES), jnp.float32),
         pltpu.VMEM((block_q, head_dim), jnp.float32)],
        interpret, active, q, k, v, codes_column, codes_row)
    return out, (q, k, v, codes_column, codes_row, out, lse, active)


def _backward(block_q, block_k, interpret, residuals, d_out):
    q, k, v, codes_column, codes_row, out, lse, active = residuals
    batch, heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    nq, nk = seq_len // block_q, seq_len // block_k
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, H, 1, T]
    common = dict(scale=head_dim ** -0.5, block_q=block_q, block_k=block_k, nq=nq, nk=nk)
    args = (active, q, k, v, codes_row, codes_column, d_out, lse, delta)
    specs = _specs(block_q, block_k, head_dim, groups, _by_query_block)
    names = ["q", "kv", "kv", "q_row", "k_column", "q", "stats", "stats"]
    d_q = _call(functools.partial(_dq_kernel, **common), (batch, heads, nq, nk), [specs[n] for n in names], specs["q"],
                jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((block_q, head_dim), jnp.float32)],
                interpret, *args)
    # dk, dv: per KV head, reducing over the group's query heads and the query blocks.
    specs = _specs(block_q, block_k, head_dim, groups, lambda b, kv, j, g, i, _active: (b, kv * groups + g, i, j))
    d_k, d_v = _call(functools.partial(_dkv_kernel, groups=groups, **common), (batch, kv_heads, nk, groups, nq),
                     [specs[n] for n in names], [specs["kv"], specs["kv"]],
                     [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                     [pltpu.VMEM((block_k, head_dim), jnp.float32), pltpu.VMEM((block_k, head_dim), jnp.float32)],
                     interpret, *args)
    return d_q, d_k, d_v, None, None


_attention.defvjp(_forward, _backward)


def segment_flash_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, is_vision_bt, block_q=128, block_k=128,
                            interpret=None):
    """Same contract as `attention.segment_attention` (q [B, T, H, D], k/v [B, T, KV, D])."""
    seq_len = q_btnh.shape[1]
    block_q, block_k = min(block_q, seq_len), min(block_k, seq_len)
    if seq_len % block_q or seq_len % block_k:
        raise ValueError(f"sequence length {seq_len} must be a multiple of the blocks ({block_q}, {block_k})")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    codes_bt = (2 * segment_ids_bt + is_vision_bt.astype(jnp.int32)).astype(jnp.int32)
    to_heads = lambda x: jnp.swapaxes(x, 1, 2)
    out = _attention(to_heads(q_btnh), to_heads(k_btkh), to_heads(v_btkh), codes_bt[:, :, None], codes_bt[:, None, :],
                     block_q, block_k, interpret)
    return to_heads(out)
