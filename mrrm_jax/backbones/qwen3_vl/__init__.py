"""Flax port of the Qwen3-VL vision-language model (transformers' `Qwen3VLModel`)."""

from mrrm_jax.backbones.qwen3_vl.config import Qwen3VLConfig, TextConfig, VisionConfig
from mrrm_jax.backbones.qwen3_vl.model import Qwen3VL

__all__ = ["Qwen3VL", "Qwen3VLConfig", "TextConfig", "VisionConfig"]
