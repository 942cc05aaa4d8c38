"""Small building blocks shared by the ViT, the adapter and the language model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrrm_jax.core.lora import LoraKernel

Dtype = jnp.dtype


class Dense(nn.Module):
    """`y = x @ kernel (+ bias)`, kernel stored [in, out] (the transpose of torch's Linear).

    Every projection of the model goes through this one module, so that LoRA (a parameter
    transform, see core/lora.py) has a single place to act on.
    """

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x_in):
        kernel_io = self.param("kernel", self.kernel_init, (x_in.shape[-1], self.features), self.param_dtype)
        x_in = x_in.astype(self.dtype)
        if isinstance(kernel_io, LoraKernel):
            y_out = jnp.dot(x_in, kernel_io.w.astype(self.dtype)) + self._lora(x_in, kernel_io)
        else:
            y_out = jnp.dot(x_in, kernel_io.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y_out = y_out + bias.astype(self.dtype)
        return y_out

    def _lora(self, x_in, kernel: LoraKernel):
        """`dropout(x) A B * alpha / r`, in the order that never forms an [in, out] matrix."""
        if kernel.dropout > 0 and self.has_rng("dropout"):
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - kernel.dropout, x_in.shape)
            x_in = jnp.where(keep, x_in / (1 - kernel.dropout), 0).astype(x_in.dtype)
        x_r = jnp.dot(x_in, kernel.a.astype(self.dtype))
        return jnp.dot(x_r, kernel.b.astype(self.dtype)) * kernel.scale


class RMSNorm(nn.Module):
    """RMSNorm as transformers' Molmo2RMSNorm: statistics in float32, then `weight * x` in the input dtype."""

    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * x32.astype(x.dtype)


class GeluMLP(nn.Module):
    """The ViT MLP of both backbones: Dense, gelu_pytorch_tanh, Dense, with biases. `names`: the two
    layers' names, as each checkpoint spells them."""

    intermediate_size: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    names: tuple[str, str] = ("fc1", "fc2")

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: Dense(n, use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        hidden = jax.nn.gelu(dense(self.intermediate_size, self.names[0])(x), approximate=True)
        return dense(x.shape[-1], self.names[1])(hidden)


def swiglu(gate, up):
    return jax.nn.silu(gate) * up
