"""PyTorch/Hugging Face Molmo2 safetensors -> our parameter tree, streamed tensor by tensor.

Reads both layouts: the transformers-native one (`model.language_model.layers.N.self_attn.q_proj...`)
and the ORIGINAL release one (`model.transformer.blocks.N.self_attn.att_proj`, fused QKV and
up/gate, the embedding split into `wte.embedding` + `wte.new_embedding`, `vision_backbone.*`).
The mapping is two tables: `ORIGINAL_RENAMES` brings original names to native names (as
transformers' `conversion_mapping.py`, entry "molmo2"), and `RULES` maps every native name to
target leaves, each target being a list of row ranges of source tensors, concatenated along
rows and then transposed for linear layers. Fused tensors are thus split by READING only the
rows a target needs, so nothing larger than one tensor is ever held.

Converted checkpoints keep one leaf per layer (`language_model/layers/7/mlp/up_proj/kernel`);
`checkpoint.load_base` stacks them into the scanned layout.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from mrrm_jax.models.molmo2.config import Molmo2Config

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


# -- the mapping tables -------------------------------------------------------------------------

# Original release name -> native name (the same renames as transformers' conversion_mapping).
ORIGINAL_RENAMES = [
    (r"^transformer\.blocks\.", "language_model.layers."),
    (r"^transformer\.ln_f\.", "language_model.norm."),
    (r"^transformer\.", "language_model."),
    (r"^vision_backbone\.image_vit\.transformer\.resblocks\.", "vision_tower.layers."),
    (r"^vision_backbone\.image_vit\.", "vision_tower."),
    (r"^vision_backbone\.image_pooling_2d\.w([qkvo])\.", r"multi_modal_projector.image_pooling_2d.\1_proj."),
    (r"^vision_backbone\.image_projector\.w1\.", "multi_modal_projector.image_projector.gate_proj."),
    (r"^vision_backbone\.image_projector\.w2\.", "multi_modal_projector.image_projector.down_proj."),
    (r"^vision_backbone\.image_projector\.w3\.", "multi_modal_projector.image_projector.up_proj."),
    (r"\.attention\.w([qkvo])\.", r".self_attn.\1_proj."),
    (r"\.feed_forward\.w([12])\.", r".mlp.fc\1."),
    (r"\.attention_norm\.", ".layer_norm1."),
    (r"\.ffn_norm\.", ".layer_norm2."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ff_norm\.", ".post_attention_layernorm."),
    (r"\.self_attn\.attn_out\.", ".self_attn.o_proj."),
    (r"\.mlp\.ff_out\.", ".mlp.down_proj."),
]

Rows = Callable[[Molmo2Config], tuple[int, int]]
# Each rule: native-name regex -> [(target template, order, rows or None)], transform.
# `{0}`, `{1}` in a template are the regex groups; targets use "/" paths of our tree.
# "linear": torch [out, in] -> our [in, out]; "copy": as is.


def _qkv(part: int) -> Rows:
    """Rows of q, k or v inside a fused `att_proj` (unequal under GQA)."""
    def rows(cfg: Molmo2Config) -> tuple[int, int]:
        t = cfg.text
        sizes = (t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim, t.num_kv_heads * t.head_dim)
        return sum(sizes[:part]), sum(sizes[: part + 1])
    return rows


def _ff_half(part: int) -> Rows:
    """`ff_proj` is [up; gate], in that order."""
    return lambda cfg: (part * cfg.text.intermediate_size, (part + 1) * cfg.text.intermediate_size)


RULES: list[tuple[str, list[tuple[str, int, Rows | None]], str]] = [
    (r"vision_tower\.patch_embedding\.weight", [("vision_tower/patch_embedding/kernel", 0, None)], "linear"),
    (r"vision_tower\.patch_embedding\.bias", [("vision_tower/patch_embedding/bias", 0, None)], "copy"),
    (r"vision_tower\.positional_embedding", [("vision_tower/positional_embedding", 0, None)], "copy"),
    (r"vision_tower\.layers\.(\d+)\.(layer_norm[12])\.weight", [("vision_tower/layers/{0}/{1}/scale", 0, None)], "copy"),
    (r"vision_tower\.layers\.(\d+)\.(layer_norm[12])\.bias", [("vision_tower/layers/{0}/{1}/bias", 0, None)], "copy"),
    (r"vision_tower\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.fc[12])\.weight",
     [("vision_tower/layers/{0}/{1}/kernel", 0, None)], "linear"),
    (r"vision_tower\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.fc[12])\.bias",
     [("vision_tower/layers/{0}/{1}/bias", 0, None)], "copy"),
    (r"multi_modal_projector\.(image_pooling_2d\.[qkvo]_proj|image_projector\.\w+_proj)\.weight",
     [("multi_modal_projector/{0}/kernel", 0, None)], "linear"),
    (r"multi_modal_projector\.(image_pooling_2d\.[qkvo]_proj|image_projector\.\w+_proj)\.bias",
     [("multi_modal_projector/{0}/bias", 0, None)], "copy"),
    (r"language_model\.embed_tokens\.weight", [("language_model/embed_tokens/embedding", 0, None)], "copy"),
    # The original layout splits the table in two; transformers' save_pretrained splits it in
    # equal halves rather than base + extra rows, so only the order matters.
    (r"language_model\.wte\.embedding", [("language_model/embed_tokens/embedding", 0, None)], "copy"),
    (r"language_model\.wte\.new_embedding", [("language_model/embed_tokens/embedding", 1, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)\.weight",
     [("language_model/layers/{0}/{1}/scale", 0, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight",
     [("language_model/layers/{0}/{1}/kernel", 0, None)], "linear"),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkv]_proj)\.bias", [("language_model/layers/{0}/{1}/bias", 0, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.self_attn\.att_proj\.weight",
     [(f"language_model/layers/{{0}}/self_attn/{p}_proj/kernel", 0, _qkv(i)) for i, p in enumerate("qkv")], "linear"),
    (r"language_model\.layers\.(\d+)\.self_attn\.att_proj\.bias",
     [(f"language_model/layers/{{0}}/self_attn/{p}_proj/bias", 0, _qkv(i)) for i, p in enumerate("qkv")], "copy"),
    (r"language_model\.layers\.(\d+)\.mlp\.ff_proj\.weight",
     [("language_model/layers/{0}/mlp/up_proj/kernel", 0, _ff_half(0)),
      ("language_model/layers/{0}/mlp/gate_proj/kernel", 0, _ff_half(1))], "linear"),
    (r"language_model\.norm\.weight", [("language_model/norm/scale", 0, None)], "copy"),
    (r"lm_head\.weight", [("lm_head/kernel", 0, None)], "linear"),
]


def native_name(key: str) -> str:
    """Strip the `model.` prefix and rename original-layout keys to native ones."""
    key = re.sub(r"^model\.", "", key)
    for pattern, replacement in ORIGINAL_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


# A target leaf: its source parts (source key, rows), concatenated along rows, and the transform.
Plan = dict[str, tuple[list[tuple[str, tuple[int, int] | None]], str]]


def plan(source_keys, cfg: Molmo2Config) -> Plan:
    """Target leaf -> how to build it. Unknown source tensors are an error that names them;
    ViT layers deeper than the last feature layer are skipped (they never reach the output)."""
    parts: dict[str, list] = {}
    transforms: dict[str, str] = {}
    unknown = []
    for key in source_keys:
        name = native_name(key)
        for pattern, targets, transform in RULES:
            match = re.fullmatch(pattern, name)
            if match:
                break
        else:
            unknown.append(key)
            continue
        groups = [g.replace(".", "/") for g in match.groups()]
        if name.startswith("vision_tower.layers.") and int(groups[0]) >= cfg.vision.num_layers:
            continue
        for template, order, rows in targets:
            target = template.format(*groups)
            parts.setdefault(target, []).append((order, key, rows(cfg) if rows else None))
            transforms[target] = transform
    if unknown:
        raise ValueError(f"unknown tensors in the checkpoint (not Molmo2?): {sorted(unknown)}")
    return {t: ([(k, r) for _, k, r in sorted(p)], transforms[t]) for t, p in parts.items()}


def build(shards: SafetensorsShards, parts, transform: str, dtype=None) -> np.ndarray:
    arrays = [shards.read(key, rows) for key, rows in parts]
    array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    del arrays
    if transform == "linear":
        array = np.ascontiguousarray(array.T)
    return array if dtype is None else array.astype(dtype)


def layer_group(target: str) -> str:
    """Leaves are written in groups: one per layer, and one per top-level leaf otherwise."""
    match = re.match(r"(\w+/layers/\d+)/", target)
    return match.group(1) if match else target


def converted_leaves(shards: SafetensorsShards, cfg: Molmo2Config, dtype=None) -> Iterator[dict[str, np.ndarray]]:
    """Yields {target: array} one layer group at a time (the streaming unit of conversion)."""
    target_plan = plan(shards.entries, cfg)
    check_plan(target_plan, shards, cfg)
    groups: dict[str, list[str]] = {}
    for target in target_plan:
        groups.setdefault(layer_group(target), []).append(target)
    for targets in groups.values():
        yield {t: build(shards, *target_plan[t], dtype=dtype) for t in targets}


def expected_leaves(cfg: Molmo2Config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every leaf a converted checkpoint must hold (per-layer names), with its shape."""
    import jax  # heavy; only needed here

    from mrrm_jax.models.molmo2 import Molmo2

    v = cfg.vision
    batch = {"tokens": np.zeros((1, 1), np.int32), "positions": np.zeros((1, 1), np.int32),
             "segment_ids": np.ones((1, 1), np.int32), "crops": np.zeros((1, 1, v.num_patches, v.patch_dim), np.float32),
             "pooling": np.zeros((1, 1, 4), np.int32)}
    abstract = jax.eval_shape(Molmo2(cfg).init, jax.random.key(0), batch)["params"]
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


