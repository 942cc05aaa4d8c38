"""PyTorch/Hugging Face safetensors -> our parameter tree, streamed tensor by tensor.

One machinery (reader, plan, check, build) and one table per backbone, chosen by the checkpoint's
`config.json` `model_type` (`BACKBONES`): renames to native names, `RULES` mapping every native name
to target leaves, and the names left out. Each target is a list of row ranges of source tensors,
concatenated along rows and then transformed ("linear": transposed; "conv": a Conv3d weight
[out, C, T, p, p] flattened to [C*T*p*p, out]). Fused tensors are thus split by READING only the
rows a target needs, so nothing larger than one tensor is ever held.

Molmo2: both the transformers-native layout (`model.language_model.layers.N.self_attn.q_proj...`)
and the ORIGINAL release one (`model.transformer.blocks.N.self_attn.att_proj`, fused QKV and
up/gate, the embedding split into `wte.embedding` + `wte.new_embedding`, `vision_backbone.*`);
`ORIGINAL_RENAMES` brings original names to native ones (as transformers' `conversion_mapping.py`,
entry "molmo2"). Qwen3-VL: `model.visual.*` (fused ViT `qkv`, split by rows) and
`model.language_model.*`; `lm_head.weight` is absent when tied (and ignored if present).

Converted checkpoints keep one leaf per layer (`language_model/layers/7/mlp/up_proj/kernel`);
`checkpoint.load_base` stacks them into the scanned layout.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from mrrm_jax import backbones
from mrrm_jax.backbones.molmo2.config import Molmo2Config
from mrrm_jax.backbones.qwen3_vl.config import Qwen3VLConfig

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


# -- Molmo2 ---------------------------------------------------------------------------------------

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

Rows = Callable[[object], tuple[int, int]]
# Each rule: native-name regex -> [(target template, order, rows or None)], transform.
# `{0}`, `{1}` in a template are the regex groups; targets use "/" paths of our tree.
# Transforms: see `TRANSFORMS` ("linear": torch [out, in] -> our [in, out]; "copy": as is; "conv").


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


Rules = list[tuple[str, list[tuple[str, int, Rows | None]], str]]

# The shared Qwen3 decoder (models/decoder.py), in transformers' native names.
DECODER_RULES: Rules = [
    (r"language_model\.embed_tokens\.weight", [("language_model/embed_tokens/embedding", 0, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)\.weight",
     [("language_model/layers/{0}/{1}/scale", 0, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight",
     [("language_model/layers/{0}/{1}/kernel", 0, None)], "linear"),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkv]_proj)\.bias", [("language_model/layers/{0}/{1}/bias", 0, None)], "copy"),
    (r"language_model\.norm\.weight", [("language_model/norm/scale", 0, None)], "copy"),
]

MOLMO2_RULES: Rules = [
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
    *DECODER_RULES,
    # The original layout splits the table in two; transformers' save_pretrained splits it in
    # equal halves rather than base + extra rows, so only the order matters.
    (r"language_model\.wte\.embedding", [("language_model/embed_tokens/embedding", 0, None)], "copy"),
    (r"language_model\.wte\.new_embedding", [("language_model/embed_tokens/embedding", 1, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.self_attn\.att_proj\.weight",
     [(f"language_model/layers/{{0}}/self_attn/{p}_proj/kernel", 0, _qkv(i)) for i, p in enumerate("qkv")], "linear"),
    (r"language_model\.layers\.(\d+)\.self_attn\.att_proj\.bias",
     [(f"language_model/layers/{{0}}/self_attn/{p}_proj/bias", 0, _qkv(i)) for i, p in enumerate("qkv")], "copy"),
    (r"language_model\.layers\.(\d+)\.mlp\.ff_proj\.weight",
     [("language_model/layers/{0}/mlp/up_proj/kernel", 0, _ff_half(0)),
      ("language_model/layers/{0}/mlp/gate_proj/kernel", 0, _ff_half(1))], "linear"),
    (r"lm_head\.weight", [("lm_head/kernel", 0, None)], "linear"),
]


def _molmo2_skipped(name: str, groups: list[str], cfg: Molmo2Config) -> bool:
    """ViT layers deeper than the last feature layer never reach the output."""
    return name.startswith("vision_tower.layers.") and int(groups[0]) >= cfg.vision.num_layers


# -- Qwen3-VL -------------------------------------------------------------------------------------

def _vision_qkv(part: int) -> Rows:
    """Rows of q, k or v inside the ViT's fused `qkv` ([q; k; v], each hidden_size rows)."""
    return lambda cfg: (part * cfg.vision.hidden_size, (part + 1) * cfg.vision.hidden_size)


