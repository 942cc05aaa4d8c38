"""Flax port of the Molmo2 vision-language model."""

from mrrm_jax.backbones.molmo2.config import AdapterConfig, Molmo2Config, TextConfig, VisionConfig
from mrrm_jax.backbones.molmo2.model import Molmo2

__all__ = ["AdapterConfig", "Molmo2", "Molmo2Config", "TextConfig", "VisionConfig"]
