"""RL adapters called as verl, tunix and TRL call them, against a live server on loopback (and tunix
in process): each prompt's rollouts scored as one group, equal to scoring that group directly."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from mrrm_jax.data import media
from mrrm_jax.rl import trl, tunix
from mrrm_jax.rl.client import LocalScorer
from tests.benchmark_files import ANSWERS
from tests.test_serve import media_root, serve  # noqa: F401  (media_root is a fixture)

PROMPTS = ["Describe the picture.", "Which answer fits?"]


@pytest.fixture(scope="module")
def url(model, media_root):
    with serve(model, media_root=str(media_root)) as base:
        yield base


def _direct(model, media_root):
    """What the two groups score when given to the model directly: 3 answers with an image, 2 without."""
    return np.concatenate([model.score(PROMPTS[0], ANSWERS[:3], images=[media.load_image(media_root / "a.png")]),
                           model.score(PROMPTS[1], ANSWERS[:2])])


def test_tunix_reward_fn_over_http_and_in_process(model, url, media_root):
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    completions = ANSWERS[:3] + ANSWERS[:3]
    images = np.array(["a.png"] * 3 + [""] * 3)  # a numpy string column: '' for none
    expected = np.concatenate([model.score(PROMPTS[0], ANSWERS[:3], images=[media.load_image(media_root / "a.png")]),
                               model.score(PROMPTS[1], ANSWERS[:3])])
    over_http = tunix.make_reward_fn(url=url)
    np.testing.assert_allclose(over_http(prompts=prompts, completions=completions, num_generations=3, image=images,
                                         mode="train"), expected, atol=1e-5)
    in_process = tunix.make_reward_fn(model=model, media_root=media_root)
    trajectories = [f"{row}_{g}" for row in range(2) for g in range(3)]
    np.testing.assert_allclose(in_process(prompts=prompts, completions=completions, num_generations=3, image=images,
                                          trajectory_ids=trajectories), expected, atol=1e-5)
    with pytest.raises(ValueError, match="blocks of num_generations"):
        over_http(prompts=prompts[:4], completions=completions[:4], num_generations=3)


def test_in_process_scorer_in_both_modes(model, media_root):
    """`LocalScorer` scores groups as the model does: in one pass per group, or one per response."""
    groups = [{"prompt": PROMPTS[0], "responses": ANSWERS[:3], "image": "a.png"},
              {"prompt": PROMPTS[1], "responses": ANSWERS[:2]}]
    image = [media.load_image(media_root / "a.png")]
    np.testing.assert_allclose(np.concatenate(LocalScorer(model, media_root).score(groups)),
                               _direct(model, media_root), atol=1e-5)
    single = np.concatenate([model.score_single(PROMPTS[0], ANSWERS[:3], images=image),
                             model.score_single(PROMPTS[1], ANSWERS[:2])])
    np.testing.assert_allclose(np.concatenate(LocalScorer(model, media_root, mode="single").score(groups)), single,
                               atol=1e-5)
    assert not np.allclose(single, _direct(model, media_root), atol=1e-3)  # the two modes are different passes


def test_trl_reward_func_groups_by_prompt_within_the_slice(model, url, media_root):
    # Conversational, interleaved, and a partial group (the rest of it on another process).
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}],
               [{"role": "user", "content": PROMPTS[1]}]] * 2 + [
               [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}]]
    completions = [[{"role": "assistant", "content": text}] for text in
                   [ANSWERS[0], ANSWERS[0], ANSWERS[1], ANSWERS[1], ANSWERS[2]]]
    image = ["a.png", None, "a.png", None, "a.png"]
    rewards = pickle.loads(pickle.dumps(trl.make_reward_func(url)))(prompts=prompts, completions=completions, completion_ids=None, image=image,
                                        trainer_state=None)
    expected = _direct(model, media_root)
    np.testing.assert_allclose(np.asarray(rewards)[[0, 2, 4, 1, 3]], expected, atol=1e-5)


def test_server_command_line_refuses_bad_flags_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mrrm_jax.serve", f"--checkpoint={tmp_path / 'none'}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and "Traceback" not in done.stderr


# Chat templates as their models' tokenizer configs ship them (Meta-Llama-3-8B-Instruct, gemma-2 and
# gemma-3 instruction-tuned), the test data for recovering the question.
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
          "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
          "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{'<start_of_turn>model\n'}}{% endif %}")
GEMMA3 = ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = "
          "messages[0]['content'][0]['text'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}"
          "{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
          "{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}{%- set role = 'model' -%}"
          "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
          "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
          "{%- if message['content'] is string -%}{{ message['content'] | trim }}{%- else -%}"
          "{%- for item in message['content'] -%}{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
          "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
          "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")


def test_the_question_is_recovered_from_each_template_family():
    from transformers.utils.chat_template_utils import render_jinja_template

    from mrrm_jax.backbones.molmo2.processor_files import CHAT_TEMPLATE as MOLMO2
    from mrrm_jax.backbones.qwen3_vl.processor_files import QWEN3_VL_CHAT_TEMPLATE
    from mrrm_jax.serving import templates

    question = "What is in the picture, and why?"
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello!"}]
    with_image = [{"type": "image"}, {"type": "text", "text": question}]
    cases = [  # template, messages, rule
        (QWEN3_VL_CHAT_TEMPLATE, [{"role": "system", "content": "You are a helpful assistant."}, *turns,
                                  {"role": "user", "content": with_image}], "chatml"),
        (MOLMO2, [*turns, {"role": "user", "content": with_image}], "molmo2"),
        (MOLMO2, [{"role": "user", "content": question}], "chatml"),  # no media head: plain ChatML
        (LLAMA3, [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": question}], "llama3"),
        (GEMMA2, [*turns, {"role": "user", "content": question}], "gemma"),
        (GEMMA3, [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": with_image}], "gemma"),
    ]
    for template, messages, rule in cases:
        [text], _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                          bos_token="<bos>")
        got = templates.question(text)
        # Gemma 3 puts the system prompt into the first user turn: it stays part of that turn's text.
        want = "Be brief.\n\n" + question if template is GEMMA3 else question
        assert got == (want, rule), (rule, text, got)
    assert templates.question("  What is it?  ") == ("What is it?", "raw")
