"""Rotary position embeddings: inverse frequencies per `rope_type`, and their application.

The frequency tables follow transformers' `modeling_rope_utils` formula by formula, computed in
float32 like the reference so that long positions rotate by the same angles.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _default(params: dict, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.float32(params["rope_theta"]) ** exponent).astype(np.float32), 1.0


def _linear(params: dict, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    inv_freq, _ = _default(params, head_dim, max_positions)
    return (inv_freq / np.float32(params["factor"])).astype(np.float32), 1.0


def _yarn(params: dict, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    base, factor = params["rope_theta"], params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = params.get("beta_fast") or 32, params.get("beta_slow") or 1

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = (1 - ramp).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq.astype(np.float32), attention_factor


def _llama3(params: dict, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    inv_freq, _ = _default(params, head_dim, max_positions)
    factor, low_f, high_f = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low_f, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high_f) & ~(wavelen > old_len / low_f)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


_ROPE_TYPES = {"default": _default, "linear": _linear, "yarn": _yarn, "llama3": _llama3}


def inverse_frequencies(rope: dict, head_dim: int, max_positions: int, scaled: bool) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim/2], attention scaling). `scaled=False` keeps theta and skips the scaling,
    as Molmo2 does for layers outside `rope_scaling_layers`."""
    rope_type = rope.get("rope_type", "default") if scaled else "default"
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not ported; supported: {sorted(_ROPE_TYPES)}")
    return _ROPE_TYPES[rope_type](rope, head_dim, max_positions)


def rope_tables(positions_bt, inv_freq: np.ndarray, attention_scaling: float, dtype):
    """cos, sin [B, T, head_dim] in `dtype`, as the reference computes them (float32, then cast)."""
    return _cos_sin(positions_bt.astype(jnp.float32)[..., None], inv_freq, attention_scaling, dtype)


def mrope_axes(num_freqs: int, mrope_section) -> np.ndarray:
    """The position axis (0 = t, 1 = h, 2 = w) each frequency rotates by, in Qwen3-VL's INTERLEAVED
    M-RoPE: frequencies 1, 4, 7, ... (the first 3 * section[1] slots) follow h, 2, 5, 8, ... follow w,
    and the rest (0, 3, 6, ... and the tail past 3 * section) keep t. [24, 20, 20] over 64 frequencies:

        t h w t h w ... t h w | t t t t
        0 1 2 3 4 5 ... 57 58 59 | 60 61 62 63
    """
    axis_f = np.zeros(num_freqs, np.int32)
    for axis in (1, 2):
        axis_f[axis: 3 * mrope_section[axis]: 3] = axis
    return axis_f


def mrope_tables(positions_b3t, inv_freq: np.ndarray, mrope_section, attention_scaling: float, dtype):
    """cos, sin [B, T, head_dim] of M-RoPE from (t, h, w) positions [B, 3, T] (see `mrope_axes`).
    With three equal rows this is `rope_tables` exactly."""
    axis_f = mrope_axes(len(inv_freq), mrope_section)
    positions_btf = jnp.take(positions_b3t, jnp.asarray(axis_f), axis=1).transpose(0, 2, 1)
    return _cos_sin(positions_btf.astype(jnp.float32), inv_freq, attention_scaling, dtype)


def axial_tables(positions_bp2, inv_freq: np.ndarray, dtype):
    """cos, sin [B, P, 4 * len(inv_freq)] of the Qwen3-VL ViT's 2-D rope from (row, col) patch
    positions [B, P, 2]: angles [row * f, col * f], doubled for rotate-half (`Qwen3VLVisionRotaryEmbedding`)."""
    positions_bpf = jnp.repeat(positions_bp2.astype(jnp.float32), len(inv_freq), axis=-1)
    return _cos_sin(positions_bpf, np.concatenate([inv_freq, inv_freq]), 1.0, dtype)


def _cos_sin(positions_btf, inv_freq: np.ndarray, attention_scaling: float, dtype):
    freqs_btf = positions_btf * jnp.asarray(inv_freq, jnp.float32)
    emb_btd = jnp.concatenate([freqs_btf, freqs_btf], axis=-1)
    return (jnp.cos(emb_btd) * attention_scaling).astype(dtype), (jnp.sin(emb_btd) * attention_scaling).astype(dtype)


def apply_rope(x_btnh, cos_btd, sin_btd):
    """Rotate-half RoPE on [B, T, heads, head_dim]."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_btd[:, :, None, :] + rotated * sin_btd[:, :, None, :]
