"""The backbones a reward model sits on, chosen by name (`config.model.type`, a checkpoint's config).

A backbone is a config class and a Flax module built from it, whose `__call__(batch)` returns the
final-norm hidden states [B, T, D]. What sits above it (the value head, LoRA, the step, the trainer,
scoring) reads only `config.text.hidden_size` and the batch: nothing there branches on the model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from mrrm_jax.models import molmo2
from mrrm_jax.models.molmo2 import model as molmo2_model


@dataclasses.dataclass(frozen=True)
class Backbone:
    config_class: type
    module_class: Callable[..., nn.Module]
    # (module, params, batch, vision_chunk) -> hidden states: the forward pass scoring runs, which may
    # run the vision tower `vision_chunk` crops/frames at a time.
    hidden_states: Callable


BACKBONES = {"molmo2": Backbone(molmo2.Molmo2Config, molmo2.Molmo2, molmo2_model.hidden_states)}


def name_of(config) -> str:
    for name, backbone in BACKBONES.items():
        if isinstance(config, backbone.config_class):
            return name
    raise TypeError(f"{type(config).__name__} is not a backbone config; known: {sorted(BACKBONES)}")


def module(config) -> nn.Module:
    return BACKBONES[name_of(config)].module_class(config)


def init_batch(config) -> dict:
    """The smallest batch whose forward pass creates every parameter of `config`'s backbone."""
    return BACKBONES[name_of(config)].module_class.init_batch(config)


def hidden_states(model: nn.Module, params: dict, batch: dict, vision_chunk: int):
    """Final-norm hidden states of `batch` as scoring computes them (see `Backbone.hidden_states`)."""
    return BACKBONES[name_of(model.config)].hidden_states(model, params, batch, vision_chunk)
