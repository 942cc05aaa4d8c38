"""PyTorch/Hugging Face safetensors -> our parameter tree, streamed tensor by tensor.

One machinery (reader, plan, check, build) over the conversion table of the backbone the checkpoint's
`config.json` names (`backbones/<name>/conversion.py`; the format is `models/hf_conversion.py`'s):
renames to native names, rules mapping every native name to target leaves, and the names left out.
Each target is a list of row ranges of source tensors, concatenated along rows and then transformed.
Fused tensors are thus split by READING only the rows a target needs, so nothing larger than one
tensor is ever held.

Converted checkpoints keep one leaf per layer (`language_model/layers/7/mlp/up_proj/kernel`);
`checkpoint.load_base` stacks them into the scanned layout.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Iterator

import ml_dtypes
import numpy as np

from mrrm_jax import backbones

# -- reading safetensors without torch ----------------------------------------------------------

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32}


class SafetensorsShards:
    """Lazy, row-sliceable access to the tensors of one or many `.safetensors` files."""

    def __init__(self, directory: pathlib.Path):
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: no *.safetensors files")
        self.entries: dict[str, tuple[pathlib.Path, int, np.dtype, tuple[int, ...]]] = {}
        for path in files:
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len))
            for key, meta in header.items():
                if key == "__metadata__":
                    continue
                if meta["dtype"] not in _DTYPES:
                    raise ValueError(f"{path.name}: tensor {key} has unsupported dtype {meta['dtype']}")
                start = 8 + header_len + meta["data_offsets"][0]
                self.entries[key] = (path, start, np.dtype(_DTYPES[meta["dtype"]]), tuple(meta["shape"]))

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][3]

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or only rows [start, stop) of its first axis (read from disk, nothing more)."""
        path, start, dtype, shape = self.entries[key]
        first, last = rows if rows is not None else (0, shape[0] if shape else 1)
        row_items = int(np.prod(shape[1:], dtype=np.int64))
        with open(path, "rb") as f:
            f.seek(start + first * row_items * dtype.itemsize)
            data = np.fromfile(f, dtype=dtype, count=(last - first) * row_items)
        return data.reshape((last - first, *shape[1:]) if shape else ())


def native_name(key: str, renames: list[tuple[str, str]]) -> str:
    """Strip the `model.` prefix and apply the backbone's renames (original layouts -> native names)."""
    key = re.sub(r"^model\.", "", key)
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


# A target leaf: its source parts (source key, rows), concatenated along rows, and the transform.
Plan = dict[str, tuple[list[tuple[str, tuple[int, int] | None]], str]]


def plan(source_keys, cfg) -> Plan:
    """Target leaf -> how to build it. Unknown source tensors are an error that names them."""
    table = backbones.BACKBONES[cfg.model_type].conversion
    parts: dict[str, list] = {}
    transforms: dict[str, str] = {}
    unknown = []
    for key in source_keys:
        name = native_name(key, table.renames)
        for pattern, targets, transform in table.rules:
            match = re.fullmatch(pattern, name)
            if match:
                break
        else:
            unknown.append(key)
            continue
        groups = [g.replace(".", "/") for g in match.groups()]
        if table.skipped(name, groups, cfg):
            continue
        for template, order, rows in targets:
            target = template.format(*groups)
            parts.setdefault(target, []).append((order, key, rows(cfg) if rows else None))
            transforms[target] = transform
    if unknown:
        raise ValueError(f"unknown tensors in the checkpoint (not {cfg.model_type}?): {sorted(unknown)}")
    return {t: ([(k, r) for _, k, r in sorted(p)], transforms[t]) for t, p in parts.items()}


# transform -> (array -> array, source shape -> target shape)
TRANSFORMS = {
    "copy": (lambda a: a, lambda shape: shape),
    "linear": (lambda a: np.ascontiguousarray(a.T), lambda shape: shape[::-1]),
    "conv": (lambda a: np.ascontiguousarray(a.reshape(a.shape[0], -1).T),
             lambda shape: (int(np.prod(shape[1:])), shape[0])),
}


