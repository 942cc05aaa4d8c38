"""Our torch-free processor loader against transformers' `AutoProcessor` on the same directory, both
file layouts; settings our preprocessing does not implement are refused, naming file and key, by
every command."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor

from mrrm_jax.backbones.molmo2 import processor as processor_lib
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir

REPO = pathlib.Path(__file__).resolve().parents[1]
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                 {"type": "text", "text": "Which is best?"}]},
    {"role": "assistant", "content": "The first."},
]


def _split_layout(processor_dir: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The same settings in the older layout: a file per sub-processor, the template as JSON."""
    shutil.copytree(processor_dir, out)
    settings = json.loads((out / "processor_config.json").read_text())
    (out / "preprocessor_config.json").write_text(json.dumps(settings.pop("image_processor")))
    (out / "video_preprocessor_config.json").write_text(json.dumps(settings.pop("video_processor")))
    (out / "processor_config.json").write_text(json.dumps(settings))
    template = (out / "chat_template.jinja").read_text()
    (out / "chat_template.jinja").unlink()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return out


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("layouts")
    combined = write_molmo2_processor_dir(
        root / "combined", image_processor_kwargs=dict(max_crops=3, overlap_margins=[2, 2]),
        video_processor_kwargs=dict(num_frames=7, max_fps=1.5))
    return {"combined": combined, "split": _split_layout(combined, root / "split")}


@pytest.mark.parametrize("layout", ["combined", "split"])
def test_settings_template_and_token_types_equal_transformers(layouts, layout):
    ours, reference = processor_lib.load(layouts[layout]), AutoProcessor.from_pretrained(layouts[layout])
    image, video = reference.image_processor, reference.video_processor
    assert ours.options.max_crops == image.max_crops == 3 and ours.options.overlap_margins == (2, 2)
    assert ours.options.num_frames == video.num_frames == 7 and ours.options.max_fps == video.max_fps == 1.5
    assert ours.options.crop_size == image.size["height"] and ours.options.patch_size == image.patch_size
    assert (ours.options.image_pooling, ours.options.video_pooling) == (tuple(image.pooling_size), tuple(video.pooling_size))
    assert (ours.image_token, ours.video_token) == (reference.image_token, reference.video_token)
    for generation_prompt in (False, True):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt) == \
            reference.apply_chat_template(MESSAGES, add_generation_prompt=generation_prompt, tokenize=False)
    images = [Image.new("RGB", (60, 40)), Image.new("RGB", (30, 90))]
    video = np.zeros((3, 32, 32, 3), np.uint8)
    outputs = reference(text=reference.apply_chat_template(MESSAGES, tokenize=False), images=images, videos=[video],
                        video_metadata=[{"fps": 1.0, "total_num_frames": 3}], return_tensors="np")
    types = ours.create_mm_token_type_ids(outputs["input_ids"])
    assert types.dtype == outputs["mm_token_type_ids"].dtype and set(np.unique(types)) == {0, 1}
    np.testing.assert_array_equal(types, outputs["mm_token_type_ids"])
    unexpanded_ids = reference.tokenizer(reference.apply_chat_template(MESSAGES, tokenize=False))["input_ids"]
    np.testing.assert_array_equal(ours.create_mm_token_type_ids([unexpanded_ids]),
                                  reference.create_mm_token_type_ids([unexpanded_ids]))
    assert 2 in ours.create_mm_token_type_ids([unexpanded_ids])  # the <|video|> placeholder


def test_saving_writes_the_combined_layout_both_loaders_read(layouts, tmp_path):
    saved = processor_lib.load(layouts["split"]).save_pretrained(tmp_path / "saved")
    # tokenizer_config.json is transformers' own save of the loaded tokenizer (it adds load-time keys).
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json"):
        assert (saved / name).read_text() == (layouts["combined"] / name).read_text(), name
    assert AutoProcessor.from_pretrained(saved).image_processor.max_crops == 3


# (where the setting lives, key, value, what the error names)
UNSUPPORTED = [
    ("image_processor", "do_normalize", False, "image_processor do_normalize=False"),
    ("image_processor", "resample", 3, "image_processor resample=3"),
    ("image_processor", "rescale_factor", 1.0, "image_processor rescale_factor=1.0"),
    ("image_processor", "do_convert_rgb", False, "image_processor do_convert_rgb=False"),
    ("video_processor", "size", {"height": 378, "width": 420}, "video_processor size="),
    ("video_processor", "do_resize", None, "video_processor do_resize=None"),
    ("video_processor", "image_mean", [0.4, 0.5, 0.5], "video_processor image_mean="),
    ("video_processor", "fps", 2, "fps=2"),
    (None, "processor_class", "Qwen3VLProcessor", "processor_class='Qwen3VLProcessor'"),
]


def _with_setting(processor_dir: pathlib.Path, out: pathlib.Path, where, key, value) -> pathlib.Path:
    shutil.copytree(processor_dir, out)
    settings = json.loads((out / "processor_config.json").read_text())
    (settings[where] if where else settings)[key] = value
    (out / "processor_config.json").write_text(json.dumps(settings))
    return out


@pytest.mark.parametrize("where, key, value, message", UNSUPPORTED, ids=[u[1] for u in UNSUPPORTED])
def test_an_unsupported_setting_is_refused_naming_file_and_key(layouts, tmp_path, where, key, value, message):
    bad = _with_setting(layouts["combined"], tmp_path / "bad", where, key, value)
    with pytest.raises(ValueError) as error:
        processor_lib.load(bad)
    assert str(error.value).startswith(f"{bad / 'processor_config.json'}: ") and message in str(error.value)


def test_every_command_refuses_it_in_one_error_line(tiny_reward_dir, layouts, tmp_path):
    """train, score, evaluate and serve on a processor with normalisation switched off."""
    bad_reward_dir = tmp_path / "reward"
    shutil.copytree(tiny_reward_dir, bad_reward_dir)
    processor_dir = bad_reward_dir / "processor"
    shutil.rmtree(processor_dir)
    _with_setting(layouts["combined"], processor_dir, "image_processor", "do_normalize", False)
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "Q?", "responses": ["a", "b"]}) + "\n")
    commands = {
        "train": ["mrrm_jax.train", "--config=configs/demo.py", f"--config.processor.dir={processor_dir}",
                  f"--workdir={tmp_path / 'run'}"],
        "score": ["mrrm_jax.score", f"--checkpoint={bad_reward_dir}", f"--input={tmp_path / 'in.jsonl'}",
                  f"--output={tmp_path / 'out.jsonl'}"],
        "evaluate": ["mrrm_jax.evaluate", f"--checkpoint={bad_reward_dir}", "--benchmark=jsonl",
                     f"--data={tmp_path / 'in.jsonl'}", f"--output={tmp_path / 'eval'}"],
        "serve": ["mrrm_jax.serve", f"--checkpoint={bad_reward_dir}", "--port=0"],
    }
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name, args in commands.items():
        result = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(errors) == 1, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert "processor_config.json: image_processor do_normalize=False" in errors[0], (name, errors)
