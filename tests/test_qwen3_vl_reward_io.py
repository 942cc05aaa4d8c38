"""A PEFT LoRA reward model on Qwen3-VL: imported, it scores as PEFT + torch do; exported, PEFT loads it
back to the same scores. The oracle is the tiny transformers Qwen3-VL wrapped by PEFT (LoRA on the
language model's seven projections, random non-zero factors) and a torch value head, score =
head(h[read position]) / sqrt(H) with h the final-norm hidden state."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import peft
import pytest
import torch
from PIL import Image

from mrrm_jax.interop import reward_io
from mrrm_jax.backbones import load_processor
from mrrm_jax.data.formatting import format_example
from mrrm_jax.backbones.qwen3_vl.processor_files import write_qwen3_vl_processor_dir
from mrrm_jax.scoring.reward_model import RewardModel

TOLERANCE = 1e-4  # max abs score error, float32
TARGETS = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
SMALL = dict(image_processor_kwargs=dict(size={"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 12}),
             video_processor_kwargs=dict(size={"shortest_edge": 32 * 32 * 2, "longest_edge": 32 * 32 * 24}))
RNG = np.random.RandomState(3)
MEDIA = {
    "text": {},
    "image": {"images": [Image.fromarray(RNG.randint(0, 256, (100, 150, 3), dtype=np.uint8))]},
    "video": {"video": RNG.randint(0, 256, (6, 64, 96, 3), dtype=np.uint8),
              "video_metadata": {"fps": 2.0, "total_num_frames": 6}},
    "image_and_video": {"images": [Image.fromarray(RNG.randint(0, 256, (64, 64, 3), dtype=np.uint8))],
                        "video": RNG.randint(0, 256, (4, 64, 64, 3), dtype=np.uint8),
                        "video_metadata": {"fps": 1.0, "total_num_frames": 4}},
}
RESPONSES = ["A cat on a mat.", "Two dogs, probably.", "I cannot tell from this.", "A red car parked by a tree."]


@pytest.fixture(scope="module")
def release(tiny_qwen, tmp_path_factory):
    """(adapter dir, PEFT model, torch head): PEFT's own save, the processor (with `<|resp_sep|>`) beside it."""
    root = tmp_path_factory.mktemp("qwen_release")
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=TARGETS)
    model = peft.get_peft_model(copy.deepcopy(tiny_qwen.torch_model), config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.1, generator=generator)
    hidden = tiny_qwen.torch_model.config.text_config.hidden_size
    torch.manual_seed(2)
    head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.SiLU(), torch.nn.Linear(1024, 1)).eval()
    with torch.no_grad():
        head[2].weight.mul_(10)  # scores of order 1, so that 1e-4 is a tight bound
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    load_processor(write_qwen3_vl_processor_dir(root / "processor", **SMALL)).save_pretrained(adapter)
    torch.save(head.state_dict(), adapter / "value_head.pt")
    (adapter / "reward_model_config.json").write_text(json.dumps(
        {"value_head_type": "mlp", "value_head_hidden_dim": 1024, "value_head_activation": "silu",
         "value_head_input_dim": hidden, "resp_repr_mode": "last"}))
    return adapter, model, head


def _torch_scores(peft_model, head, example) -> np.ndarray:
    inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in example.processor_outputs.items()}
    with torch.no_grad():
        hidden_td = peft_model.base_model.model.model(**inputs).last_hidden_state[0]
        scores_n = head(hidden_td[torch.from_numpy(example.read_positions).long()])[:, 0]
    return (scores_n / math.sqrt(hidden_td.shape[-1])).numpy()


@pytest.fixture(scope="module")
def imported(tiny_qwen, release, tmp_path_factory):
    adapter, _, _ = release
    return reward_io.import_peft(tiny_qwen.hf_dir, adapter, tmp_path_factory.mktemp("qwen_imported") / "rm")


def test_imported_scores_match_peft_and_torch(release, imported):
    _, peft_model, head = release
    # float32: the tiny checkpoint is stored in bfloat16 (the real config's dtype); merged into bfloat16
    # kernels the LoRA would round off at ~1e-3
    model = RewardModel.load(imported, dtype="float32", row_tokens=512)
    for media, kwargs in MEDIA.items():
        example = format_example(model.processor, "Which answer is best?", RESPONSES, **kwargs)
        want = _torch_scores(peft_model, head, example)
        got = model.score("Which answer is best?", RESPONSES, **kwargs)
        error = np.abs(got - want).max()
        print(f"{media}: scores {np.round(want, 3)}, max abs error {error:.2e}")
        assert error <= TOLERANCE, (media, got, want)
    with peft_model.disable_adapter():  # the LoRA matters far beyond the tolerance
        without = _torch_scores(peft_model, head, example)
    assert np.abs(want - without).min() > 100 * TOLERANCE


def test_exported_adapter_loads_in_peft_with_the_same_scores(tiny_qwen, release, imported, tmp_path):
    _, peft_model, head = release
    out = reward_io.export_peft(imported, tmp_path / "export")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_qwen.torch_model), out).eval()
    processor = load_processor(out)
    for media, kwargs in MEDIA.items():
        example = format_example(processor, "Which is right?", RESPONSES[:2], **kwargs)
        np.testing.assert_allclose(_torch_scores(reloaded, head, example), _torch_scores(peft_model, head, example),
                                   atol=1e-6, err_msg=media)
    with pytest.raises(ValueError, match="layout='original' is not a qwen3_vl module naming"):
        reward_io.export_peft(imported, tmp_path / "original", layout="original")
