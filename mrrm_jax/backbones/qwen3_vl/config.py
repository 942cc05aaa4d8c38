"""Qwen3-VL configuration: frozen dataclasses, the 4B preset, and parsing of a checkpoint's `config.json`.

`Qwen3VLConfig.from_hf_dict` reads the layout transformers 5 writes (`rope_parameters`) and the one
of the released checkpoints (transformers 4.57: `rope_scaling` + a flat `rope_theta`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import ClassVar

from mrrm_jax.models.hf_config import build, tupled

MODEL_TYPE = "qwen3_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_channels: int = 3
    num_position_embeddings: int = 2304  # a learned 48 x 48 grid, resampled to each image
    deepstack_layers: tuple[int, ...] = (5, 11, 17)  # ViT blocks whose outputs feed the LM's first layers
    out_hidden_size: int = 2560
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6  # hard-coded in transformers (not read from config.json)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """One patch vector: (C, T, p, p) flattened, the processor's layout."""
        return self.num_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)

    @property
    def merge_unit(self) -> int:
        """Patches per LM token."""
        return self.spatial_merge_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    hidden_size: int = 2560
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 9728
    vocab_size: int = 151936
    attention_bias: bool = False
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 262144
    rope_theta: float = 5e6
    mrope_section: tuple[int, int, int] = (24, 20, 20)  # frequencies per (t, h, w), interleaved
    tie_word_embeddings: bool = True
    # The shared decoder's switches (models/decoder.py), fixed for Qwen3.
    qk_norm_type: str = "qwen3"
    norm_after: bool = False

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size


@dataclasses.dataclass(frozen=True)
class Qwen3VLConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655  # <|image_pad|>
    video_token_id: int = 151656  # <|video_pad|>
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    # Runtime choices (not part of the checkpoint's architecture), named as in Molmo2Config.
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch": see models/decoder.py
    attention: str = "xla"  # attention backend, see models/attention.py
    scan_unroll: int = 1
    with_lm_head: bool = True  # an untied lm_head; the reward path never uses it

    model_type = MODEL_TYPE  # class constant, recorded in to_json

    def replace(self, **changes) -> Qwen3VLConfig:
        return dataclasses.replace(self, **changes)

    @property
    def layer_counts(self) -> dict[str, int]:
        """Scanned stacks of the parameter tree -> their layer counts (backbones/checkpoint.py stacks by this)."""
        return {"visual": self.vision.num_layers, "language_model": self.text.num_layers}

    def shallow(self, vision_layers: int, text_layers: int) -> Qwen3VLConfig:
        """This model with fewer layers, unrolled (aot.step_costs); the deepstack taps, as many as before,
        moved onto the remaining ViT layers (their mergers cost the same wherever they tap)."""
        deepstack = tuple(min(layer, vision_layers - 1) for layer in self.vision.deepstack_layers)
        return self.replace(vision=dataclasses.replace(self.vision, num_layers=vision_layers, deepstack_layers=deepstack),
                            text=dataclasses.replace(self.text, num_layers=text_layers),
                            scan_unroll=max(vision_layers, text_layers))

    # -- presets -------------------------------------------------------------------------
    PRESETS: ClassVar[tuple[str, ...]] = ("qwen3_vl_4b",)

    @classmethod
    def from_dims(cls, dims: dict, **runtime) -> Qwen3VLConfig:
        """From `config.model.dims`: {"vision": {...}, "text": {...}} field values."""
        return cls(vision=VisionConfig(**dims["vision"]), text=TextConfig(**dims["text"]), **runtime)

    @classmethod
    def qwen3_vl_4b(cls, **runtime) -> Qwen3VLConfig:
        """Qwen/Qwen3-VL-4B-Instruct, dimensions from its config.json."""
        return cls(**runtime)

    # -- serialisation -----------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"model_type": MODEL_TYPE, **dataclasses.asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Qwen3VLConfig:
        raw = json.loads(text)
        model_type = raw.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"config has model_type={model_type!r}, not {MODEL_TYPE!r}")
        sub = {"vision": VisionConfig, "text": TextConfig}
        return cls(**{k: sub[k](**{f: tupled(v) for f, v in val.items()}) if k in sub else tupled(val)
                      for k, val in raw.items()})

    @classmethod
    def from_hf_dir(cls, hf_dir: str | pathlib.Path, **runtime) -> Qwen3VLConfig:
        path = pathlib.Path(hf_dir) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json; pass a Qwen3-VL checkpoint directory")
        return cls.from_hf_dict(json.loads(path.read_text()), **runtime)

    @classmethod
    def from_hf_dict(cls, hf: dict, **runtime) -> Qwen3VLConfig:
        if hf.get("model_type") != MODEL_TYPE:
            raise ValueError(f"config.json has model_type={hf.get('model_type')!r}; expected {MODEL_TYPE!r}")
        vision_raw, text_raw = hf.get("vision_config") or {}, hf.get("text_config") or {}
        vision = build(VisionConfig, vision_raw, _VISION_FIELDS)
        vision_rope = vision_raw.get("rope_parameters") or {}
        vision = dataclasses.replace(vision, rope_theta=vision_rope.get("rope_theta", vision.rope_theta))
        if vision.grid_side ** 2 != vision.num_position_embeddings:
            raise ValueError(f"vision_config.num_position_embeddings={vision.num_position_embeddings} is not a square")

        text = build(TextConfig, text_raw, _TEXT_FIELDS)
        rope = dict(text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or {})
        rope.setdefault("rope_theta", text_raw.get("rope_theta", text.rope_theta))
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"text_config rope_type={rope.get('rope_type')!r}: only 'default' M-RoPE is ported")
        text = dataclasses.replace(
            text, rope_theta=rope["rope_theta"], mrope_section=tuple(rope.get("mrope_section", text.mrope_section)),
            # transformers ties the lm_head by the TOP-LEVEL flag (`Qwen3VLConfig.tie_word_embeddings`).
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if sum(text.mrope_section) != text.head_dim // 2:
            raise ValueError(f"mrope_section {text.mrope_section} must sum to head_dim / 2 = {text.head_dim // 2}")
        if text_raw.get("hidden_act", "silu") != "silu" or vision_raw.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError("only silu (LM) and gelu_pytorch_tanh (ViT) activations are ported")
        if vision.out_hidden_size != text.hidden_size:
            raise ValueError(f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size {text.hidden_size}")
        tokens = {f: hf[f] for f in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id") if f in hf}
        return cls(vision=vision, text=text, **tokens, **runtime)


# transformers key -> our field, per sub-config.
_VISION_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size", "depth": "num_layers",
                  "num_heads": "num_heads", "patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
                  "spatial_merge_size": "spatial_merge_size", "in_channels": "num_channels",
                  "num_position_embeddings": "num_position_embeddings",
                  "deepstack_visual_indexes": "deepstack_layers", "out_hidden_size": "out_hidden_size"}
_TEXT_FIELDS = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
                "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size",
                "vocab_size": "vocab_size", "attention_bias": "attention_bias", "rms_norm_eps": "rms_norm_eps",
                "max_position_embeddings": "max_position_embeddings"}
