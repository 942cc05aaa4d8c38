"""The PyTorch reference scorer for bench/score_e2e.py: a released reward model scored as a PyTorch user
would, with transformers, PEFT and transformers' own Molmo2 processor.

    python -m bench.torch_scorer --base=HF_DIR --adapter=PEFT_DIR --input=in.jsonl --output=out.jsonl
        [--mode=multi|single] [--threads=N]

Loads the base with `Molmo2ForConditionalGeneration` (float32, sdpa attention), applies the adapter with
`PeftModel.from_pretrained` (not merged, as the release's loader), the value head from value_head.pt
(reward_model_config.json says which head), and `AutoProcessor` from the adapter dir (the release ships
its tokenizer, `<|resp_sep|>` included, there). Per record: images with PIL; a video with OUR decoder
(`mrrm_jax.data.media.load_video`, every frame, which the processor then samples), so that the
comparison is about the model pipeline, not the video decoder; the chat template rendered with the
responses joined by `SEPARATOR_TEXT` in the assistant turn; the processor; ONE forward per record (the
release scores one example at a time; batching Molmo2 inputs of different media is not something its
processor does), of the base model only (no LM head), under `torch.inference_mode()`; the head on the
final-norm hidden states at the token before each `<|resp_sep|>` and at the last token; / sqrt(H).
`--mode=single`: one forward per response. Output lines as `mrrm_jax.score`'s: {"index", "id"?, "scores"};
a last stderr line "scored S, failed F of R records in Ts", like ours.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoProcessor, Molmo2ForConditionalGeneration
from transformers.video_utils import VideoMetadata

from mrrm_jax.data import media
from mrrm_jax.data.formatting import RESP_SEP, SEPARATOR_TEXT

ACTIVATIONS = {"silu": torch.nn.SiLU}


def value_head(config: dict, hidden_size: int) -> torch.nn.Module:
    """The release's head for `reward_model_config.json`: Sequential(Linear(H, hidden), act, Linear(hidden, 1)),
    or a bare Linear(H, 1) for "linear" (its state-dict keys are the release's)."""
    if config["value_head_type"] == "linear":
        return torch.nn.Linear(hidden_size, 1)
    hidden = config["value_head_hidden_dim"]
    return torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden),
                               ACTIVATIONS[config["value_head_activation"].lower()](), torch.nn.Linear(hidden, 1))


class TorchScorer:
    def __init__(self, base_dir: pathlib.Path, adapter_dir: pathlib.Path):
        model = Molmo2ForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="sdpa")
        self.model = PeftModel.from_pretrained(model, adapter_dir).eval()
        # LoRA lives inside the modules, so the inner Molmo2Model (final-norm hidden states, no LM head) has it.
        self.backbone = self.model.get_base_model().model
        config = json.loads((adapter_dir / "reward_model_config.json").read_text())
        if config.get("resp_repr_mode", "last") != "last":
            raise ValueError(f"resp_repr_mode={config['resp_repr_mode']!r}: this reference reads the last token only")
        self.hidden_size = model.config.text_config.hidden_size
        self.head = value_head(config, self.hidden_size).eval()
        self.head.load_state_dict(torch.load(adapter_dir / "value_head.pt", weights_only=True))
        self.processor = AutoProcessor.from_pretrained(adapter_dir)
        self.sep_id = self.processor.tokenizer.convert_tokens_to_ids(RESP_SEP)

    def inputs(self, prompt: str, responses: list[str], images: list, video, video_metadata) -> dict:
        content = [{"type": "image"}] * len(images) + [{"type": "video"}] * (video is not None)
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]},
                    {"role": "assistant", "content": SEPARATOR_TEXT.join(responses)}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        kwargs = {"images": images} if images else {}
        if video is not None:
            kwargs.update(videos=[video], video_metadata=[video_metadata])
        return self.processor(text=text, return_tensors="pt", **kwargs)

    @torch.inference_mode()
    def score(self, inputs: dict) -> list[float]:
        ids_t = inputs["input_ids"][0]
        read_positions_n = torch.cat([torch.nonzero(ids_t == self.sep_id)[:, 0] - 1, torch.tensor([len(ids_t) - 1])])
        hidden_td = self.backbone(**inputs, use_cache=False).last_hidden_state[0]
        return (self.head(hidden_td[read_positions_n])[:, 0] / math.sqrt(self.hidden_size)).tolist()


def load_media(record: dict, root: pathlib.Path) -> tuple[list, object, VideoMetadata | None]:
    names = record.get("image") or []
    images = [Image.open(root / name).convert("RGB") for name in ([names] if isinstance(names, str) else names)]
    if record.get("video") is None:
        return images, None, None
    frames, metadata = media.load_video(root / record["video"], record.get("fps"))
    return images, frames, VideoMetadata(total_num_frames=metadata["total_num_frames"], fps=metadata["fps"],
                                         duration=metadata["duration"], height=frames.shape[1], width=frames.shape[2])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=pathlib.Path, required=True)
    parser.add_argument("--adapter", type=pathlib.Path, required=True)
    parser.add_argument("--input", type=pathlib.Path, required=True)
    parser.add_argument("--output", type=pathlib.Path, required=True)
    parser.add_argument("--mode", choices=["multi", "single"], default="multi")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    scorer = TorchScorer(args.base, args.adapter)
    lines = args.input.read_text().splitlines()
    start, scored = time.time(), 0
    with open(args.output, "w") as out:
        for index, line in enumerate(lines):
            record = json.loads(line)
            images, video, metadata = load_media(record, args.input.parent)
            responses = record["responses"]
            groups = [responses] if args.mode == "multi" else [[r] for r in responses]
            scores = [s for group in groups
                      for s in scorer.score(scorer.inputs(record.get("prompt", ""), group, images, video, metadata))]
            entry = {"index": index, **({"id": record["id"]} if "id" in record else {})}
            out.write(json.dumps({**entry, "scores": scores}) + "\n")
            scored += 1
    print(f"scored {scored}, failed 0 of {len(lines)} records in {time.time() - start:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
