"""Parity of the Flax Molmo2 with transformers' PyTorch Molmo2 (the oracle), float32 on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, Molmo2ForConditionalGeneration
from transformers.video_utils import VideoMetadata

from mrrm_jax.backbones import checkpoint
from mrrm_jax.backbones.molmo2.hf_batch import batch_from_processor
from mrrm_jax.backbones.molmo2 import Molmo2
from tests import oracle

TOLERANCE = 1e-4  # max abs error on final hidden states and logits (measured: ~1e-6)


def _ours(converted_dir, batch):
    cfg, params = checkpoint.load_base(converted_dir)
    model = Molmo2(cfg)
    hidden = jax.jit(model.apply)({"params": params}, batch)
    logits = jax.jit(lambda p, h: model.apply({"params": p}, h, method=Molmo2.logits))(params, hidden)
    return np.asarray(hidden), np.asarray(logits)


def _compare(tiny, inputs, report=None):
    cfg = checkpoint.load_config(tiny.converted_native)
    batch = batch_from_processor(inputs, cfg.image_patch_id)
    # Left-padded rows: both sides get the same positions (the reference's default is arange).
    hf_hidden, hf_logits = oracle.hf_forward(tiny.torch_model, {**inputs, "position_ids": torch.tensor(batch["positions"])})
    hidden, logits = _ours(tiny.converted_native, batch)
    real = inputs["attention_mask"].numpy().astype(bool)  # padding positions are unspecified
    err_h = np.abs(hidden - hf_hidden)[real].max()
    err_l = np.abs(logits - hf_logits)[real].max()
    print(f"max abs error: hidden {err_h:.2e}, logits {err_l:.2e}")
    assert err_h <= TOLERANCE and err_l <= TOLERANCE, (err_h, err_l)


def _image(seed, width, height):
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(processor_dir):
    return AutoProcessor.from_pretrained(processor_dir)


def _chat(processor, content, **kwargs):
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "A cat. Or a dog."}]
    text = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    return processor(text=text, return_tensors="pt", **kwargs)


def test_text_only(tiny_models, processor):
    inputs = _chat(processor, [{"type": "text", "text": "Which response is best? Explain briefly."}])
    assert "pixel_values" not in inputs
    _compare(tiny_models, inputs)


def test_one_image_with_high_res_crops(tiny_models, processor):
    image = _image(1, 300, 200)
    inputs = _chat(processor, [{"type": "image"}, {"type": "text", "text": "What is shown?"}], images=[image])
    assert inputs["image_num_crops"].item() > 2  # low-res view + several overlapping crops
    _compare(tiny_models, inputs)


def test_two_images(tiny_models, processor):
    images = [_image(2, 180, 260), _image(3, 90, 70)]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the images."}]
    _compare(tiny_models, _chat(processor, content, images=images))


def test_video(tiny_models, processor):
    frames = np.random.RandomState(4).randint(0, 256, (6, 100, 140, 3), dtype=np.uint8)
    metadata = VideoMetadata(total_num_frames=6, fps=2.0, duration=3.0, height=100, width=140)
    inputs = _chat(processor, [{"type": "video"}, {"type": "text", "text": "What moves?"}],
                   videos=[frames], video_metadata=[metadata])
    assert inputs["video_grids"][0, 0].item() > 1
    _compare(tiny_models, inputs)


def test_padded_batch_of_two(tiny_models, processor):
    texts = []
    for question in ("Short?", "A much longer question about the picture, with many more words in it?"):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        texts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    inputs = processor(text=texts, images=[_image(5, 150, 150), _image(6, 260, 120)], padding=True,
                       return_tensors="pt")
    assert not inputs["attention_mask"].all()
    _compare(tiny_models, inputs)


def test_both_layouts_convert_to_identical_parameters(tiny_models):
    _, native = checkpoint.load_base(tiny_models.converted_native)
    _, original = checkpoint.load_base(tiny_models.converted_original)
    assert jax.tree.structure(native) == jax.tree.structure(original)
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(original)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The rewrite is proven right: transformers itself loads the original layout to the same model.
    reloaded = Molmo2ForConditionalGeneration.from_pretrained(tiny_models.original_dir)
    reference = tiny_models.torch_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)


def test_olmo_qk_norm_and_norm_after(tmp_path):
    tiny = oracle.make_tiny_models(tmp_path, seed=1, qk_norm_type="olmo", norm_after=True, attention_bias=False,
                                   rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                                   rope_scaling_layers=None)
    tokens = np.random.RandomState(7).randint(0, 151000, (2, 24))
    inputs = {"input_ids": torch.tensor(tokens), "attention_mask": torch.ones(2, 24, dtype=torch.long)}
    _compare(tiny, inputs)


@pytest.mark.slow
def test_bfloat16_forward_stays_close_to_float32(tiny_models, processor):
    inputs = _chat(processor, [{"type": "image"}, {"type": "text", "text": "Describe."}], images=[_image(8, 200, 160)])
    cfg, params = checkpoint.load_base(tiny_models.converted_native)
    batch = batch_from_processor(inputs, cfg.image_patch_id)
    h32 = Molmo2(cfg).apply({"params": params}, batch)
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    h16 = Molmo2(cfg.replace(dtype="bfloat16", param_dtype="bfloat16")).apply({"params": p16}, batch)
    assert h16.dtype == jnp.bfloat16
    # Relative to the activations' scale: bf16 keeps 8 mantissa bits (~0.4% per rounding), and
    # errors compound over layers; 5% of the RMS bounds what we see (~1-2%).
    rel = float(jnp.abs(h16.astype(jnp.float32) - h32).max() / jnp.sqrt(jnp.mean(h32 ** 2)))
    print(f"bf16 vs f32: max abs error / rms = {rel:.3f}")
    assert rel < 0.05


def test_tie_word_embeddings_keeps_an_independent_lm_head(tmp_path):
    """transformers' Molmo2 declares no `_tied_weights_keys`: with `tie_word_embeddings=True` it still
    saves `lm_head.weight` and computes its logits with it; so do we."""
    tiny = oracle.make_tiny_models(tmp_path, seed=2, tie_word_embeddings=True)
    model = tiny.torch_model
    assert model.config.text_config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert checkpoint.load_config(tiny.converted_native).with_lm_head
    tokens = np.random.RandomState(9).randint(0, 151000, (2, 24))
    _compare(tiny, {"input_ids": torch.tensor(tokens), "attention_mask": torch.ones(2, 24, dtype=torch.long)})
