"""The backbones a reward model sits on, chosen by name: `config.model.type`, the `model_type` of a
converted checkpoint's or a Hugging Face checkpoint's config.json.

A backbone is a config class and a Flax module built from it, whose `__call__(batch)` returns the
final-norm hidden states [B, T, D]. What sits above it (the value head, LoRA, the step, the trainer,
scoring) reads only `config.text.hidden_size` and the batch: nothing there branches on the model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from mrrm_jax.data import packing
from mrrm_jax.backbones import molmo2
from mrrm_jax.backbones import qwen3_vl
from mrrm_jax.backbones.molmo2 import model as molmo2_model


@dataclasses.dataclass(frozen=True)
class Backbone:
    config_class: type
    module_class: Callable[..., nn.Module]
    # (module, params, batch, vision_chunk, groups) -> hidden states: the forward pass scoring runs, which
    # may run the vision tower `vision_chunk` crops/frames at a time (None: its own choice), over
    # `groups` groups of rows (one per device).
    hidden_states: Callable
    media: Callable  # config -> the packed rows' media layout (`data.packing.Molmo2Media` / `Qwen3VLMedia`)
    # (config, processor) -> the config with what the model takes from the processor that makes its batches.
    with_processor: Callable = lambda config, processor: config


def _whole(model: nn.Module, params: dict, batch: dict, vision_chunk: int | None, groups: int):
    return model.apply({"params": params}, batch)


BACKBONES = {
    "molmo2": Backbone(molmo2.Molmo2Config, molmo2.Molmo2, molmo2_model.hidden_states,
                       lambda c: packing.Molmo2Media((c.vision.num_patches, c.vision.patch_dim)),
                       lambda c, p: c.replace(vision=dataclasses.replace(c.vision, image_mean=p.options.mean,
                                                                         image_std=p.options.std))),
    "qwen3_vl": Backbone(qwen3_vl.Qwen3VLConfig, qwen3_vl.Qwen3VL, _whole,
                         lambda c: packing.Qwen3VLMedia(c.vision.patch_dim)),
}


def model_type(config_json: dict) -> str:
    """The backbone a config.json describes; the original Molmo2 release names none."""
    name = config_json.get("model_type") or "molmo2"
    if name not in BACKBONES:
        raise ValueError(f"config.json has model_type={name!r}; supported: {sorted(BACKBONES)}")
    return name


def module(config) -> nn.Module:
    return BACKBONES[config.model_type].module_class(config)


def media(config):
    """How `config`'s media sit in a packed row (`data/packing.py`)."""
    return BACKBONES[config.model_type].media(config)


def with_processor(config, processor):
    """`config` with the settings its model takes from `processor` (Molmo2: the pixel normalisation of the
    uint8 crops the processor makes). Every loader that pairs a model with a processor calls it."""
    return BACKBONES[config.model_type].with_processor(config, processor)


def init_batch(config) -> dict:
    """The smallest batch whose forward pass creates every parameter of `config`'s backbone."""
    return BACKBONES[config.model_type].module_class.init_batch(config)


def hidden_states(model: nn.Module, params: dict, batch: dict, vision_chunk: int | None, groups: int = 1):
    """Final-norm hidden states of `batch` as scoring computes them (see `Backbone.hidden_states`)."""
    return BACKBONES[model.config.model_type].hidden_states(model, params, batch, vision_chunk, groups)
