"""Converted base checkpoints: an Orbax checkpoint of per-layer leaves plus our config.

Layout of a converted directory:

    config.json   our Molmo2Config or Qwen3VLConfig (architecture + runtime defaults, `model_type`)
    params/       Orbax checkpoint, one leaf per layer (`language_model/layers/7/mlp/up_proj/kernel`)

Writing streams one layer group at a time (Orbax partial save), so conversion memory is a small
multiple of the largest tensor; `load_base` stacks the layers into the scanned layout, optionally
straight into a sharding.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from mrrm_jax import backbones
from mrrm_jax.backbones.molmo2.config import Molmo2Config
from mrrm_jax.backbones.qwen3_vl.config import Qwen3VLConfig
from mrrm_jax.core.tree_paths import escape, flatten, nest, unescape

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def save_base(out_dir: str | pathlib.Path, cfg: Molmo2Config | Qwen3VLConfig, groups: Iterable[dict[str, np.ndarray]]) -> pathlib.Path:
    """Writes `groups` ({leaf name: array} dicts, e.g. from `convert.converted_leaves`) one by one."""
    out_dir = pathlib.Path(out_dir).absolute()  # Orbax needs absolute paths
    params_dir = out_dir / PARAMS_DIR
    if params_dir.exists():
        raise FileExistsError(f"{params_dir} exists; choose a new --out directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for group in groups:
        ocp.partial.save(params_dir, nest(group))
    ocp.partial.finalize(params_dir)
    if jax.process_index() == 0:  # with several processes all save (Orbax saves are collective), one writes
        (out_dir / CONFIG_FILE).write_text(cfg.to_json())
    return out_dir


def load_config(base_dir: str | pathlib.Path) -> Molmo2Config | Qwen3VLConfig:
    """The config class of the recorded `model_type` (none recorded: Molmo2, the first format)."""
    path = pathlib.Path(base_dir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a converted checkpoint (run tools/convert_checkpoint.py)")
    text = path.read_text()
    return backbones.BACKBONES[backbones.model_type(json.loads(text))].config_class.from_json(text)


def _per_layer(stacked_name: str, cfg: Molmo2Config | Qwen3VLConfig) -> list[str] | None:
    """'language_model/layers/mlp/up_proj/kernel' -> its per-layer checkpoint names (None: not stacked)."""
    match = re.fullmatch(r"(\w+)/layers/(.*)", stacked_name)
    if match is None:
        return None
    num_layers = cfg.layer_counts[match.group(1)]
    return [f"{match.group(1)}/layers/{i}/{match.group(2)}" for i in range(num_layers)]


def _layer_sharding(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of one layer's slice of a stacked leaf (drop the layer axis)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding  # single-device and replicated shardings do not depend on rank


def save_params(out_dir: str | pathlib.Path, cfg: Molmo2Config | Qwen3VLConfig, params: dict) -> pathlib.Path:
    """Writes model-layout (stacked) params as a converted base: each layer of a stacked leaf on its own.
    The params are in memory already, so they go in one save (a save per leaf cost ~0.15 s each)."""
    leaves = {}
    for name, value in flatten(params).items():
        names = _per_layer(name, cfg)
        leaves.update({name: np.asarray(value)} if names is None else {n: np.asarray(v) for n, v in zip(names, value)})
    return save_base(out_dir, cfg, [leaves])


def load_base(base_dir: str | pathlib.Path, shardings=None, dtype=None,
              skip: tuple[str, ...] = ()) -> tuple[Molmo2Config | Qwen3VLConfig, dict]:
    """(config, params) with params in the model's (stacked) layout, without the top-level groups named
    in `skip` (never read: the reward path skips "lm_head", 1.5 GB in float32 at Molmo2-4B).

    `shardings`: optional pytree of `jax.sharding.Sharding` matching the params: every layer slice
    is restored by Orbax straight into its shard of the stacked leaf's sharding (no host copy of
    the whole model). `dtype`: optional cast of the floating leaves, e.g. "bfloat16".
    """
    base_dir = pathlib.Path(base_dir).absolute()
    cfg = load_config(base_dir)
    stored = flatten(ocp.metadata(base_dir / PARAMS_DIR).metadata)
    stacked_names = sorted({re.sub(r"/layers/\d+/", "/layers/", n) for n in stored if n.split("/")[0] not in skip})
    if shardings is None:
        shardings_by_name = {n: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) for n in stacked_names}
    else:
        shardings_by_name = flatten(shardings)

    def leaf_dtype(meta):
        return jnp.dtype(dtype) if dtype is not None and jnp.issubdtype(meta.dtype, jnp.floating) else meta.dtype

    abstract = {}
    for name in stacked_names:
        parts = _per_layer(name, cfg)
        if parts is None:
            meta = stored[name]
            abstract[name] = jax.ShapeDtypeStruct(meta.shape, leaf_dtype(meta), sharding=shardings_by_name[name])
        for part in parts or ():
            meta = stored[part]
            abstract[part] = jax.ShapeDtypeStruct(meta.shape, leaf_dtype(meta),
                                                  sharding=_layer_sharding(shardings_by_name[name]))
    skipped = {name: ocp.PLACEHOLDER for name in stored if name.split("/")[0] in skip}
    restored = flatten(ocp.load(base_dir / PARAMS_DIR, nest({**abstract, **skipped})))
    flat = {}
    for name in stacked_names:
        parts = _per_layer(name, cfg)
        if parts is None:
            flat[name] = restored.pop(name)
        elif shardings is None:
            flat[name] = jnp.stack([restored.pop(p) for p in parts])
        else:
            flat[name] = _stack_into(shardings_by_name[name])(*[restored.pop(p) for p in parts])
    return cfg, nest(flat)


@functools.cache
def _stack_into(sharding):
    """One jitted stack per target sharding (not per leaf), placing the result straight in it."""
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)


# -- reward-model directories -------------------------------------------------------------------
#
#   base/                 a converted base checkpoint (see above)
#   trainable/            Orbax: {"lora": {kernel path: {"a", "b"}}, "head": value-head params}
#   reward_config.json    {"head": HeadConfig fields, "lora": LoraSpec fields or null}
#   processor/            tokenizer + processor files, `<|resp_sep|>` included

BASE_DIR, TRAINABLE_DIR, REWARD_CONFIG_FILE, PROCESSOR_DIR = "base", "trainable", "reward_config.json", "processor"


def save_trainable(out_dir: str | pathlib.Path, trainable: dict, head_config, lora_spec) -> None:
    """Writes `trainable/` and `reward_config.json` into a reward-model directory."""
    out_dir = pathlib.Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    tree = {"head": trainable["head"]}
    if trainable.get("lora"):
        tree["lora"] = escape(trainable["lora"])
    ocp.save(out_dir / TRAINABLE_DIR, jax.tree.map(np.asarray, tree))
    spec = None if lora_spec is None else dataclasses.asdict(lora_spec)
    if jax.process_index() == 0:  # as in save_base
        (out_dir / REWARD_CONFIG_FILE).write_text(json.dumps({"head": dataclasses.asdict(head_config), "lora": spec}, indent=1))


def load_trainable(reward_dir: str | pathlib.Path):
    """(trainable, HeadConfig, LoraSpec or None) of a reward-model directory."""
    from mrrm_jax.core.lora import LoraSpec
    from mrrm_jax.core.reward import HeadConfig

    reward_dir = pathlib.Path(reward_dir).absolute()
    path = reward_dir / REWARD_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a reward-model directory (import or train one first)")
    raw = json.loads(path.read_text())
    head = HeadConfig(**raw["head"])
    spec = None if raw["lora"] is None else LoraSpec(**{**raw["lora"], "targets": tuple(raw["lora"]["targets"])})
    tree = ocp.load(reward_dir / TRAINABLE_DIR)
    trainable = {"head": tree["head"], "lora": unescape(tree.get("lora", {}))}
    return jax.tree.map(jnp.asarray, trainable), head, spec
