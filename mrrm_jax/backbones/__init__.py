"""The backbones a reward model sits on, chosen by name: `config.model.type`, the `model_type` of a
converted checkpoint's or a Hugging Face checkpoint's config.json, or the processor class a processor
directory names.

A backbone is one folder (`backbones/<name>/`: config, model parts, processor, preprocessing, processor
files, packed-row media, conversion rules) and one row of `BACKBONES`. Its Flax module's
`__call__(batch)` returns the final-norm hidden states [B, T, D]; what sits above it (the value head,
LoRA, the step, the trainer, scoring) reads only `config.text.hidden_size` and the batch, and asks this
table for everything else: nothing outside it branches on the model (docs/backbones.md).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn

from mrrm_jax.backbones import molmo2
from mrrm_jax.backbones import qwen3_vl
from mrrm_jax.backbones.molmo2 import conversion as molmo2_conversion
from mrrm_jax.backbones.molmo2 import model as molmo2_model
from mrrm_jax.backbones.molmo2 import packing as molmo2_packing
from mrrm_jax.backbones.molmo2 import processor as molmo2_processor
from mrrm_jax.backbones.molmo2 import processor_files as molmo2_files
from mrrm_jax.backbones.qwen3_vl import conversion as qwen3_vl_conversion
from mrrm_jax.backbones.qwen3_vl import packing as qwen3_vl_packing
from mrrm_jax.backbones.qwen3_vl import processor as qwen3_vl_processor
from mrrm_jax.backbones.qwen3_vl import processor_files as qwen3_vl_files
from mrrm_jax.data import formatting, processor_dir
from mrrm_jax.models.hf_conversion import Conversion


@dataclasses.dataclass(frozen=True)
class Backbone:
    config_class: type
    module_class: Callable[..., nn.Module]
    # (module, params, batch, vision_chunk, groups) -> hidden states: the forward pass scoring runs, which
    # may run the vision tower `vision_chunk` crops/frames at a time (None: its own choice), over
    # `groups` groups of rows (one per device).
    hidden_states: Callable
    conversion: Conversion  # Hugging Face checkpoint names -> our tree, and PEFT's names (`<name>/conversion.py`)
    media: Callable  # config -> the packed rows' media layout (`<name>/packing.py`)
    processor_class: str  # the class name its processor directories carry (`processor_config.json`)
    load_processor: Callable  # (directory, tokenizer) -> its processor (`<name>/processor.py`, no torch)
    # (out directory, **`processor.kwargs`) -> the processor a run writes when it has none (the demos).
    write_processor: Callable
    # (config, processor) -> the config with what the model takes from the processor that makes its batches.
    with_processor: Callable = lambda config, processor: config


def _whole(model: nn.Module, params: dict, batch: dict, vision_chunk: int | None, groups: int):
    return model.apply({"params": params}, batch)


BACKBONES = {
    "molmo2": Backbone(molmo2.Molmo2Config, molmo2.Molmo2, molmo2_model.hidden_states, molmo2_conversion.CONVERSION,
                       lambda c: molmo2_packing.Molmo2Media((c.vision.num_patches, c.vision.patch_dim)),
                       "Molmo2Processor", molmo2_processor.load, molmo2_files.write_for_run,
                       lambda c, p: c.replace(vision=dataclasses.replace(c.vision, image_mean=p.options.mean,
                                                                         image_std=p.options.std))),
    "qwen3_vl": Backbone(qwen3_vl.Qwen3VLConfig, qwen3_vl.Qwen3VL, _whole, qwen3_vl_conversion.CONVERSION,
                         lambda c: qwen3_vl_packing.Qwen3VLMedia(c.vision.patch_dim),
                         qwen3_vl_processor.PROCESSOR_CLASS, qwen3_vl_processor.load, qwen3_vl_files.write_for_run),
}
# What a config.json or processor directory that names no backbone is: the original Molmo2 release.
UNNAMED = "molmo2"


def model_type(config_json: dict) -> str:
    """The backbone a config.json describes; the original Molmo2 release names none."""
    name = config_json.get("model_type") or UNNAMED
    if name not in BACKBONES:
        raise ValueError(f"config.json has model_type={name!r}; supported: {sorted(BACKBONES)}")
    return name


def load_processor(directory):
    """The processor of a checkpoint or processor directory (no torch), by the class its files name, on
    the directory's tokenizer with `<|resp_sep|>` (`formatting.load_tokenizer`)."""
    named = processor_dir.processor_class(directory) or BACKBONES[UNNAMED].processor_class
    for backbone in BACKBONES.values():
        if backbone.processor_class == named:
            return backbone.load_processor(directory, formatting.load_tokenizer(directory))
    raise ValueError(f"{directory}: processor_class={named!r}; supported: "
                     f"{sorted(b.processor_class for b in BACKBONES.values())}")


def write_processor(name: str, out, **settings):
    """Backbone `name`'s processor directory at `out`, from a run's `processor.kwargs`."""
    return BACKBONES[name].write_processor(out, **settings)


def module(config) -> nn.Module:
    return BACKBONES[config.model_type].module_class(config)


def media(config):
    """How `config`'s media sit in a packed row (`data/packing.py` packs the rest)."""
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
