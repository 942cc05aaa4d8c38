"""Molmo2 preprocessing speed: our numpy `preprocess` vs transformers' torch processors, same inputs.

    python -m bench.preprocess [--repeats=7] [--frames=32] [--frame_size=720x1280] [--threads=1]

Run from the repository root. Molmo2's default processor settings (378-pixel crops, up to 8 crops,
64 frames at <= 2 fps), written by `write_molmo2_processor_dir`. Generated inputs: 12 random RGB PIL
images from 320 to 1,600 pixels a side, aspect ratios 1:4 to 4:1 (what both sides get from the
loader), and one video of `--frames` random decoded frames (uint8 arrays: decoding is not timed) at
2 fps (the sampling keeps all of them up to 64; times are per sampled frame).

Timed in one process, interleaved (the order alternating between repeats), median and min of
`--repeats` runs each:
  images   `preprocess.image_inputs(images)` vs `processor.image_processor(images=images)`
  video    `preprocess.sample_video` + `video_inputs` vs `processor.video_processor(videos=[frames])`
Ours is single-threaded numpy. `--threads=1` (the default) pins the process to one core and gives
torch one thread; more gives torch that many (ours still uses one). The script prints how much CPU
other processes took during the timed runs, and how many output values differ between the sides
(none with 2+ torch threads; a few with one, where torch runs another bilinear kernel: see
preprocess.py).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers.video_utils import VideoMetadata

from bench.forward import busy_cpu_seconds
from mrrm_jax.backbones.molmo2 import preprocess
from mrrm_jax.backbones import load_processor
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir

# (height, width): 320 to 1,600 pixels, portrait, landscape, square and panoramic.
IMAGE_SIZES = [(320, 480), (480, 320), (400, 1600), (1600, 400), (512, 512), (600, 800), (768, 1024),
               (1024, 768), (900, 1200), (1200, 1600), (1600, 1200), (1500, 1500)]
FPS = 2.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--frame_size", default="720x1280", help="HEIGHTxWIDTH of the video frames")
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 also pins the process to one core")
    args = parser.parse_args()
    if args.threads == 1:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGE_SIZES]
    height, width = (int(v) for v in args.frame_size.split("x"))
    frames = rng.integers(0, 256, (args.frames, height, width, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor(write_molmo2_processor_dir(pathlib.Path(tmp)))
    options = preprocess.VisionOptions.from_processor(processor)

    def ours_video():
        sampled, _ = preprocess.sample_video(frames, {"total_num_frames": len(frames), "fps": FPS}, options)
        return preprocess.video_inputs(sampled, options)

    runs = {
        "images, ours": lambda: preprocess.image_inputs(images, options)["pixel_values"],
        "images, transformers": lambda: processor.image_processor(images=images, return_tensors="np")["pixel_values"],
        "video, ours": lambda: ours_video()["pixel_values_videos"],
        "video, transformers": lambda: processor.video_processor(
            videos=[frames], video_metadata=[VideoMetadata(total_num_frames=len(frames), fps=FPS)],
            return_tensors="np")["pixel_values_videos"],
    }
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared below
    seconds = {name: [] for name in runs}
    machine_start, own_start = busy_cpu_seconds()
    wall_start = time.perf_counter()
    for repeat in range(args.repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    wall_seconds = time.perf_counter() - wall_start
    machine_end, own_end = busy_cpu_seconds()
    other_cpu_seconds = max(0.0, (machine_end - machine_start) - (own_end - own_start))

    units = {"images": (len(images), "image"), "video": (len(outputs["video, ours"]), "frame")}
    print(f"torch threads {torch.get_num_threads()}, ours 1 thread; {len(os.sched_getaffinity(0))} core(s); "
          f"{args.repeats} interleaved repeats; {len(images)} images of {IMAGE_SIZES[0]} .. {IMAGE_SIZES[-1]}; "
          f"video {units['video'][0]} frames of {height}x{width} sampled from {len(frames)}\n")
    print(f"{'':24}{'median ms':>10}{'min ms':>9}   per")
    for name, samples in seconds.items():
        count, unit = units[name.split(",")[0]]
        print(f"{name:24}{statistics.median(samples) / count * 1e3:>10.1f}{min(samples) / count * 1e3:>9.1f}   {unit}")
    for kind in units:
        ours, theirs = seconds[f"{kind}, ours"], seconds[f"{kind}, transformers"]
        ours_out, theirs_out = outputs[f"{kind}, ours"], outputs[f"{kind}, transformers"]
        differ = int((ours_out != theirs_out).sum()) if ours_out.shape == theirs_out.shape else "all"
        print(f"{kind}: transformers / ours time = {statistics.median(theirs) / statistics.median(ours):.2f} "
              f"(median), {min(theirs) / min(ours):.2f} (min); values that differ: {differ} of {ours_out.size:,}")
    print(f"other processes used {other_cpu_seconds:.1f} CPU-seconds of the machine's "
          f"{os.cpu_count() * wall_seconds:.1f} during the timed runs")


if __name__ == "__main__":
    main()
