"""The PyTorch oracle: tiny random transformers Molmo2 models, and HF inputs -> our batch layout."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import torch
from transformers import AutoProcessor
from transformers import Molmo2Config as HFMolmo2Config
from transformers import Molmo2ForConditionalGeneration

from mrrm_jax.interop import convert
from mrrm_jax.backbones.molmo2 import preprocess

# torch's bilinear resize takes another kernel, which rounds differently, when it runs on one thread;
# our exact port follows the multi-threaded one (torch's default on any machine with 2+ cores).
torch.set_num_threads(max(2, torch.get_num_threads()))

# Small crops (9 x 9 patches) keep the ViT cheap; 9 is odd, so 2x2 pooling has empty (-1) slots.
CROP = 126
PROCESSOR_KWARGS = dict(
    image_processor_kwargs=dict(size={"height": CROP, "width": CROP}, max_crops=4, overlap_margins=[2, 2]),
    video_processor_kwargs=dict(size={"height": CROP, "width": CROP}, num_frames=4, max_fps=2),
)


def hf_processor(processor, tmp_dir: pathlib.Path):
    """transformers' own `Molmo2Processor` (torchvision image/video processors) on the files of our
    `processor`, `<|resp_sep|>` included: the oracle for our torch-free processor and preprocessing."""
    return AutoProcessor.from_pretrained(processor.save_pretrained(tmp_dir))


def as_transformers(processor, outputs: dict) -> dict:
    """Our processor's outputs as transformers' `Molmo2Processor` returns them: its uint8 pixels
    normalised (our model batches keep the pixels and the ViT normalises them)."""
    options = processor.options
    return {k: preprocess.normalize(v, options.mean, options.std) if k.startswith("pixel_values") else v
            for k, v in outputs.items()}


def tiny_hf_config(**text_overrides) -> HFMolmo2Config:
    text = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                intermediate_size=80, vocab_size=151936, additional_vocab_size=128, attention_bias=True,
                rope_parameters=dict(rope_type="yarn", rope_theta=50000.0, factor=4.0,
                                     original_max_position_embeddings=64),
                rope_scaling_layers=[0, 2])
    text.update(text_overrides)
    return HFMolmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, image_size=[CROP, CROP]),
        adapter_config=dict(vision_feature_layer=[-2, -4], hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16, intermediate_size=40,
                            text_hidden_size=text["hidden_size"]),
        text_config=text,
    )


@dataclasses.dataclass
class TinyModels:
    torch_model: Molmo2ForConditionalGeneration
    native_dir: pathlib.Path  # transformers-native safetensors
    original_dir: pathlib.Path  # original release layout (save_pretrained's default)
    converted_native: pathlib.Path
    converted_original: pathlib.Path


def make_tiny_models(root: pathlib.Path, seed: int = 0, **text_overrides) -> TinyModels:
    torch.manual_seed(seed)
    model = Molmo2ForConditionalGeneration(tiny_hf_config(**text_overrides)).eval()
    # Norm weights start at exactly 1; randomise them so a mis-mapped norm cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    native, original = root / "hf_native", root / "hf_original"
    model.save_pretrained(native, save_original_format=False)
    model.save_pretrained(original)
    return TinyModels(model, native, original, convert.convert_dir(native, root / "ours_native"),
                      convert.convert_dir(original, root / "ours_original"))


def hf_forward(model, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(final-norm hidden states, logits) of the PyTorch model, float32 numpy."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1].float().numpy(), out.logits.float().numpy()