def check_plan(target_plan: Plan, shards: SafetensorsShards, cfg: Molmo2Config) -> None:
    """Missing leaves and shape mismatches are errors that name them, before anything is written."""
    expected = expected_leaves(cfg)
    missing = sorted(set(expected) - set(target_plan))
    extra = sorted(set(target_plan) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint does not match the config: missing {missing}, unexpected {extra}")
    for target, (parts, transform) in target_plan.items():
        rows = sum((r[1] - r[0]) if r else shards.shape(k)[0] for k, r in parts)
        shape = (rows, *shards.shape(parts[0][0])[1:]) if shards.shape(parts[0][0]) else ()
        if transform == "linear":
            shape = shape[::-1]
        if tuple(shape) != tuple(expected[target][0]):
            raise ValueError(f"{target}: checkpoint gives shape {shape}, config expects {expected[target][0]} "
                             f"(from {[k for k, _ in parts]})")


def convert_dir(hf_dir, out_dir, dtype=None):
    """A Hugging Face Molmo2 directory -> a converted base checkpoint (what tools/convert_checkpoint.py runs)."""
    import pathlib

    from mrrm_jax import checkpoint

    hf_dir = pathlib.Path(hf_dir)
    cfg = Molmo2Config.from_hf_dir(hf_dir)
    shards = SafetensorsShards(hf_dir)
    has_lm_head = any(native_name(k) == "lm_head.weight" for k in shards.entries)
    cfg = cfg.replace(with_lm_head=has_lm_head and not cfg.text.tie_word_embeddings)
    return checkpoint.save_base(out_dir, cfg, converted_leaves(shards, cfg, dtype=dtype))
