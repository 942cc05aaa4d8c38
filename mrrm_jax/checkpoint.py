"""Converted base checkpoints: an Orbax checkpoint of per-layer leaves plus our config.

Layout of a converted directory:

    config.json   our Molmo2Config (architecture + runtime defaults)
    params/       Orbax checkpoint, one leaf per layer (`language_model/layers/7/mlp/up_proj/kernel`)

Writing streams one layer group at a time (Orbax partial save), so conversion memory is a small
multiple of the largest tensor; `load_base` stacks the layers into the scanned layout, optionally
straight into a sharding.
"""

from __future__ import annotations

import pathlib
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from mrrm_jax.models.molmo2.config import Molmo2Config

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def _nest(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_base(out_dir: str | pathlib.Path, cfg: Molmo2Config, groups: Iterable[dict[str, np.ndarray]]) -> pathlib.Path:
    """Writes `groups` ({leaf name: array} dicts, e.g. from `convert.converted_leaves`) one by one."""
    out_dir = pathlib.Path(out_dir).absolute()  # Orbax needs absolute paths
    params_dir = out_dir / PARAMS_DIR
    if params_dir.exists():
        raise FileExistsError(f"{params_dir} exists; choose a new --out directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for group in groups:
        ocp.partial.save(params_dir, _nest(group))
    ocp.partial.finalize(params_dir)
    (out_dir / CONFIG_FILE).write_text(cfg.to_json())
    return out_dir


def load_config(base_dir: str | pathlib.Path) -> Molmo2Config:
    path = pathlib.Path(base_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a converted checkpoint (run tools/convert_checkpoint.py)")
    return Molmo2Config.from_json(path.read_text())


def _stack_layers(tree: dict) -> dict:
    """{'layers': {'0': sub, '1': sub, ...}} -> {'layers': stacked sub} wherever it occurs."""
    out = {}
    for key, value in tree.items():
        if key == "layers" and isinstance(value, dict) and all(re.fullmatch(r"\d+", k) for k in value):
            per_layer = [value[str(i)] for i in range(len(value))]
            out[key] = jax.tree.map(lambda *xs: np.stack(xs), *per_layer)
        elif isinstance(value, dict):
            out[key] = _stack_layers(value)
        else:
            out[key] = value
    return out


def load_base(base_dir: str | pathlib.Path, shardings=None, dtype=None) -> tuple[Molmo2Config, dict]:
    """(config, params) with params in the model's (stacked) layout.

    `shardings`: an optional pytree of `jax.sharding.Sharding` matching the params; each leaf is
    then placed straight into it. `dtype`: optional cast of floating leaves (e.g. "bfloat16").
    """
    base_dir = pathlib.Path(base_dir).absolute()
    cfg = load_config(base_dir)
    flat = ocp.load(base_dir / PARAMS_DIR)
    flat = jax.tree.map(np.asarray, flat)
    params = _stack_layers(flat)
    if dtype is not None:
        params = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    if shardings is None:
        return cfg, jax.tree.map(jnp.asarray, params)
    return cfg, jax.tree.map(jax.device_put, params, shardings)
