"""Compile the real train step of a config for a TPU slice, from a CPU host, and check that it fits.

    python tools/aot_compile.py --config=configs/molmo2_4b_v5p.py --topology=v5p:2x2x1

Needs libtpu (`pip install -e '.[tpu]'`); no TPU and no weights: parameters, optimizer state and
the batch are abstract (shapes, dtypes and shardings only). Prints the per-chip memory that XLA
plans (arguments, outputs, temporaries) against the chip's HBM and the step's FLOPs per chip, and
exits 1 if it does not fit; with `model.remat="auto"` it first prints each policy's plan and takes the
first that fits (`aot.resolve_remat`). XLA's cost analysis counts a loop body (a scanned layer, the micro-step
loop) once; `--flops` adds the whole step's FLOPs and collective bytes per chip, from three shallow
unrolled compiles extrapolated over depth (`aot.step_costs`; three more compiles).
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from mrrm_jax.training import aot
from mrrm_jax.training import spec as run_spec

_CONFIG = config_flags.DEFINE_config_file("config", None, "a config file (configs/*.py)", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "e.g. v5p:2x2x1, v4:2x2x1, v5e:4x4")
_FLOPS = flags.DEFINE_bool("flops", False, "also count the whole step's FLOPs and collective bytes (every layer and micro-step)")


def main(argv) -> None:
    del argv
    try:
        spec = run_spec.parse(_CONFIG.value, training=False)
        if spec.model.remat == "auto":
            spec, plan = aot.resolve_remat(spec, aot.topology_devices(_TOPOLOGY.value))
            print("model.remat='auto': " + ", ".join(
                f"{policy} {'refused' if n is None else f'{n / 2**30:.2f} GiB'}" for policy, n in plan.items())
                  + f" per chip -> {spec.model.remat}")
        r = aot.compile_for(spec, _TOPOLOGY.value)
    except run_spec.ConfigError as error:
        sys.exit(f"error: {error}")
    except jax.errors.JaxRuntimeError as error:  # XLA refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        sys.exit(f"does not fit: {str(error).splitlines()[0]}")
    print(f"{r.topology} ({r.chips} x {r.kind}), mesh {spec.mesh}, rows/step {spec.train.rows_per_step} x "
          f"{spec.row.row_tokens} tokens, grad_accum {spec.train.grad_accum}, remat {spec.model.remat}")
    print(f"per chip: arguments {r.argument_gib:.2f} GiB, outputs {r.output_gib:.2f} GiB (aliased {r.alias_gib:.2f}), "
          f"temporaries {r.temp_gib:.2f} GiB, total {r.total_gib:.2f} GiB of {r.hbm_gib} GiB HBM")
    print(f"FLOPs per chip, each loop body counted once: {r.flops:.3e}")
    if r.hbm_gib is None:
        sys.exit(f"unknown HBM size for {r.kind!r}")
    if not r.fits:
        sys.exit(f"does not fit: {r.total_gib:.2f} GiB > {r.hbm_gib} GiB")
    if _FLOPS.value:
        costs = aot.step_costs(spec, _TOPOLOGY.value)
        print(f"FLOPs per chip per step: {costs.flops:.3e}; collective results per chip per step: "
              + ", ".join(f"{op} {n / 2**30:.2f} GiB" for op, n in costs.collective_bytes.items()))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "topology"])
    app.run(main)
