"""The PyTorch oracle: tiny random transformers Molmo2 models, and HF inputs -> our batch layout."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import torch
from transformers import Molmo2Config as HFMolmo2Config
from transformers import Molmo2ForConditionalGeneration

from mrrm_jax import checkpoint, convert
from mrrm_jax.models.molmo2 import Molmo2Config

# Small crops (9 x 9 patches) keep the ViT cheap; 9 is odd, so 2x2 pooling has empty (-1) slots.
CROP = 126
PROCESSOR_KWARGS = dict(
    image_processor_kwargs=dict(size={"height": CROP, "width": CROP}, max_crops=4, overlap_margins=[2, 2]),
    video_processor_kwargs=dict(size={"height": CROP, "width": CROP}, num_frames=4, max_fps=2),
)


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


def convert_dir(hf_dir: pathlib.Path, out: pathlib.Path, dtype=None) -> pathlib.Path:
    """What tools/convert_checkpoint.py does."""
    cfg = Molmo2Config.from_hf_dir(hf_dir)
    shards = convert.SafetensorsShards(hf_dir)
    return checkpoint.save_base(out, cfg, convert.converted_leaves(shards, cfg, dtype=dtype))


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
    return TinyModels(model, native, original, convert_dir(native, root / "ours_native"),
                      convert_dir(original, root / "ours_original"))


def hf_forward(model, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(final-norm hidden states, logits) of the PyTorch model, float32 numpy."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.hidden_states[-1].float().numpy(), out.logits.float().numpy()


def to_batch(inputs: dict, cfg: Molmo2Config) -> dict:
    """Molmo2Processor outputs (one or more rows) -> our per-row batch layout (see model.py).

    The processor concatenates every crop of the batch and pools with global patch indices; we
    give each row its own crops and re-base the indices to them. Like transformers, pooled rows
    with no valid patch are dropped first (they have no `<im_patch>` token).
    """
    tokens = inputs["input_ids"].numpy().astype(np.int32)
    mask = inputs["attention_mask"].numpy().astype(np.int32)
    batch = {"tokens": tokens, "segment_ids": mask,
             "positions": np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape).copy()}
    if "pixel_values" in inputs:
        pixels, pooling = inputs["pixel_values"].numpy(), inputs["image_token_pooling"].numpy()
        grids = inputs["image_grids"].numpy()
        tokens_per_media = grids[:, 0] * grids[:, 1] + grids[:, 2] * grids[:, 3]
        crops_per_media = inputs["image_num_crops"].numpy()
    elif "pixel_values_videos" in inputs:
        pixels, pooling = inputs["pixel_values_videos"].numpy(), inputs["video_token_pooling"].numpy()
        grids = inputs["video_grids"].numpy()
        tokens_per_media, crops_per_media = grids[:, 0] * grids[:, 1] * grids[:, 2], grids[:, 0]
    else:
        return batch
    pooling = pooling[(pooling >= 0).any(-1)]
    patches = pixels.shape[1]
    # Media go to rows in order, as many as each row has patch-token runs' worth of tokens.
    patch_tokens_per_row = (tokens == cfg.image_patch_id).sum(1)
    row_crops, row_pooling = [[] for _ in tokens], [[] for _ in tokens]
    crop_start, token_start, row = 0, 0, 0
    for n_tokens, n_crops in zip(tokens_per_media, crops_per_media):
        while sum(len(p) for p in row_pooling[row]) >= patch_tokens_per_row[row]:
            row += 1
        local_offset = sum(len(c) for c in row_crops[row]) * patches
        rows = pooling[token_start: token_start + n_tokens]
        row_pooling[row].append(np.where(rows >= 0, rows - crop_start * patches + local_offset, -1))
        row_crops[row].append(pixels[crop_start: crop_start + n_crops])
        crop_start, token_start = crop_start + n_crops, token_start + n_tokens
    max_crops = max(sum(len(c) for c in r) for r in row_crops)
    max_tokens = max(patch_tokens_per_row)
    crops = np.zeros((len(tokens), max_crops, patches, pixels.shape[2]), np.float32)
    pool = np.full((len(tokens), max_tokens, pooling.shape[1]), -1, np.int32)
    for b in range(len(tokens)):
        if row_crops[b]:
            c, p = np.concatenate(row_crops[b]), np.concatenate(row_pooling[b])
            crops[b, : len(c)], pool[b, : len(p)] = c, p
    batch.update(crops=crops, pooling=pool)
    return batch