def build(shards: SafetensorsShards, parts, transform: str, dtype=None) -> np.ndarray:
    arrays = [shards.read(key, rows) for key, rows in parts]
    array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    del arrays
    array = TRANSFORMS[transform][0](array)
    return array if dtype is None else array.astype(dtype)


def layer_group(target: str) -> str:
    """Leaves are written in groups: one per layer, and one per top-level leaf otherwise."""
    match = re.match(r"(\w+/layers/\d+)/", target)
    return match.group(1) if match else target


def converted_leaves(shards: SafetensorsShards, cfg, dtype=None) -> Iterator[dict[str, np.ndarray]]:
    """Yields {target: array} one layer group at a time (the streaming unit of conversion)."""
    target_plan = plan(shards.entries, cfg)
    check_plan(target_plan, shards, cfg)
    groups: dict[str, list[str]] = {}
    for target in target_plan:
        groups.setdefault(layer_group(target), []).append(target)
    for targets in groups.values():
        yield {t: build(shards, *target_plan[t], dtype=dtype) for t in targets}


def expected_leaves(cfg) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every leaf a converted checkpoint must hold (per-layer names), with its shape."""
    import jax  # heavy; only needed here

    abstract = jax.eval_shape(backbones.module(cfg).init, jax.random.key(0), backbones.init_batch(cfg))["params"]
    leaves = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        name = "/".join(p.key for p in path)
        stacked = re.match(r"(\w+/layers)/(.*)", name)
        if stacked:
            for i in range(leaf.shape[0]):
                leaves[f"{stacked.group(1)}/{i}/{stacked.group(2)}"] = (leaf.shape[1:], leaf.dtype)
        else:
            leaves[name] = (leaf.shape, leaf.dtype)
    return leaves


def check_plan(target_plan: Plan, shards: SafetensorsShards, cfg) -> None:
    """Missing leaves and shape mismatches are errors that name them, before anything is written."""
    expected = expected_leaves(cfg)
    missing = sorted(set(expected) - set(target_plan))
    extra = sorted(set(target_plan) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the config: missing {missing}, unexpected {extra}")
    for target, (parts, transform) in target_plan.items():
        rows = sum((r[1] - r[0]) if r else shards.shape(k)[0] for k, r in parts)
        source = shards.shape(parts[0][0])
        shape = TRANSFORMS[transform][1]((rows, *source[1:])) if source else ()
        if tuple(shape) != tuple(expected[target][0]):
            raise ValueError(f"{target}: checkpoint gives shape {tuple(shape)}, config expects {expected[target][0]} "
                             f"(from {[k for k, _ in parts]})")


def hf_model_config(hf_dir: pathlib.Path):
    """Our config of a Hugging Face checkpoint directory, of the backbone its config.json names."""
    path = pathlib.Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face checkpoint directory")
    hf_config = json.loads(path.read_text())
    return backbones.BACKBONES[backbones.model_type(hf_config)].config_class.from_hf_dict(hf_config)


def convert_dir(hf_dir, out_dir, dtype=None):
    """A Hugging Face Molmo2 or Qwen3-VL directory -> a converted base checkpoint (what
    tools/convert_checkpoint.py runs)."""
    from mrrm_jax.backbones import checkpoint

    hf_dir = pathlib.Path(hf_dir)
    cfg = hf_model_config(hf_dir)
    table = backbones.BACKBONES[cfg.model_type].conversion
    shards = SafetensorsShards(hf_dir)
    has_lm_head = any(native_name(k, table.renames) == "lm_head.weight" for k in shards.entries)
    cfg = cfg.replace(with_lm_head=has_lm_head and not table.skipped("lm_head.weight", [], cfg))
    return checkpoint.save_base(out_dir, cfg, converted_leaves(shards, cfg, dtype=dtype))
