"""Parameter trees by name: "/"-joined key paths, and the escaped form of LoRA factor keys.

    {"vision_tower": {"layers": {"mlp": {"fc1": {"kernel": w}}}}}  <->  {"vision_tower/layers/mlp/fc1/kernel": w}

LoRA factors are keyed by their kernel's path. Inside a pytree that Orbax saves (the train state, a
reward model's `trainable/`) a key must be a plain name, so there "/" is written "|".
"""

from __future__ import annotations

import jax


def name(key_path) -> str:
    """A jax key path as "a/b/c" (dict keys, sequence indices and attributes alike)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in key_path)


def flatten(tree) -> dict:
    """{"a/b/c": leaf}; the inverse of `nest`."""
    return {name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def nest(flat: dict) -> dict:
    """{"a/b/c": leaf} -> {"a": {"b": {"c": leaf}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def escape(factors: dict) -> dict:
    """LoRA factors {kernel path: ...} keyed as Orbax needs them ("|" for "/")."""
    return {path.replace("/", "|"): value for path, value in factors.items()}


def unescape(factors: dict) -> dict:
    """The inverse of `escape`."""
    return {key.replace("|", "/"): value for key, value in factors.items()}
