"""Conversion speed and memory: `python -m mrrm_jax.prepare` on a generated RLAIF-V release.

    python bench/prepare.py [--rows=20000] [--runs=local:1,local:2,direct:2]

Writes RLAIF-V-style parquet shards (the release's nine columns, a distinct 320x240 JPEG embedded per
row, 1,000 rows per shard), then runs the command once per runner and worker count into a fresh --out and
prints records/s and the peak RSS of the command's main process (the reader and writer; the
streaming claim is about this one). Worker processes hold one chunk of rows each on top.
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROWS_PER_SHARD = 1000
SCHEMA = pa.schema([("ds_name", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                    ("question", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                    ("origin_dataset", pa.string()), ("origin_split", pa.string()), ("idx", pa.string()),
                    ("image_path", pa.string())])


def jpeg(index: int) -> bytes:
    """A 320x240 picture, a gradient with photo-like grain (so it compresses like a photo), the row's
    number drawn into its pixels: every row's image is distinct."""
    y, x = np.mgrid[0:240, 0:320]
    grain = np.random.default_rng(index).normal(0, 12, (240, 320, 3))
    pixels = np.clip(np.stack([x * 0.7, y * 1.0, (x + y) * 0.4], -1) + grain, 0, 255)
    bits = np.array([(index >> b) & 1 for b in range(16)], np.uint8) * 255
    pixels[:8, :128] = np.repeat(bits, 8)[None, :, None]
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def write_release(root: pathlib.Path, rows: int) -> int:
    root.mkdir(parents=True)
    for shard, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        batch = [{"ds_name": "RLAIF-V", "image": {"bytes": jpeg(i), "path": f"{i}.jpg"},
                  "question": f"Describe image {i} in detail.", "chosen": f"A faithful description of image {i}.",
                  "rejected": f"A description of image {i} with an object that is not there.", "origin_dataset": "COCO",
                  "origin_split": '{"type": "detailed description"}', "idx": str(i), "image_path": f"{i}.jpg"}
                 for i in range(start, min(rows, start + ROWS_PER_SHARD))]
        pq.write_table(pa.Table.from_pylist(batch, schema=SCHEMA), root / f"RLAIF-V-Dataset_{shard:03d}.parquet")
    return sum(p.stat().st_size for p in root.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--runs", default="local:1,local:2,direct:2",
                        help="RUNNER:WORKERS pairs: local worker processes, or Beam's DirectRunner in "
                             "multi-processing mode with that many workers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        release = pathlib.Path(tmp) / "release"
        size = write_release(release, args.rows)
        print(f"release: {args.rows} rows, {size / 2**20:.1f} MiB of parquet in {len(list(release.iterdir()))} shards")
        for run in args.runs.split(","):
            runner, workers = run.split(":")
            out = pathlib.Path(tmp) / f"out-{runner}-{workers}"
            parallel = ([f"--workers={workers}"] if runner == "local" else
                        [f"--runner={runner}", f"--beam_option=--direct_num_workers={workers}",
                         "--beam_option=--direct_running_mode=multi_processing"])
            started = time.perf_counter()
            child = subprocess.Popen([sys.executable, "-m", "mrrm_jax.prepare", "--dataset=rlaif_v", f"--input={release}",
                                      f"--out={out}", *parallel], stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - started
            if status != 0:
                sys.exit(f"error: prepare exited with {status}")
            print(f"runner={runner} workers={workers}: {args.rows / seconds:,.0f} records/s ({seconds:.1f} s), "
                  f"main process peak RSS {usage.ru_maxrss / 2**10:.0f} MiB")

if __name__ == "__main__":
    main()
