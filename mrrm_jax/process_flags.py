"""The flags that run a command as one of several processes under `jax.distributed` (train, score, evaluate)."""

from __future__ import annotations

from absl import flags

# Passed to jax.distributed.initialize (None: JAX's own detection, JAX_COORDINATOR_ADDRESS or the cluster's).
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "with several processes: HOST:PORT of process 0")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "with several processes: how many")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "with several processes: this process's id, 0 .. n-1")


def given() -> list[str]:
    """The flags of this module given on the command line."""
    return [f"--{flag.name}" for flag in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if flag.value is not None]


def initialize() -> None:
    """Joins the other processes; before anything else starts JAX's backends."""
    import jax

    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)
