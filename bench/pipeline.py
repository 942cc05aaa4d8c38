"""Input pipeline throughput and packing efficiency.

    python -m bench.pipeline [--images=40 --videos=20 --corpus=4000 --row_tokens=8192,24576 --packing_only]

1. Examples/s of ONE worker (one process, one thread: what each grain worker does) turning records
   into training examples at Molmo2's real preprocessing settings (378-pixel crops, up to 8 crops;
   16-frame videos): decode (PIL / PyAV), preprocess, format, budget.
2. Packing efficiency (non-padding share of tokens) of `pipeline.PackedBatches` at each given row
   length on a corpus with a realistic length spread (sizes only: prompt 20-300 tokens, 2-8 responses
   of 20-700 tokens, an image of 1-9 crops or a video of 8-64 frames or no media), and the examples
   per second it packs (content-free examples: the cost of packing alone).
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

import grain
import numpy as np
from absl import app, flags
from PIL import Image

from mrrm_jax import backbones
from mrrm_jax.data import examples, media, packing, pipeline, records
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir
from mrrm_jax.backbones.molmo2.packing import Molmo2Media

_IMAGES = flags.DEFINE_integer("images", 40, "image records timed")
_VIDEOS = flags.DEFINE_integer("videos", 20, "16-frame video records timed")
_CORPUS = flags.DEFINE_integer("corpus", 4000, "examples in the packing corpus")
_ROW_TOKENS = flags.DEFINE_list("row_tokens", ["8192", "24576"], "packed row lengths")
_PACKING_ONLY = flags.DEFINE_bool("packing_only", False, "skip the decoding part")
_WINDOW = flags.DEFINE_integer("window", 64, "examples packed together")

RESPONSES = ["The image shows a red square on a grey background, slightly left of the centre.",
             "A blue circle is visible in the upper right corner.", "Nothing can be seen.",
             "There are two shapes: a square and a circle."]


def write_records(root: pathlib.Path, images: int, videos: int, rng) -> pathlib.Path:
    lines = []
    for i in range(images):
        width, height = int(rng.integers(320, 1600)), int(rng.integers(240, 1200))
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"i{i}.jpg")
        lines.append({"prompt": "Describe the image.", "image": f"i{i}.jpg", "responses": RESPONSES,
                      "rankings": [1, 2, 3, 4]})
    for i in range(videos):
        frames = rng.integers(0, 256, (32, 360, 640, 3), dtype=np.uint8)  # 16 s at 2 fps
        media.write_mp4(root / f"v{i}.mp4", frames, 2.0)
        lines.append({"prompt": "What happens?", "video": f"v{i}.mp4", "responses": RESPONSES,
                      "rankings": [1, 2, 3, 4]})
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def examples_per_second(prepare, items) -> float:
    prepare(0, items[0])  # opens the processor
    start = time.perf_counter()
    for index, item in enumerate(items):
        assert prepare(index, item)["example"] is not None
    return len(items) / (time.perf_counter() - start)


def fake_example(rng) -> dict:
    """Sizes of a realistic example (no content): what the packer looks at."""
    responses = int(rng.integers(2, 9))
    kind = rng.choice(["image", "video", "text"], p=[0.6, 0.25, 0.15])
    crops = {"image": int(rng.integers(1, 10)), "video": int(rng.integers(8, 65)), "text": 0}[kind]
    pooled = {"image": crops * 169, "video": crops * 81, "text": 0}[kind]
    tokens = int(rng.integers(20, 300)) + int(rng.integers(20, 700, responses).sum()) + pooled + crops * 14
    example = {"tokens": np.zeros((1, tokens), np.int32), "positions": np.arange(tokens, dtype=np.int32)[None],
               "read_positions": np.sort(rng.choice(tokens, responses, replace=False))[None].astype(np.int32),
               "labels": np.zeros(1, np.int32), "media_kind": np.zeros(1, np.int32)}
    if crops:
        example["crops"] = np.zeros((1, crops, 1, 1), np.uint8)
        example["pooling"] = np.zeros((1, pooled, 9), np.int32)
    return {"example": example, "counts": np.zeros(len(pipeline.COUNT_KEYS), np.int64), "skip": None}


def packing_efficiency(num_examples: int, row_tokens: int, window: int) -> tuple[float, float, float]:
    """(non-padding share of the row tokens, examples per row, examples packed per second)."""
    rng = np.random.default_rng(0)
    corpus = [fake_example(rng) for _ in range(num_examples)]
    corpus = [e for e in corpus if e["example"]["tokens"].shape[1] <= row_tokens]
    row = packing.RowBudget(row_tokens, row_crops=256, row_pooled=row_tokens, row_examples=32, max_responses=8)
    config = pipeline.PackingConfig(row, Molmo2Media((1, 1)), rows_per_batch=1, window=window)
    start = time.perf_counter()
    batches = list(pipeline.PackedBatches(grain.MapDataset.source(corpus).to_iter_dataset(), config))
    rate = len(corpus) / (time.perf_counter() - start)
    used = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    per_row = sum(int((b["labels"] >= 0).sum()) for b in batches) / len(batches)
    return used / (len(batches) * row_tokens), per_row, rate


def main(argv) -> None:
    del argv
    for row_tokens in map(int, _ROW_TOKENS.value):
        efficiency, per_row, rate = packing_efficiency(_CORPUS.value, row_tokens, _WINDOW.value)
        print(f"packing at {row_tokens} tokens, window {_WINDOW.value}: efficiency {efficiency:.3f} "
              f"({per_row:.1f} examples per row, {rate:.0f} examples/s packed)")
    if _PACKING_ONLY.value:
        return
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        processor = write_molmo2_processor_dir(root / "processor", video_processor_kwargs={"num_frames": 16})
        path = write_records(root, _IMAGES.value, _VIDEOS.value, rng)
        items = records.read_jsonl(path)
        prepare = pipeline.PrepareExample(processor, backbones.load_processor, examples.Budget(max_frames=16),
                                          seed=0, media_root=root)
        image_rate = examples_per_second(prepare, items[: _IMAGES.value])
        video_rate = examples_per_second(prepare, items[_IMAGES.value:])
    print(f"one worker: {image_rate:.1f} image examples/s (320-1600 px, up to 8+1 crops of 378 px), "
          f"{video_rate:.1f} video examples/s (16 frames sampled from 32, 640x360 mp4)")


if __name__ == "__main__":
    app.run(main)
