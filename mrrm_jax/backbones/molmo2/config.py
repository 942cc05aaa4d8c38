"""Molmo2 configuration: frozen dataclasses, presets, and parsing of a checkpoint's `config.json`.

`Molmo2Config.from_hf_dict` reads both layouts that `transformers.Molmo2Config` accepts: the
transformers one (`vision_config` / `adapter_config` / `text_config`) and the original release's
(`vit_config`, `image_*` and `vit_layers` keys, `qkv_bias`, `layer_norm_eps`, flat `rope_theta`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, ClassVar

from mrrm_jax.models.hf_config import build, tupled

MODEL_TYPE = "molmo2"

# Molmo2's extra vocabulary, in the order of the released tokenizer (ids 151936..151945).
EXTRA_TOKENS = (
    "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>",
    "<|image|>", "<im_low>", "<frame_start>", "<frame_end>", "<|video|>",
)
# The tokens `Molmo2Processor` marks with mm_token_type_ids == 1: they form the bidirectional
# image block of the attention mask (everything but the `<|image|>` / `<|video|>` prompts).
VISION_BLOCK_TOKENS = (
    "<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>",
    "<frame_start>", "<im_end>", "<frame_end>", "<im_low>",
)


def _default_vision_token_ids(base: int = 151936) -> tuple[int, ...]:
    return tuple(sorted(base + EXTRA_TOKENS.index(t) for t in VISION_BLOCK_TOKENS))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 25
    num_heads: int = 16
    head_dim: int = 72
    layer_norm_eps: float = 1e-6
    patch_size: int = 14
    image_size: tuple[int, int] = (378, 378)
    num_channels: int = 3
    attention_bias: bool = True
    # The processor's normalisation, which the ViT applies to uint8 crops (vision.py): not in a
    # checkpoint's config.json but in its processor's, so the loaders set it from the processor that
    # makes the batches (`backbones.with_processor`).
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @property
    def num_patches(self) -> int:
        return (self.image_size[0] // self.patch_size) * (self.image_size[1] // self.patch_size)

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.num_channels


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    # ViT layers (0-based, non-negative) whose outputs are concatenated, in this order.
    feature_layers: tuple[int, ...] = (24, 18)
    hidden_size: int = 1152
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 72
    attention_bias: bool = True
    intermediate_size: int = 9728
    mlp_bias: bool = False


@dataclasses.dataclass(frozen=True)
class TextConfig:
    hidden_size: int = 2560
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    vocab_size: int = 151936
    additional_vocab_size: int = 128
    attention_bias: bool = False
    qk_norm_type: str = "qwen3"  # "qwen3": per-head RMSNorm; "olmo": over the whole projection
    rms_norm_eps: float = 1e-6
    norm_after: bool = False
    max_position_embeddings: int = 36864
    # The `rope_parameters` dict as sorted (key, value) pairs, so the config stays hashable.
    rope: tuple[tuple[str, Any], ...] = (("rope_theta", 5e6), ("rope_type", "default"))
    rope_scaling_layers: tuple[int, ...] | None = None  # None: every layer uses the scaled rope
    # Recorded only: transformers' Molmo2 never ties its lm_head to the embedding (see model.py).
    tie_word_embeddings: bool = False

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.additional_vocab_size

    @property
    def scaled_rope_layers(self) -> tuple[bool, ...]:
        layers = range(self.num_layers) if self.rope_scaling_layers is None else self.rope_scaling_layers
        return tuple(i in layers for i in range(self.num_layers))


@dataclasses.dataclass(frozen=True)
class Molmo2Config:
    vision: VisionConfig = VisionConfig()
    adapter: AdapterConfig = AdapterConfig()
    text: TextConfig = TextConfig()
    image_patch_id: int = 151938
    vision_token_ids: tuple[int, ...] = _default_vision_token_ids()
    # Runtime choices (not part of the checkpoint's architecture).
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch": see language.py
    attention: str = "xla"  # attention backend, see models/attention.py
    # Layers unrolled per scan step. 1 compiles fastest; a full unroll lets XLA's cost analysis
    # (which counts a loop body once) see every layer, and can help scheduling on small models.
    scan_unroll: int = 1
    with_lm_head: bool = True  # the reward path never uses it (design decision 8)

    model_type = MODEL_TYPE  # class constant, recorded in to_json

    def replace(self, **changes) -> Molmo2Config:
        return dataclasses.replace(self, **changes)

    def shallow(self, vision_layers: int, text_layers: int) -> Molmo2Config:
        """This model with fewer layers, unrolled (aot.step_costs); the ViT's feature layers moved to its last ones."""
        features = tuple(vision_layers - 1 - rank for rank in range(len(self.adapter.feature_layers)))
        return self.replace(vision=dataclasses.replace(self.vision, num_layers=vision_layers),
                            adapter=dataclasses.replace(self.adapter, feature_layers=features),
                            text=dataclasses.replace(self.text, num_layers=text_layers),
                            scan_unroll=max(vision_layers, text_layers))

    @property
    def layer_counts(self) -> dict[str, int]:
        """Scanned stacks of the parameter tree -> their layer counts (backbones/checkpoint.py stacks by this)."""
        return {"vision_tower": self.vision.num_layers, "language_model": self.text.num_layers}

    # -- presets -------------------------------------------------------------------------
    PRESETS: ClassVar[tuple[str, ...]] = ("molmo2_4b", "molmo2_8b")

    @classmethod
    def molmo2_4b(cls, **runtime) -> Molmo2Config:
        """allenai/Molmo2-4B (Qwen3-4B language model), dimensions from its config.json."""
        return cls(**runtime)

    @classmethod
    def molmo2_8b(cls, **runtime) -> Molmo2Config:
        """allenai/Molmo2-8B (Qwen3-8B language model)."""
        text = TextConfig(hidden_size=4096, intermediate_size=12288, rope=(("rope_theta", 1e6), ("rope_type", "default")))
        adapter = AdapterConfig(intermediate_size=12288)
        return cls(text=text, adapter=adapter, **runtime)

    @classmethod
    def from_dims(cls, dims: dict, **runtime) -> Molmo2Config:
        """From `config.model.dims`: {"vision": {...}, "adapter": {...}, "text": {...}} field values."""
        return cls(vision=VisionConfig(**dims["vision"]), adapter=AdapterConfig(**dims["adapter"]),
                   text=TextConfig(**dims["text"]), **runtime)

    # -- serialisation -----------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"model_type": MODEL_TYPE, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Molmo2Config:
        raw = json.loads(text)
        model_type = raw.pop("model_type", MODEL_TYPE)  # files written before it was recorded: Molmo2
        if model_type != MODEL_TYPE:
            raise ValueError(f"config has model_type={model_type!r}, not {MODEL_TYPE!r}")
        sub = {"vision": VisionConfig, "adapter": AdapterConfig, "text": TextConfig}
        fields = {}
        for name, value in raw.items():
            if name in sub:
                value = sub[name](**{k: tupled(v) for k, v in value.items()})
            fields[name] = tupled(value)
        return cls(**fields)

    @classmethod
    def from_hf_dir(cls, hf_dir: str | pathlib.Path, **runtime) -> Molmo2Config:
        path = pathlib.Path(hf_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json; pass a Molmo2 checkpoint directory")
        return cls.from_hf_dict(json.loads(path.read_text()), **runtime)

    @classmethod
    def from_hf_dict(cls, hf: dict, **runtime) -> Molmo2Config:
        if hf.get("model_type") not in (None, MODEL_TYPE):
            raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; this port reads Molmo2 only")
        vision_raw = _renamed(hf.get("vision_config") or hf.get("vit_config") or {}, _VISION_ALIASES)
        adapter_raw = _renamed(hf.get("adapter_config") or {}, _ADAPTER_ALIASES)
        text_raw = _renamed(hf.get("text_config") or {}, _TEXT_ALIASES)

        vision = build(VisionConfig, vision_raw, _VISION_FIELDS)
        if vision_raw.get("num_key_value_heads", vision.num_heads) != vision.num_heads:
            raise ValueError("the ViT port assumes num_key_value_heads == num_attention_heads")
        if "image_size" in vision_raw:
            vision = dataclasses.replace(vision, image_size=tuple(vision_raw["image_size"]))
        num_pos = vision_raw.get("num_position_embeddings")
        if num_pos is not None and num_pos != vision.num_patches:
            raise ValueError(f"vision num_position_embeddings={num_pos} != patches per crop {vision.num_patches}")

        declared_layers = vision.num_layers
        feature_layers = tuple(adapter_raw.get("vision_feature_layer", (24, 18)))
        if not all(-declared_layers <= i < declared_layers for i in feature_layers):
            raise ValueError(f"vision_feature_layer {feature_layers} must index the {declared_layers} ViT layers")
        feature_layers = tuple(i % declared_layers for i in feature_layers)
        # Layers after the deepest feature layer never reach the output, so they are not kept.
        # (transformers trims them too, but only for the legacy layout; the numbers are identical.)
        vision = dataclasses.replace(vision, num_layers=max(feature_layers) + 1)

        adapter = build(AdapterConfig, adapter_raw, _ADAPTER_FIELDS)
        adapter = dataclasses.replace(adapter, feature_layers=feature_layers)

        text = build(TextConfig, text_raw, _TEXT_FIELDS)
        rope = dict(text_raw.get("rope_parameters") or {})
        if not rope:  # legacy flat keys
            rope = dict(text_raw.get("rope_scaling") or {})
            rope.setdefault("rope_theta", text_raw.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        layers = text_raw.get("rope_scaling_layers")
        text = dataclasses.replace(
            text,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings") or text.tie_word_embeddings),
            rope=tuple(sorted((k, tupled(v)) for k, v in rope.items())),
            rope_scaling_layers=None if layers is None else tuple(layers),
        )
        if text.qk_norm_type not in ("qwen3", "olmo"):
            raise ValueError(f"text_config.qk_norm_type={text.qk_norm_type!r}: expected 'qwen3' or 'olmo'")
        if text_raw.get("hidden_act", "silu") != "silu" or vision_raw.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError("only silu (LM, adapter) and gelu_pytorch_tanh (ViT) activations are ported")

        base = hf.get("image_start_token_id", 151936)
        token_ids = {
            "image_patch_id": hf.get("image_patch_id", base + EXTRA_TOKENS.index("<im_patch>")),
            "vision_token_ids": _default_vision_token_ids(base),
        }
        return cls(vision=vision, adapter=adapter, text=text, **token_ids, **runtime)


# Legacy-release key -> transformers key, per sub-config (mirrors Molmo2*Config.__post_init__).
_VISION_ALIASES = {"image_default_input_size": "image_size", "image_patch_size": "patch_size",
                   "image_num_pos": "num_position_embeddings"}
_ADAPTER_ALIASES = {"vit_layers": "vision_feature_layer"}
_TEXT_ALIASES = {"qkv_bias": "attention_bias", "layer_norm_eps": "rms_norm_eps"}

# transformers key -> our field, per sub-config.
_VISION_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
                  "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "head_dim": "head_dim",
                  "layer_norm_eps": "layer_norm_eps", "patch_size": "patch_size", "num_channels": "num_channels",
                  "attention_bias": "attention_bias"}
_ADAPTER_FIELDS = {"hidden_size": "hidden_size", "num_attention_heads": "num_heads",
                   "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "attention_bias": "attention_bias",
                   "intermediate_size": "intermediate_size", "mlp_bias": "mlp_bias"}
_TEXT_FIELDS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size",
                "vocab_size": "vocab_size", "additional_vocab_size": "additional_vocab_size",
                "attention_bias": "attention_bias", "qk_norm_type": "qk_norm_type", "rms_norm_eps": "rms_norm_eps",
                "norm_after": "norm_after", "max_position_embeddings": "max_position_embeddings",
                "tie_word_embeddings": "tie_word_embeddings"}


def _renamed(raw: dict, aliases: dict) -> dict:
    return {aliases.get(k, k): v for k, v in raw.items()}
