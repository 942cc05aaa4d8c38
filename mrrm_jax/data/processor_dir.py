"""A Hugging Face processor directory read and written without torch, as every backbone's processor
does: its file names, JSON and chat template, the processor class it names; and what the processors
share beyond the files (the plain-text tokenizer, the frame counts a video is tried with, video metadata).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import tokenizers
from transformers import TokenizersBackend

PROCESSOR_CONFIG = "processor_config.json"
# Older layouts keep each sub-processor's settings in its own file.
IMAGE_CONFIG, VIDEO_CONFIG = "preprocessor_config.json", "video_preprocessor_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def budget_frame_counts(budget) -> list[int]:
    """The frame counts a video is tried with until it fits `budget` (`examples.Budget`): its first,
    halved down to its least."""
    counts, frames = [], budget.max_frames
    while frames >= budget.min_frames:
        counts.append(frames)
        frames //= 2
    return counts


def write_processor_dir(out_dir, tokenizer: TokenizersBackend, settings: dict, chat_template: str) -> pathlib.Path:
    """A processor directory as transformers 5's `save_pretrained` writes it: the tokenizer files, one
    processor_config.json (the sub-processors' settings nested) and chat_template.jinja."""
    out_dir = pathlib.Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / PROCESSOR_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (out_dir / CHAT_TEMPLATE_FILE).write_text(chat_template)
    return out_dir


def processor_class(model_dir) -> str | None:
    """The `processor_class` a processor directory names (either layout); None when it names none."""
    model_dir = pathlib.Path(model_dir)
    return read_json(model_dir / PROCESSOR_CONFIG).get("processor_class") or read_json(
        model_dir / IMAGE_CONFIG).get("processor_class")


def plain_tokenizer(tokenizer: TokenizersBackend) -> tokenizers.Tokenizer:
    """A copy of the tokenizer that reads special-token text as plain text. transformers'
    `split_special_tokens=True` instead flips that flag on the shared backend for the call, which
    splits another thread's special tokens when formatting runs in several threads."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    return backend


def video_metadata_dict(metadata, num_frames: int) -> dict:
    """A `VideoMetadata` or dict -> dict with the fps (frame timestamps need it) and the frame count."""
    if metadata is None:
        raise ValueError("video_metadata with the video's fps is required: the processor writes frame timestamps")
    if dataclasses.is_dataclass(metadata):
        metadata = {k: v for k, v in dataclasses.asdict(metadata).items() if v is not None}
    if not metadata.get("fps"):
        raise ValueError(f"video_metadata has no fps: {metadata}")
    return {"total_num_frames": num_frames, **metadata}


def read_json(path: pathlib.Path) -> dict:
    """The JSON object in `path`; {} when there is no such file."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def read_chat_template(model_dir: pathlib.Path, settings: dict, tokenizer) -> str:
    """The processor's chat template: chat_template.jinja, chat_template.json, the processor config, or
    else the tokenizer's, in transformers' order."""
    if (model_dir / CHAT_TEMPLATE_FILE).exists():
        return (model_dir / CHAT_TEMPLATE_FILE).read_text()
    template = read_json(model_dir / "chat_template.json").get("chat_template") or settings.get("chat_template")
    template = template or tokenizer.chat_template
    if not isinstance(template, str):
        raise ValueError(f"{model_dir}: no chat template (looked for {CHAT_TEMPLATE_FILE}, chat_template.json, "
                         f"{PROCESSOR_CONFIG} and the tokenizer's)")
    return template
