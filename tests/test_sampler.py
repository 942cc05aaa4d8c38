"""The policy's KV-cache sampler against transformers' `generate` (greedy) on tiny random Molmo2 and
Qwen3-VL checkpoints, and its cache against our own full forward; top-p against transformers' warper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from transformers.generation.logits_process import TopPLogitsWarper
from transformers.video_utils import VideoMetadata

from mrrm_jax.backbones import checkpoint
from mrrm_jax.backbones.molmo2.hf_batch import batch_from_processor
from mrrm_jax.policy import sampler
from tests import qwen3_vl_oracle

STEPS = 8
LOGITS_TOLERANCE = 1e-4  # ours vs transformers, float32 (measured: ~1e-6)
CACHE_TOLERANCE = 1e-5  # our cached decoding vs our full forward

_sample = jax.jit(sampler.sample, static_argnums=(0, 3, 5))
_token_logits = jax.jit(sampler.token_logits, static_argnums=0)


def _hf_generate(torch_model, inputs: dict, **kwargs):
    """(new tokens [N], logits [N, vocab]) of transformers' greedy `generate`."""
    with torch.no_grad():
        out = torch_model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, pad_token_id=0, **kwargs)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].numpy()
    return new, torch.stack(out.logits, 1)[0].float().numpy()


def _right_padded(batch: dict) -> dict:
    """A left-padded batch (transformers' processors pad on the left) with its tokens moved to the left."""
    out = dict(batch)
    pads = (np.asarray(batch["segment_ids"]) == 0).sum(1)
    for name in ("tokens", "positions", "segment_ids"):
        out[name] = np.stack([np.roll(x, -pad, axis=-1) for x, pad in zip(np.asarray(batch[name]), pads)])
    return out


def _check(model, params, prompts: dict, expected: list, samples: int = 1):
    """Greedy sampling of `prompts` equals transformers' tokens for each row, and our full forward over
    the sampled sequences equals transformers' logits at every generated step."""
    out = _sample(model, params, prompts, sampler.Sampling(max_new_tokens=STEPS, temperature=0.0),
                  jax.random.key(0), samples)
    tokens = np.asarray(out["tokens"])
    batch = sampler.with_responses(prompts, out["tokens"], out["lengths"], samples)
    logits = np.asarray(_token_logits(model, params, batch))
    for row in range(tokens.shape[0]):
        hf_tokens, hf_logits = expected[row // samples]
        np.testing.assert_array_equal(tokens[row], hf_tokens)
        error = np.abs(logits[row] - hf_logits).max()
        assert error <= LOGITS_TOLERANCE, (row, error)


# -- Molmo2 ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def molmo2(tiny_models):
    config, params = checkpoint.load_base(tiny_models.converted_native)
    return sampler.policy(config), params


@pytest.fixture(scope="module")
def hf_processor(processor_dir):
    return AutoProcessor.from_pretrained(processor_dir)


def _image(seed, width, height):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _prompt(processor, content, **media):
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=text, return_tensors="pt", **media)


MOLMO2_PROMPTS = {
    "text": lambda: ([{"type": "text", "text": "Which response is best? Explain briefly."}], {}),
    "image": lambda: ([{"type": "image"}, {"type": "text", "text": "What is shown?"}], {"images": [_image(1, 300, 200)]}),
    "video": lambda: ([{"type": "video"}, {"type": "text", "text": "What moves?"}],
                      {"videos": [np.random.RandomState(4).randint(0, 256, (6, 100, 140, 3), dtype=np.uint8)],
                       "video_metadata": [VideoMetadata(total_num_frames=6, fps=2.0, duration=3.0, height=100,
                                                        width=140)]}),
}


@pytest.mark.parametrize("kind", sorted(MOLMO2_PROMPTS))
def test_sampler_greedy_equals_transformers_molmo2(tiny_models, molmo2, hf_processor, kind):
    content, media = MOLMO2_PROMPTS[kind]()
    inputs = _prompt(hf_processor, content, **media)
    model, params = molmo2
    prompts = batch_from_processor(inputs, model.config.image_patch_id)
    _check(model, params, prompts, [_hf_generate(tiny_models.torch_model, inputs)], samples=2)


def test_sampler_rows_of_different_lengths_molmo2(tiny_models, molmo2, hf_processor):
    """Two image prompts of different lengths in one padded batch, two samples each: every row decodes as
    its prompt alone does in transformers."""
    questions, images = ("Short?", "A much longer question about the picture, with many more words?"), \
        [_image(5, 150, 150), _image(6, 260, 120)]
    texts = [hf_processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q in questions]
    batched = hf_processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert not batched["attention_mask"].all()
    model, params = molmo2
    prompts = _right_padded(batch_from_processor(batched, model.config.image_patch_id))
    expected = [_hf_generate(tiny_models.torch_model, hf_processor(text=t, images=[i], return_tensors="pt"))
                for t, i in zip(texts, images)]
    _check(model, params, prompts, expected, samples=2)


def test_sampler_stops_at_a_stop_id_like_transformers(tiny_models, molmo2, hf_processor):
    content, media = MOLMO2_PROMPTS["text"]()
    inputs = _prompt(hf_processor, content, **media)
    free, _ = _hf_generate(tiny_models.torch_model, inputs)
    stop = int(free[3])
    assert stop not in free[:3]
    stopped, _ = _hf_generate(tiny_models.torch_model, inputs, eos_token_id=[stop])
    model, params = molmo2
    prompts = batch_from_processor(inputs, model.config.image_patch_id)
    out = _sample(model, params, prompts, sampler.Sampling(max_new_tokens=STEPS, temperature=0.0, stop_ids=(stop,)),
                  jax.random.key(0), 1)
    assert int(out["lengths"][0]) == 4
    np.testing.assert_array_equal(np.asarray(out["tokens"])[0, :4], stopped[:4])
    assert (np.asarray(out["tokens"])[0, 4:] == 0).all()
    assert len(stopped) == 4 or (stopped[4:] == 0).all()  # transformers pads with pad_token_id after the stop


