"""Molmo2's Hugging Face checkpoints -> our parameter tree: the rules `interop/convert.py` applies.

Two layouts convert: transformers' native one (`model.language_model.layers.N.self_attn.q_proj...`)
and the ORIGINAL release's (`model.transformer.blocks.N.self_attn.att_proj`: fused QKV and up/gate, the
embedding split into `wte.embedding` + `wte.new_embedding`, `vision_backbone.*`). `RENAMES` brings
original names to native ones, as transformers' `conversion_mapping.py` (entry "molmo2") does; the fused
tensors are split by reading only the rows each target needs.
"""

from __future__ import annotations

from mrrm_jax.backbones.molmo2.config import Molmo2Config
from mrrm_jax.models.hf_conversion import DECODER_PEFT_MODULES, DECODER_RULES, Conversion, Rows, Rules

# Original release name -> native name (the same renames as transformers' conversion_mapping).
RENAMES = [
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


RULES: Rules = [
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


def _skipped(name: str, groups: list[str], cfg: Molmo2Config) -> bool:
    """ViT layers deeper than the last feature layer never reach the output."""
    return name.startswith("vision_tower.layers.") and int(groups[0]) >= cfg.vision.num_layers


CONVERSION = Conversion(RENAMES, RULES, _skipped, {
    "native": DECODER_PEFT_MODULES,
    # the original code's module names: fused att_proj and ff_proj (one LoRA over q, k, v / up, gate)
    "original": tuple(f"model.transformer.blocks.{{}}.{m}" for m in (
        "self_attn.att_proj", "self_attn.attn_out", "mlp.ff_proj", "mlp.ff_out")),
})
