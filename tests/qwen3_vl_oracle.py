"""The PyTorch oracle for Qwen3-VL: a tiny random transformers model (the real 4B config.json, shrunk),
saved by `save_pretrained` and converted by our converter, and HF inputs -> our batch layout."""

from __future__ import annotations

import copy
import dataclasses
import pathlib

import numpy as np
import torch
from transformers import Qwen3VLConfig as HFQwen3VLConfig
from transformers import Qwen3VLForConditionalGeneration

from mrrm_jax.interop import convert
from mrrm_jax.data import packing
from mrrm_jax.backbones.qwen3_vl.positions import vision_layout
from mrrm_jax.backbones.qwen3_vl.packing import Qwen3VLMedia

# Qwen/Qwen3-VL-4B-Instruct's config.json as released (transformers 4.57 keys: `rope_scaling`, flat `rope_theta`).
QWEN3_VL_4B_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
        "initializer_range": 0.02, "intermediate_size": 9728, "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
    },
    "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024,
        "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096, "model_type": "qwen3_vl",
        "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560, "patch_size": 16,
        "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
}

IMAGE, VIDEO, VISION_START, VISION_END = 151655, 151656, 151652, 151653


def tiny_hf_dict() -> dict:
    """The real config, shrunk: 3 LM layers (head_dim 32, M-RoPE section scaled to [6, 5, 5]), 3 ViT
    blocks with deepstack after blocks 0 and 1, a 12 x 12 position grid; the real vocabulary and ids."""
    raw = copy.deepcopy(QWEN3_VL_4B_CONFIG)
    raw["text_config"].update(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=32, intermediate_size=96)
    raw["text_config"]["rope_scaling"]["mrope_section"] = [6, 5, 5]
    raw["vision_config"].update(depth=3, hidden_size=64, num_heads=2, intermediate_size=96, out_hidden_size=64,
                                deepstack_visual_indexes=[0, 1], num_position_embeddings=144)
    return raw


@dataclasses.dataclass
class TinyQwen:
    torch_model: Qwen3VLForConditionalGeneration  # reloaded from hf_dir, eager attention
    hf_dir: pathlib.Path
    converted: pathlib.Path


def make_tiny_qwen(root: pathlib.Path, seed: int = 0) -> TinyQwen:
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(HFQwen3VLConfig.from_dict(tiny_hf_dict())).eval()
    with torch.no_grad():  # norm weights start at exactly 1 (biases at 0): randomise so a mis-mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager").eval()
    return TinyQwen(reloaded, hf_dir, convert.convert_dir(hf_dir, root / "ours"))


@dataclasses.dataclass
class Example:
    """One example as transformers takes it: ids, its media items in token order, their patches."""

    tokens: np.ndarray  # [T]
    items: list  # [(kind, (t, h, w))], kind "image" | "video"
    patches: list  # [t * h * w, 1536] per item

    @property
    def mm_token_type_ids(self) -> np.ndarray:
        return (self.tokens == IMAGE) * 1 + (self.tokens == VIDEO) * 2

    def grids(self, kind: str) -> list:
        return [grid for k, grid in self.items if k == kind]


def build_example(rng: np.random.RandomState, parts: list) -> Example:
    """parts: ints (that many random text tokens), ("image", (1, h, w)) or ("video", (t, h, w)).
    A video is t frames of one temporal patch each, each after a text timestamp, as Qwen3VLProcessor
    writes it; every frame or image is wrapped in <|vision_start|> ... <|vision_end|>."""
    tokens, items, patches = [], [], []
    for part in parts:
        if isinstance(part, int):
            tokens += list(rng.randint(0, 151643, part))
            continue
        kind, (t, h, w) = part
        items.append(part)
        patches.append(rng.randn(t * h * w, 1536).astype(np.float32))
        for _ in range(t if kind == "video" else 1):
            if kind == "video":
                tokens += list(rng.randint(0, 151643, 3))  # "<0.5 seconds>"
            tokens += [VISION_START] + [IMAGE if kind == "image" else VIDEO] * (h * w // 4) + [VISION_END]
    return Example(np.asarray(tokens, np.int64), items, patches)


def hf_inputs(examples: list[Example]) -> dict:
    """A right-padded transformers batch (positions left to the model: its own `get_rope_index`)."""
    length = max(len(e.tokens) for e in examples)
    pad = lambda x: np.pad(x, (0, length - len(x)))
    inputs = {"input_ids": torch.tensor(np.stack([pad(e.tokens) for e in examples])),
              "attention_mask": torch.tensor(np.stack([pad(np.ones_like(e.tokens)) for e in examples])),
              "mm_token_type_ids": torch.tensor(np.stack([pad(e.mm_token_type_ids) for e in examples]))}
    for kind, grid_key, pixel_key in (("image", "image_grid_thw", "pixel_values"),
                                      ("video", "video_grid_thw", "pixel_values_videos")):
        grids = [g for e in examples for g in e.grids(kind)]
        if grids:
            inputs[grid_key] = torch.tensor(grids)
            inputs[pixel_key] = torch.tensor(np.concatenate(
                [p for e in examples for (k, _), p in zip(e.items, e.patches) if k == kind]))
    return inputs


def hf_positions(torch_model, example: Example) -> np.ndarray:
    """[3, T] from transformers' `get_rope_index` (text only: 0..T-1 on all three axes, its default)."""
    if not example.items:
        return np.tile(np.arange(len(example.tokens)), (3, 1))
    grids = lambda kind: torch.tensor(example.grids(kind)) if example.grids(kind) else None
    positions, _ = torch_model.model.get_rope_index(
        torch.tensor(example.tokens)[None], torch.tensor(example.mm_token_type_ids)[None], grids("image"),
        grids("video"))
    return positions[:, 0].numpy()


def one_row(torch_model, example: Example) -> dict:
    """The example as our processor's one-row batch (positions from transformers' rope index)."""
    batch = {"tokens": example.tokens[None].astype(np.int32), "positions": hf_positions(torch_model, example)[None],
             "segment_ids": np.ones((1, len(example.tokens)), np.int32),
             "read_positions": np.array([[len(example.tokens) - 1]], np.int32)}
    if example.items:
        batch["patches"] = np.concatenate(example.patches)[None]
        batch.update({k: v[None] for k, v in vision_layout([grid for _, grid in example.items]).items()})
    return batch


def our_batch(torch_model, rows: list[list[Example]], seq_len: int | None = None,
              num_patches: int | None = None) -> dict:
    """Our batch: one row per list of examples, packed by `data/packing.py` (positions restarting per
    example, patch segments re-based), padded."""
    seq_len = seq_len or max(sum(len(e.tokens) for e in row) for row in rows)
    num_patches = num_patches or max(max(sum(sum(len(p) for p in e.patches) for e in row) for row in rows), 4)
    budget = packing.RowBudget(row_tokens=seq_len, row_crops=0, row_pooled=0, row_examples=max(map(len, rows)),
                               max_responses=1, row_patches=num_patches)
    packed = [packing.pack_row([one_row(torch_model, e) for e in row], budget, Qwen3VLMedia(1536))
              for row in rows]
    return {name: np.concatenate([row[name] for row in packed]) for name in packed[0]}