QWEN3_VL_RULES: Rules = [
    (r"visual\.patch_embed\.proj\.weight", [("visual/patch_embed/kernel", 0, None)], "conv"),
    (r"visual\.patch_embed\.proj\.bias", [("visual/patch_embed/bias", 0, None)], "copy"),
    (r"visual\.pos_embed\.weight", [("visual/pos_embed", 0, None)], "copy"),
    (r"visual\.blocks\.(\d+)\.(norm[12])\.weight", [("visual/layers/{0}/{1}/scale", 0, None)], "copy"),
    (r"visual\.blocks\.(\d+)\.(norm[12])\.bias", [("visual/layers/{0}/{1}/bias", 0, None)], "copy"),
    (r"visual\.blocks\.(\d+)\.attn\.qkv\.weight",
     [(f"visual/layers/{{0}}/attn/{p}_proj/kernel", 0, _vision_qkv(i)) for i, p in enumerate("qkv")], "linear"),
    (r"visual\.blocks\.(\d+)\.attn\.qkv\.bias",
     [(f"visual/layers/{{0}}/attn/{p}_proj/bias", 0, _vision_qkv(i)) for i, p in enumerate("qkv")], "copy"),
    (r"visual\.blocks\.(\d+)\.(attn\.proj|mlp\.linear_fc[12])\.weight", [("visual/layers/{0}/{1}/kernel", 0, None)],
     "linear"),
    (r"visual\.blocks\.(\d+)\.(attn\.proj|mlp\.linear_fc[12])\.bias", [("visual/layers/{0}/{1}/bias", 0, None)], "copy"),
    (r"visual\.merger\.norm\.weight", [("visual/merger/norm/scale", 0, None)], "copy"),
    (r"visual\.merger\.(norm|linear_fc[12])\.bias", [("visual/merger/{0}/bias", 0, None)], "copy"),
    (r"visual\.merger\.(linear_fc[12])\.weight", [("visual/merger/{0}/kernel", 0, None)], "linear"),
    (r"visual\.deepstack_merger_list\.(\d+)\.norm\.weight", [("visual/deepstack_merger_{0}/norm/scale", 0, None)],
     "copy"),
    (r"visual\.deepstack_merger_list\.(\d+)\.(norm|linear_fc[12])\.bias",
     [("visual/deepstack_merger_{0}/{1}/bias", 0, None)], "copy"),
    (r"visual\.deepstack_merger_list\.(\d+)\.(linear_fc[12])\.weight",
     [("visual/deepstack_merger_{0}/{1}/kernel", 0, None)], "linear"),
    *DECODER_RULES,
    (r"lm_head\.weight", [("lm_head/kernel", 0, None)], "linear"),
]


def _qwen3_vl_skipped(name: str, groups: list[str], cfg: Qwen3VLConfig) -> bool:
    """A tied lm_head is the embedding (transformers does not save it; a `.bin` export may)."""
    return name == "lm_head.weight" and cfg.text.tie_word_embeddings


# -- the backbones --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Conversion:
    renames: list[tuple[str, str]]  # checkpoint name (less `model.`) -> native name
    rules: Rules
    skipped: Callable[[str, list[str], object], bool]  # native names matched but not converted


# Keyed by config.json's `model_type` (the original Molmo2 release has none), as `models.backbones`.
CONVERSIONS = {
    "molmo2": Conversion(ORIGINAL_RENAMES, MOLMO2_RULES, _molmo2_skipped),
    "qwen3_vl": Conversion([], QWEN3_VL_RULES, _qwen3_vl_skipped),
}


def native_name(key: str, renames=ORIGINAL_RENAMES) -> str:
    """Strip the `model.` prefix and rename original-layout keys to native ones."""
    key = re.sub(r"^model\.", "", key)
    for pattern, replacement in renames:
        key = re.sub(pattern, replacement, key)
    return key


# A target leaf: its source parts (source key, rows), concatenated along rows, and the transform.
Plan = dict[str, tuple[list[tuple[str, tuple[int, int] | None]], str]]


def plan(source_keys, cfg) -> Plan:
    """Target leaf -> how to build it. Unknown source tensors are an error that names them."""
    table = CONVERSIONS[cfg.model_type]
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
    table = CONVERSIONS[cfg.model_type]
    shards = SafetensorsShards(hf_dir)
    has_lm_head = any(native_name(k, table.renames) == "lm_head.weight" for k in shards.entries)
    cfg = cfg.replace(with_lm_head=has_lm_head and not table.skipped("lm_head.weight", [], cfg))
    return checkpoint.save_base(out_dir, cfg, converted_leaves(shards, cfg, dtype=dtype))
