"""LoRA as a parameter transform (design decision 2).

`init(params, spec, rng)` makes the trainable factors for the kernels the spec targets;
`apply(params, factors, spec)` returns an effective-weights VIEW of the parameters in which each
targeted kernel is a `LoraKernel(w, a, b)`; `Dense` then computes `x W + dropout(x) A B * alpha/r`
without ever forming `W + A B`. The base stays frozen: gradients are taken w.r.t. `factors` only,
so the optimizer holds no state for the base. `merge` folds the factors in, for export and for
fast scoring.

Factors are stored next to the kernel they adapt, with the same leading (layer) axes:
`a [..., in, rank]`, `b [..., rank, out]`.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from mrrm_jax.core import tree_paths

# Molmo2's LM attention q/k/v and output projections and its MLP input (gate, up) and output
# projections: the paper's targets (att_proj, attn_out, ff_proj, ff_out in the original naming).
DEFAULT_TARGETS = (r"language_model/layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel",)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes over "/"-joined parameter paths

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def targets_path(self, path: str) -> bool:
        return any(re.fullmatch(t, path) for t in self.targets)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraKernel:
    """A kernel seen through its LoRA factors. `Dense` computes with the three parts separately."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    dropout: float = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.w.shape


def _map_targets(fn, params: dict, spec: LoraSpec) -> dict:
    """Apply `fn(path, kernel)` to every targeted kernel; other leaves pass through."""
    def visit(key_path, leaf):
        path = tree_paths.name(key_path)
        return fn(path, leaf) if spec.targets_path(path) else leaf
    return jax.tree_util.tree_map_with_path(visit, params)


def init(params: dict, spec: LoraSpec, rng: jax.Array, dtype=jnp.float32) -> dict:
    """Trainable factors {path: {"a", "b"}}: A as PEFT (kaiming-uniform, a=sqrt(5)), B = 0."""
    factors = {}
    targets = [(p, leaf) for p, leaf in tree_paths.flatten(params).items() if spec.targets_path(p)]
    if not targets:
        raise ValueError(f"LoRA targets {spec.targets} match no parameter")
    for key, (path, kernel) in zip(jax.random.split(rng, len(targets)), targets):
        *lead, fan_in, fan_out = kernel.shape
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) on a [rank, in] torch weight
        factors[path] = {"a": jax.random.uniform(key, (*lead, fan_in, spec.rank), dtype, -bound, bound),
                         "b": jnp.zeros((*lead, spec.rank, fan_out), dtype)}
    return factors


def apply(params: dict, factors: dict, spec: LoraSpec, dropout: bool = True) -> dict:
    """The effective-weights view: targeted kernels become `LoraKernel`s (nothing is materialised)."""
    missing = sorted(set(factors) - set(tree_paths.flatten(params)))
    if missing:
        raise ValueError(f"LoRA factors for parameters that do not exist: {missing}")
    rate = spec.dropout if dropout else 0.0

    def view(path, kernel):
        if path not in factors:
            return kernel
        return LoraKernel(kernel, factors[path]["a"], factors[path]["b"], spec.scale, rate)
    return _map_targets(view, params, spec)


def merge(params: dict, factors: dict, spec: LoraSpec) -> dict:
    """`W + A B * alpha / r` for every adapted kernel (export, fast scoring)."""
    def merged(path, kernel):
        if path not in factors:
            return kernel
        delta = jnp.einsum("...ir,...ro->...io", factors[path]["a"].astype(jnp.float32),
                           factors[path]["b"].astype(jnp.float32)) * spec.scale
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return _map_targets(merged, params, spec)


def num_parameters(factors: dict) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(factors)))
