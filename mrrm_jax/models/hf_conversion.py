"""What a backbone's conversion table holds (`Conversion`, read by `interop/convert.py`), and the rows the
backbones share: the Qwen3 decoder's (`models/decoder.py`) weights and LoRA modules in transformers'
native names."""

from __future__ import annotations

import dataclasses
from typing import Callable

# Each rule: native-name regex -> [(target template, order, rows or None)], transform. `{0}`, `{1}` in a
# template are the regex groups; targets are "/" paths of our tree. A target is its sources' rows
# concatenated in `order`, then transformed: "linear" (torch [out, in] -> our [in, out]), "copy", "conv"
# (a Conv3d weight [out, C, T, p, p] -> [C*T*p*p, out]). `rows(config)` -> (start, stop) reads only part of
# a fused source tensor.
Rows = Callable[[object], tuple[int, int]]
Rules = list[tuple[str, list[tuple[str, int, Rows | None]], str]]


@dataclasses.dataclass(frozen=True)
class Conversion:
    renames: list[tuple[str, str]]  # checkpoint name (less `model.`) -> native name, applied in order
    rules: Rules
    skipped: Callable[[str, list[str], object], bool]  # (native name, groups, config): matched, not converted
    # PEFT export layout -> module name templates ({} = layer index) of the LM projections it writes.
    peft_modules: dict[str, tuple[str, ...]]


DECODER_RULES: Rules = [
    (r"language_model\.embed_tokens\.weight", [("language_model/embed_tokens/embedding", 0, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)\.weight",
     [("language_model/layers/{0}/{1}/scale", 0, None)], "copy"),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight",
     [("language_model/layers/{0}/{1}/kernel", 0, None)], "linear"),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkv]_proj)\.bias", [("language_model/layers/{0}/{1}/bias", 0, None)], "copy"),
    (r"language_model\.norm\.weight", [("language_model/norm/scale", 0, None)], "copy"),
]

# transformers names the decoder's projections alike in Molmo2 and Qwen3-VL.
DECODER_PEFT_MODULES = tuple(f"model.language_model.layers.{{}}.{m}" for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
