"""Qwen3-VL's Hugging Face checkpoints -> our parameter tree: the rules `interop/convert.py` applies.

`model.visual.*` (the ViT's fused `qkv` split by rows, the Conv3d patch embedding flattened) and
`model.language_model.*` (the shared decoder); `lm_head.weight` is absent when tied, and ignored if present.
"""

from __future__ import annotations

from mrrm_jax.backbones.qwen3_vl.config import Qwen3VLConfig
from mrrm_jax.models.hf_conversion import DECODER_PEFT_MODULES, DECODER_RULES, Conversion, Rows, Rules


def _vision_qkv(part: int) -> Rows:
    """Rows of q, k or v inside the ViT's fused `qkv` ([q; k; v], each hidden_size rows)."""
    return lambda cfg: (part * cfg.vision.hidden_size, (part + 1) * cfg.vision.hidden_size)


RULES: Rules = [
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


def _skipped(name: str, groups: list[str], cfg: Qwen3VLConfig) -> bool:
    """A tied lm_head is the embedding (transformers does not save it; a `.bin` export may)."""
    return name == "lm_head.weight" and cfg.text.tie_word_embeddings


CONVERSION = Conversion([], RULES, _skipped, {"native": DECODER_PEFT_MODULES})
