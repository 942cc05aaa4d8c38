"""End-to-end scoring throughput: `python -m mrrm_jax.score` vs a PyTorch scorer, whole processes.

    python -m bench.score_e2e [--records=96] [--modes=multi,single] [--repeats=3] [--threads=N]
        [--lm_layers=4] [--hidden=256] [--timeout=1800] [--ours_flags='--attention=blockwise']

Run from the repository root. In a temp dir:

1. A release-layout PyTorch reward model (paper.md, "Released checkpoint layout"): a random transformers
   `Molmo2ForConditionalGeneration` (bench/multi_vs_single.py's small model: LM `--lm_layers` x `--hidden`,
   ViT 5 x 128 on 378 x 378 crops) saved with `save_pretrained`, with the default Molmo2 processor files;
   a PEFT LoRA adapter on the LM projections (rank 8, random non-zero B) saved by PEFT, with the processor
   (`<|resp_sep|>` added), value_head.pt and reward_model_config.json. Imported with
   `tools/import_reward_model.py`, as a user of ours would.
2. `--records` JSONL records, a quarter each: text only, one image, two images, one video (in turn); images
   320-1600 px a side, PNG or JPEG; videos H.264 mp4 (`media.write_mp4`), 2-6 s at 10-30 fps; 2-4
   responses of 1-9 sentences; media paths relative to the JSONL.
3. Each scorer as its own process, whole process timed (imports, loading, compiling, decoding,
   preprocessing, scoring), peak RSS from wait4 (bench/measure.py):
     ours   python -m mrrm_jax.score --checkpoint=IMPORTED --input=... --output=... --mode=MODE [--ours_flags]
            (packed rows, its default shapes; its last stderr line says how many programs it compiled)
     torch  python -m bench.torch_scorer --base=... --adapter=... (transformers + PEFT + value head, HF
            processor, one forward per record; see its docstring)
   `--mode=single`: every response in its own sequence. Runs are interleaved (ours and torch in turn,
   the order alternating by repeat); median and min over `--repeats`. Both sides get `--threads` cores
   (the process pinned to them, torch.set_num_threads; default all).
4. Checks that both give the same scores (max abs difference per mode): the same model on the same
   records, so a difference beyond float32 noise is a bug on one side.

Prints a table (records/s, wall s, in-loop s, CPU s, peak RSS, compiled programs) and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from bench.measure import REPO, run_measured
from bench.multi_vs_single import english_text, small_hf_config
from mrrm_jax import backbones
from mrrm_jax.data import media
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir

KINDS = ("text", "image", "two_images", "video")
LORA_RANK, LORA_ALPHA = 8, 16
HEAD_HIDDEN = 1024
TOLERANCE = 1e-4  # max abs score difference, float32 on both sides
MiB = 2**20
PROMPTS = {
    "text": "Answer the question and explain your reasoning: what makes a photograph feel calm?",
    "image": "Which of these descriptions of the image is the most accurate and complete?",
    "two_images": "Compare the two images: what differs between them, and which details do they share?",
    "video": "Describe what happens in the video, in order, and mention anything that moves.",
}
# The scorers' last stderr line (ours adds its program count).
SUMMARY = re.compile(r"scored (\d+), failed (\d+) of (\d+) records in ([\d.]+)s(?:; (\d+) compiled programs)?")


# -- 1. the release ----------------------------------------------------------------------------

def build_release(root: pathlib.Path, lm_layers: int, hidden: int) -> tuple[pathlib.Path, pathlib.Path]:
    """(base dir, adapter dir) of a random release-layout reward model."""
    import peft
    import torch
    from transformers import Molmo2ForConditionalGeneration

    from bench.torch_scorer import value_head

    base_dir, adapter_dir = root / "base", root / "adapter"
    torch.manual_seed(0)
    model = Molmo2ForConditionalGeneration(small_hf_config(lm_layers, hidden)).eval()
    model.save_pretrained(base_dir)
    write_molmo2_processor_dir(base_dir)  # a Molmo2 checkpoint's own processor: no `<|resp_sep|>`

    # LoRA on the language model only (the ViT and the adapter have q_proj ... down_proj too).
    targets = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
    lora_model = peft.get_peft_model(model, peft.LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.05,
                                                            target_modules=targets))
    with torch.no_grad():
        for name, weight in lora_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: the adapter would change nothing
                weight.normal_(0, 0.05)
    lora_model.save_pretrained(adapter_dir)
    backbones.load_processor(base_dir).save_pretrained(adapter_dir)  # the release ships it, separator added

    release_config = {"value_head_type": "mlp", "value_head_hidden_dim": HEAD_HIDDEN, "value_head_activation": "silu",
                      "value_head_input_dim": hidden, "resp_repr_mode": "last"}
    head = value_head(release_config, hidden)
    with torch.no_grad():
        head[2].weight.mul_(10)  # larger scores (|score| up to ~0.25), so that the agreement check means something
    torch.save(head.state_dict(), adapter_dir / "value_head.pt")
    (adapter_dir / "reward_model_config.json").write_text(json.dumps(release_config))
    return base_dir, adapter_dir


# -- 2. the records ----------------------------------------------------------------------------

def smooth_pixels(rng: np.random.RandomState, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: coarse random colours upsampled, plus a little noise (photo-like, so
    PNG and JPEG compress it as they would a photo, not as noise)."""
    coarse = Image.fromarray(rng.randint(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.randint(-8, 9, (height, width, 3))
    return np.clip(np.asarray(coarse, np.int16) + noise, 0, 255).astype(np.uint8)


def write_image(rng, path_stem: pathlib.Path) -> pathlib.Path:
    width, height = rng.randint(320, 1601, size=2)
    path = path_stem.with_suffix(rng.choice([".png", ".jpg"]))
    Image.fromarray(smooth_pixels(rng, height, width)).save(path)
    return path


def write_video(rng, path: pathlib.Path) -> pathlib.Path:
    width, height = [(320, 240), (480, 272), (640, 360)][rng.randint(3)]
    fps = float(rng.choice([10, 15, 24, 30]))
    frames = int(rng.randint(2, 7) * fps)
    background = smooth_pixels(rng, height, width + frames * 4)
    # The scene pans 4 px a frame.
    media.write_mp4(path, np.stack([background[:, 4 * t: 4 * t + width] for t in range(frames)]), fps)
    return path


def write_records(root: pathlib.Path, count: int, seed: int = 0) -> pathlib.Path:
    """records.jsonl under `root`, media under root/media; kinds in turn (KINDS)."""
    rng = np.random.RandomState(seed)
    (root / "media").mkdir(parents=True)
    lines = []
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        record = {"id": f"{kind}-{index}", "prompt": PROMPTS[kind] + " " + english_text(rng, 1),
                  "responses": [english_text(rng, rng.randint(1, 10)) for _ in range(rng.randint(2, 5))]}
        stem = root / "media" / f"{index:04d}"
        if kind == "image":
            record["image"] = write_image(rng, stem).relative_to(root).as_posix()
        elif kind == "two_images":
            record["image"] = [write_image(rng, stem.with_name(f"{stem.name}_{i}")).relative_to(root).as_posix()
                               for i in range(2)]
        elif kind == "video":
            record["video"] = write_video(rng, stem.with_suffix(".mp4")).relative_to(root).as_posix()
        lines.append(json.dumps(record))
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# -- 3. the runs -------------------------------------------------------------------------------

def command(side: str, mode: str, dirs: dict, input_path: pathlib.Path, output: pathlib.Path,
             threads: int, ours_flags: list[str]) -> list[str]:
    if side == "ours":
        return [sys.executable, "-m", "mrrm_jax.score", f"--checkpoint={dirs['imported']}", f"--input={input_path}",
                f"--output={output}", f"--mode={mode}", *ours_flags]
    return [sys.executable, "-m", "bench.torch_scorer", f"--base={dirs['base']}", f"--adapter={dirs['adapter']}",
            f"--input={input_path}", f"--output={output}", f"--mode={mode}", f"--threads={threads}"]


def read_scores(path: pathlib.Path, count: int) -> list[list[float]]:
    out = [json.loads(line) for line in path.read_text().splitlines()]
    errors = [o for o in out if "error" in o]
    if errors or len(out) != count:
        raise RuntimeError(f"{path}: {len(out)} lines for {count} records; errors: {errors[:3]}")
    return [o["scores"] for o in sorted(out, key=lambda o: o["index"])]


def run_once(side, mode, dirs, input_path, count, threads, timeout, tmp: pathlib.Path, env, ours_flags) -> dict:
    output, log = tmp / f"{side}_{mode}.jsonl", tmp / f"{side}_{mode}.log"
    measured = run_measured(command(side, mode, dirs, input_path, output, threads, ours_flags), log, timeout=timeout,
                            cpus=threads if threads < len(os.sched_getaffinity(0)) else 0, env=env)
    summary = SUMMARY.findall(log.read_text())
    if not summary:
        raise RuntimeError(f"{side} {mode}: no summary line in its output:\n{log.read_text()[-3000:]}")
    scored, failed, total, loop_s, programs = summary[-1]
    return {"measured": measured, "loop_s": float(loop_s), "programs": int(programs) if programs else None,
            "scores": read_scores(output, count)}


# -- 4. the report -----------------------------------------------------------------------------

def max_abs_difference(a: list[list[float]], b: list[list[float]]) -> float:
    if [len(s) for s in a] != [len(s) for s in b]:
        raise RuntimeError("the two sides gave different numbers of scores")
    return float(np.abs(np.concatenate([np.subtract(x, y) for x, y in zip(a, b)])).max())


def report(runs: dict, modes: list[str], count: int, threads: int, repeats: int) -> list[str]:
    """Prints the table and ratios; returns the failed checks."""
    med = statistics.median
    wall = {key: [r["measured"].wall_s for r in rs] for key, rs in runs.items()}
    print(f"\n{count} records, {threads} thread(s) a side, median (min) of {repeats} whole-process run(s); "
          "in-loop = the scorer's own time for the records, after imports and loading\n")
    print(f"{'':14}{'records/s':>14}{'wall s':>15}{'in-loop s':>11}{'CPU s':>8}{'peak RSS MB':>13}"
          f"{'programs':>10}{'other CPU':>11}")
    for (side, mode), rs in runs.items():
        rss = max(r["measured"].peak_rss_bytes for r in rs) / MiB
        programs = "-" if rs[-1]["programs"] is None else rs[-1]["programs"]
        other = sum(r["measured"].other_cpu_s for r in rs) / sum(r["measured"].wall_s for r in rs) / os.cpu_count()
        print(f"{side + ' ' + mode:14}{count / med(wall[side, mode]):>7.2f} ({count / min(wall[side, mode]):.2f})"
              f"{med(wall[side, mode]):>8.1f} ({min(wall[side, mode]):.1f})"
              f"{med(r['loop_s'] for r in rs):>11.1f}{med(r['measured'].cpu_s for r in rs):>8.1f}{rss:>13.0f}"
              f"{programs:>10}{other:>10.0%}")
    print("(other CPU: the share of the machine's CPU time that other processes took during the runs: high "
          "values make\nthe seconds noisy; peak RSS is the max over repeats)\n")

    failed = []
    for mode in modes:
        speed, speed_min = med(wall["torch", mode]) / med(wall["ours", mode]), min(wall["torch", mode]) / min(wall["ours", mode])
        rss_ratio = (max(r["measured"].peak_rss_bytes for r in runs["ours", mode])
                     / max(r["measured"].peak_rss_bytes for r in runs["torch", mode]))
        difference = max_abs_difference(runs["ours", mode][0]["scores"], runs["torch", mode][0]["scores"])
        scale = max(abs(s) for scores in runs["torch", mode][0]["scores"] for s in scores)
        print(f"{mode:6}: ours / torch records/s {speed:.2f}x (at min {speed_min:.2f}x; target >= 1.5x), peak RSS "
              f"{rss_ratio:.2f}x (target <= 1x); scores max abs difference {difference:.1e} (max |score| {scale:.2f})")
        if difference > TOLERANCE:
            failed.append(f"{mode}: ours and torch disagree by {difference:.1e} > {TOLERANCE:.0e}")
    if len(modes) == 2:
        for side in ("ours", "torch"):
            print(f"{side:6}: multi / single records/s {med(wall[side, 'single']) / med(wall[side, 'multi']):.2f}x")
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--modes", default="multi,single", help="comma-separated: multi, single")
    parser.add_argument("--repeats", type=int, default=3, help="whole-process runs per side and mode")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores for each side (default all)")
    parser.add_argument("--lm_layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds, per subprocess")
    parser.add_argument("--ours_flags", default="", help="extra flags for mrrm_jax.score, e.g. '--attention=blockwise'")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"multi", "single"}:
        parser.error(f"--modes={args.modes}: expected multi, single or both")

    start = time.perf_counter()
    # JAX_PLATFORMS=cpu: a CPU machine's install (`pip install -e .`) has no TPU runtime; the `[tpu]` extra's
    # libtpu, probed when present, costs ~100 MB of RSS and a few tenths of a second on a machine without a TPU.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with tempfile.TemporaryDirectory(prefix="score_e2e_") as tmp:
        tmp = pathlib.Path(tmp)
        dirs = dict(zip(("base", "adapter"), build_release(tmp, args.lm_layers, args.hidden)))
        dirs["imported"] = tmp / "imported"
        imported = run_measured([sys.executable, "tools/import_reward_model.py", f"--base={dirs['base']}",
                                 f"--adapter={dirs['adapter']}", f"--out={dirs['imported']}"],
                                tmp / "import.log", timeout=args.timeout, env=env)
        input_path = write_records(tmp / "data", args.records)
        kinds = {kind: sum(1 for i in range(args.records) if KINDS[i % len(KINDS)] == kind) for kind in KINDS}
        print(f"release: LM {args.lm_layers} x {args.hidden}, LoRA rank {LORA_RANK} on the LM, MLP head; imported in "
              f"{imported.wall_s:.0f} s; records: {kinds}; set up in {time.perf_counter() - start:.0f} s", flush=True)

        runs = {(side, mode): [] for mode in modes for side in ("ours", "torch")}
        for repeat in range(args.repeats):
            for mode in modes:
                for side in ("ours", "torch")[:: 1 if repeat % 2 == 0 else -1]:
                    run = run_once(side, mode, dirs, input_path, args.records, args.threads, args.timeout, tmp, env,
                                   args.ours_flags.split())
                    runs[side, mode].append(run)
                    print(f"  {side} {mode}: {run['measured'].wall_s:.1f} s, "
                          f"{run['measured'].peak_rss_bytes / MiB:.0f} MB", flush=True)
        failed = report(runs, modes, args.records, args.threads, args.repeats)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if failed:
        sys.exit("FAILED: " + "; ".join(failed))


if __name__ == "__main__":
    main()
