"""Tiny random PyTorch policies for running RL frameworks in tests: a word-level tokenizer built in
code (no hub), a Qwen2 causal LM, and a Qwen2-VL with its processor for image prompts."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor)

WORDS = "the sky is blue red green a cat dog on mat which answer fits describe picture yes no it . ?".split()
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# ChatML as Qwen2-VL renders it (the image span before the text of a turn).
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
            "{% if p['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tokenizer() -> PreTrainedTokenizerFast:
    words = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    tok.chat_template = TEMPLATE
    return tok


def _text_config(tok) -> dict:
    return dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=None)


def _generation_ids(model, tok):
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model


def causal_lm(tok, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return _generation_ids(Qwen2ForCausalLM(Qwen2Config(**_text_config(tok), tie_word_embeddings=True)), tok)


def vision_processor() -> Qwen2VLProcessor:
    pixels = 28 * 28  # every image becomes 28 x 28: one merged <|image_pad|> token
    images = Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=4 * pixels,
                                   size={"shortest_edge": pixels, "longest_edge": 4 * pixels})
    return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer(), video_processor=Qwen2VLVideoProcessor(),
                            chat_template=TEMPLATE)


def vision_lm(processor, seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}
    config = Qwen2VLConfig(
        text_config={**_text_config(tok), "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                              "mrope_section": [2, 1, 1]}},
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return _generation_ids(Qwen2VLForConditionalGeneration(config), tok)