# -- Qwen3-VL ----------------------------------------------------------------------------------------

QWEN_PROMPTS = {"text": [12], "image": [5, ("image", (1, 4, 6)), 4], "video": [3, ("video", (2, 4, 4)), 5]}


@pytest.fixture(scope="module")
def qwen(tiny_qwen):
    config, params = checkpoint.load_base(tiny_qwen.converted)
    return sampler.policy(config), params


def _qwen_prompts(torch_model, examples) -> dict:
    batch = qwen3_vl_oracle.our_batch(torch_model, [[e] for e in examples])
    return {name: batch[name] for name in ("tokens", "positions", "segment_ids", "patches", "patch_segment_ids",
                                           "patch_positions", "patch_grid")}


@pytest.mark.parametrize("kind", sorted(QWEN_PROMPTS))
def test_sampler_greedy_equals_transformers_qwen3_vl(tiny_qwen, qwen, kind):
    example = qwen3_vl_oracle.build_example(np.random.RandomState(0), QWEN_PROMPTS[kind])
    expected = _hf_generate(tiny_qwen.torch_model, qwen3_vl_oracle.hf_inputs([example]), eos_token_id=None)
    model, params = qwen
    _check(model, params, _qwen_prompts(tiny_qwen.torch_model, [example]), [expected], samples=2)


def test_sampler_rows_of_different_lengths_qwen3_vl(tiny_qwen, qwen):
    rng = np.random.RandomState(1)
    examples = [qwen3_vl_oracle.build_example(rng, QWEN_PROMPTS["image"]),
                qwen3_vl_oracle.build_example(rng, [9, ("video", (2, 4, 4)), 7])]
    expected = [_hf_generate(tiny_qwen.torch_model, qwen3_vl_oracle.hf_inputs([e]), eos_token_id=None)
                for e in examples]
    model, params = qwen
    _check(model, params, _qwen_prompts(tiny_qwen.torch_model, examples), expected, samples=1)


# -- the cache against our full forward ----------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["molmo2", "qwen3_vl"])
def test_sampler_cache_step_equals_full_forward(request, hf_processor, backbone):
    """Decoding random tokens through the KV cache (prefill, then one token at a time) gives, at every
    step, the full forward's logits at that sequence's last position."""
    if backbone == "molmo2":
        model, params = request.getfixturevalue("molmo2")
        content, media = MOLMO2_PROMPTS["image"]()
        prompts = batch_from_processor(_prompt(hf_processor, content, **media), model.config.image_patch_id)
    else:
        model, params = request.getfixturevalue("qwen")
        example = qwen3_vl_oracle.build_example(np.random.RandomState(2), QWEN_PROMPTS["video"])
        prompts = _qwen_prompts(request.getfixturevalue("tiny_qwen").torch_model, [example])
    prompts = jax.tree.map(jnp.asarray, prompts)
    tokens_bn = jax.random.randint(jax.random.key(3), (1, STEPS), 0, 151000)
    lengths_b = jnp.asarray([STEPS], jnp.int32)
    full = np.asarray(_token_logits(model, params, sampler.with_responses(prompts, tokens_bn, lengths_b, 1)))

    length = int(prompts["segment_ids"].sum())
    cache = sampler.empty_cache(model.config, 1, length + STEPS)

    def prefill(module):
        hidden, filled = module(prompts, cache=cache)
        return module.logits(hidden[:, -1]), filled

    def step(module, token, i, cache):
        positions = jnp.broadcast_to(sampler.next_positions(prompts["positions"], prompts["segment_ids"]) + i,
                                     (1, *prompts["positions"].shape[1:-1], 1))
        hidden, cache = module({"tokens": token[:, None], "positions": positions,
                                "segment_ids": jnp.ones((1, 1), jnp.int32)}, cache=cache,
                               cache_index_b=jnp.asarray([length]) + i)
        return module.logits(hidden[:, 0]), cache

    logits, cache = model.apply({"params": params}, method=prefill)
    cached = [np.asarray(logits)]
    for i in range(STEPS - 1):
        logits, cache = model.apply({"params": params}, tokens_bn[:, i], i, cache, method=step)
        cached.append(np.asarray(logits))
    error = np.abs(np.stack(cached, 1) - full).max()
    assert error <= CACHE_TOLERANCE, error


# -- sampling filters --------------------------------------------------------------------------------

@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.9, 0.99])
def test_top_p_keeps_the_tokens_transformers_keeps(top_p):
    logits = np.random.RandomState(0).randn(6, 50).astype(np.float32) * 2
    ours = np.asarray(sampler.filtered_logits(jnp.asarray(logits), sampler.Sampling(temperature=0.7, top_p=top_p)))
    theirs = TopPLogitsWarper(top_p)(None, torch.tensor(logits / 0.7)).numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=1e-6)


def test_sampling_draws_from_the_filtered_distribution():
    """Counts over many draws follow softmax(logits / T) within the nucleus (a chi-square-sized bound)."""
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    sampling = sampler.Sampling(temperature=1.0, top_p=0.8)
    keys = jax.random.split(jax.random.key(0), 20000)
    draws = np.asarray(jax.vmap(lambda k: sampler.choose(logits, k, sampling))(keys))[:, 0]
    counts = np.bincount(draws, minlength=4) / len(draws)
    np.testing.assert_allclose(counts, [0.625, 0.375, 0, 0], atol=0.015)
