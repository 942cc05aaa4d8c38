"""Evaluation throughput: multi-response vs one pass per response on the same synthetic benchmark.

    python -m bench.evaluate [--images=48] [--videos=16] [--batch_size=4] [--lm_layers=4] [--hidden=256]

Run from the repository root. The benchmark is the demo's synthetic corpus (image and video questions,
4 ranked responses each, the authors' JSONL schema, read as `--benchmark=jsonl`); the model is the small
random Molmo2 of `bench.multi_vs_single` (converted, LoRA merged, value head) with Molmo2's DEFAULT
processor (378 px crops, up to 8 + 1 crops, 64 frames). For each mode the whole `mrrm_jax.benchmarks.runner.run`
path is timed (media decoding in worker threads, preprocessing, formatting, batching, the forward,
scores.jsonl and the report), twice: cold (compiling every program it meets) and warm (a fresh output
directory, the same model: the programs are compiled). Prints records/s, the compiled program count
and the accuracy (a random model: near chance, 0.25). Also `--order=rotations` (N passes per record).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

import jax

from bench.multi_vs_single import build_reward_dir
from mrrm_jax.benchmarks import runner
from mrrm_jax.benchmarks import formats
from mrrm_jax.data import synthetic
from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir
from mrrm_jax.scoring.reward_model import RewardModel


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--videos", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=4, help="packed rows per forward pass")
    parser.add_argument("--lm_layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data = synthetic.write_corpus(tmp / "bench", args.images, args.videos, seed=0)
        processor_dir = write_molmo2_processor_dir(tmp / "processor")  # Molmo2's default settings
        reward_dir = build_reward_dir(tmp, processor_dir, args.lm_layers, args.hidden)
        print(f"{args.images} image + {args.videos} video records (N = 4), batches of {args.batch_size} packed rows, "
              f"{jax.device_count()} device(s), {os.cpu_count()} cores")
        print(f"{'mode':<18} {'run':<5} {'seconds':>8} {'records/s':>10} {'programs':>9} {'accuracy':>9}")
        for mode, order in (("multi", "shuffle"), ("single", "shuffle"), ("multi", "rotations")):
            model = RewardModel.load(reward_dir, rows=args.batch_size)  # one per mode, so each row counts its own programs
            spec, items = formats.read("jsonl", data)
            for run in ("cold", "warm"):
                settings = {"benchmark": "jsonl", "data": str(data), "checkpoint": "", "order": order, "seed": 0,
                            "mode": mode, "limit": None}
                start = time.perf_counter()
                result = runner.run(model, spec, items, tmp / f"out_{mode}_{order}_{run}", settings)
                seconds = time.perf_counter() - start
                label = mode if order == "shuffle" else f"{mode} {order}"
                print(f"{label:<18} {run:<5} {seconds:8.1f} {result['num_scored'] / seconds:10.2f} "
                      f"{len(model.programs):9d} {result['overall']:9.3f}")


if __name__ == "__main__":
    main()
