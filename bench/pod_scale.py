"""The train step at pod scale, compiled for TPU slices from this CPU host (libtpu; no TPU, no weights).

    python -m bench.pod_scale [--models=molmo2_4b,qwen3vl_4b] [--slices=v5p-8,v5p-32,...] [--out=FILE.json]

Weak scaling: each generation's config (configs/<model>_<generation>.py) keeps its rows per chip and
takes every chip of the slice as its FSDP axis (rows per step = rows per chip x chips). Per slice it
compiles the real step once for the per-chip memory XLA plans, and three shallow unrolled steps for the
FLOPs and the collectives' bytes per chip per step (`aot.step_costs`), then prints one markdown row:
memory, FLOPs, collective results by kind, and two bounds on the step: compute at the chip's bf16 peak,
and the bytes each chip sends (ring algorithms: all-gather and all-to-all results x (n-1)/n,
reduce-scatter results x (n-1), all-reduce results x 2(n-1)/n, permutes x 1) over its ICI bandwidth.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time

from mrrm_jax.training import aot
from mrrm_jax.training import spec as run_spec

# slice -> (topology, generation); a vN-M name counts TensorCores, two per v4/v5p chip, one per v5e chip
SLICES = {"v5p-8": ("v5p:2x2x1", "v5p"), "v5p-32": ("v5p:2x2x4", "v5p"), "v5p-128": ("v5p:4x4x4", "v5p"),
          "v4-8": ("v4:2x2x1", "v4"), "v4-32": ("v4:2x2x4", "v4"), "v4-64": ("v4:2x4x4", "v4"),
          "v5e-16": ("v5e:4x4", "v5e"), "v5e-64": ("v5e:8x8", "v5e"), "v5e-256": ("v5e:16x16", "v5e")}
# Google's published per-chip figures: bf16 peak (TFLOP/s) and inter-chip interconnect bandwidth (GB/s)
PEAK_TFLOPS = {"v5p": 459, "v4": 275, "v5e": 197}
ICI_GBYTES = {"v5p": 4800 / 8, "v4": 2400 / 8, "v5e": 1600 / 8}


def sent_bytes(collectives: dict[str, float], n: int) -> float:
    """Bytes one chip sends for these collective results over groups of n chips (ring algorithms)."""
    share = (n - 1) / n
    return (collectives["all-gather"] * share + collectives["reduce-scatter"] * (n - 1)
            + collectives["all-reduce"] * 2 * share + collectives["all-to-all"] * share
            + collectives["collective-permute"])


def scaled_spec(model: str, generation: str, chips: int) -> run_spec.RunSpec:
    base = importlib.import_module(f"configs.{model}_{generation}").get_config()
    rows_per_chip = base.train.rows_per_step // (base.mesh.fsdp if base.mesh.fsdp > 0 else _base_chips(generation))
    base.mesh = dict(data=1, fsdp=chips, tensor=1)
    base.train.rows_per_step = rows_per_chip * chips
    return run_spec.parse(base, training=False)


def _base_chips(generation: str) -> int:
    """The chips of the slice a generation's config was written for (fsdp=-1 takes them all)."""
    return {"v5p": 4, "v4": 4, "v5e": 16}[generation]


def measure(model: str, slice_name: str) -> dict:
    topology, generation = SLICES[slice_name]
    chips = len(aot.topology_devices(topology))
    spec = scaled_spec(model, generation, chips)
    started = time.perf_counter()
    report = aot.compile_for(spec, topology)
    costs = aot.step_costs(spec, topology)
    return {"model": model, "slice": slice_name, "topology": topology, "chips": chips,
            "rows_per_step": spec.train.rows_per_step, "grad_accum": spec.train.grad_accum,
            "row_tokens": spec.row.row_tokens, "memory_gib": report.total_gib, "hbm_gib": report.hbm_gib,
            "flops": costs.flops, "collective_bytes": costs.collective_bytes,
            "compute_s": costs.flops / (PEAK_TFLOPS[generation] * 1e12),
            "ici_s": sent_bytes(costs.collective_bytes, chips) / (ICI_GBYTES[generation] * 1e9),
            "compile_s": time.perf_counter() - started}


def row(m: dict) -> str:
    gib = lambda op: f"{m['collective_bytes'][op] / 2**30:.2f}"
    return (f"| {m['model']} | {m['slice']} (`{m['topology']}`) | {m['chips']} | {m['rows_per_step']} | "
            f"{m['memory_gib']:.2f} of {m['hbm_gib']} | {m['flops']:.3e} | {gib('all-gather')} / "
            f"{gib('reduce-scatter')} / {gib('all-reduce')} / {gib('all-to-all')} | "
            f"{m['compute_s']:.2f} | {m['ici_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="molmo2_4b,qwen3vl_4b")
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--out", default=None, help="also write the measurements as JSON lines here")
    args = parser.parse_args()
    print("| model | slice | chips | rows/step | memory per chip, GiB (of HBM) | FLOPs per chip per step | "
          "collective results per chip per step, GiB: all-gather / reduce-scatter / all-reduce / all-to-all | "
          "step at bf16 peak, s | ICI time at full bandwidth, s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        for slice_name in args.slices.split(","):
            measured = measure(model, slice_name)
            print(row(measured), flush=True)
            if args.out:
                with open(args.out, "a") as out:
                    out.write(json.dumps(measured) + "\n")


if __name__ == "__main__":
    main()
