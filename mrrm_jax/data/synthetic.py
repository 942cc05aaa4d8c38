"""The synthetic demo corpus: image and video questions whose answers depend on the media.

Images: "What colour is the shape?" - one square or disc of a palette colour on a grey background,
random size, place and image size. The four responses name the true colour (rank 1) and three others
ranked by how far their RGB value is from it.

Videos (mp4, 4 frames at 2 fps): "What colour is the light at the end of the video?" - a disc that
shows four different colours in turn. The responses name the last colour (rank 1), the one before it
(2), the one before that (3) and a colour never shown (4): reading the wrong frame is less wrong than
inventing a colour. The first colour is never a response, so a model shown a frozen first frame has
no right answer to fall back on: its accuracy drops to chance.

Every record is in the paper's schema (`prompt`, `image` or `video`, `responses`, `rankings`).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image, ImageDraw

from mrrm_jax.data import media

PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 230), "yellow": (235, 215, 30),
    "purple": (140, 40, 180), "orange": (245, 130, 20), "white": (250, 250, 250), "black": (15, 15, 15),
}
IMAGE_PROMPT = "What colour is the shape?"
VIDEO_PROMPT = "What colour is the light at the end of the video?"
VIDEO_FRAMES, VIDEO_FPS, VIDEO_SIZE = 4, 2.0, 64


def _answer(colour: str) -> str:
    return f"It is {colour}."


def image_record(rng: np.random.Generator, path: pathlib.Path) -> dict:
    names = list(PALETTE)
    true = names[rng.integers(len(names))]
    width, height = (int(v) for v in rng.integers(48, 129, size=2))
    grey = int(rng.integers(90, 170))
    image = Image.new("RGB", (width, height), (grey, grey, grey))
    side = int(rng.integers(min(width, height) // 3, min(width, height) * 2 // 3))
    x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
    draw = ImageDraw.Draw(image)
    (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x, y, x + side, y + side], fill=PALETTE[true])
    image.save(path)
    others = [n for n in names if n != true]
    distractors = [others[i] for i in rng.choice(len(others), 3, replace=False)]
    distance = lambda n: np.linalg.norm(np.subtract(PALETTE[n], PALETTE[true]))
    ranked = sorted(distractors, key=distance)
    colours = [true, *distractors]
    rankings = [1] + [2 + ranked.index(n) for n in distractors]
    return {"prompt": IMAGE_PROMPT, "image": path.name, "responses": [_answer(c) for c in colours],
            "rankings": rankings}


def video_record(rng: np.random.Generator, path: pathlib.Path) -> dict:
    names = list(PALETTE)
    shown = [names[i] for i in rng.choice(len(names), VIDEO_FRAMES + 1, replace=False)]
    unseen = shown.pop()
    frames = np.full((VIDEO_FRAMES, VIDEO_SIZE, VIDEO_SIZE, 3), 110, np.uint8)
    yy, xx = np.mgrid[:VIDEO_SIZE, :VIDEO_SIZE]
    for frame, colour in zip(frames, shown):
        cy, cx, radius = (VIDEO_SIZE / 2 + rng.integers(-8, 9, size=2)).tolist() + [int(rng.integers(18, 26))]
        frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = PALETTE[colour]
    media.write_mp4(path, frames, VIDEO_FPS)
    colours = [shown[-1], shown[-2], shown[-3], unseen]
    return {"prompt": VIDEO_PROMPT, "video": path.name, "responses": [_answer(c) for c in colours],
            "rankings": [1, 2, 3, 4]}


def write_corpus(out_dir, num_images: int, num_videos: int, seed: int) -> pathlib.Path:
    """Write `corpus.jsonl` and its media under `out_dir` (kept if already complete); returns the JSONL."""
    out_dir = pathlib.Path(out_dir)
    jsonl = out_dir / "corpus.jsonl"
    if jsonl.exists() and len(jsonl.read_text().splitlines()) == num_images + num_videos:
        return jsonl
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = [json.dumps(image_record(rng, out_dir / f"image_{i:05d}.png")) for i in range(num_images)]
    lines += [json.dumps(video_record(rng, out_dir / f"video_{i:05d}.mp4")) for i in range(num_videos)]
    # Written last and atomically: a half-written corpus is never taken for a complete one.
    tmp = jsonl.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(jsonl)
    return jsonl
