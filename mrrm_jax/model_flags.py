"""The command-line flags that load a `RewardModel` for offline scoring (`score`, `evaluate`), on one process
or several."""

from __future__ import annotations

import pathlib

from absl import flags

from mrrm_jax import process_flags
from mrrm_jax.core import host_malloc

_ROWS = flags.DEFINE_integer("batch_size", 4, "Packed rows per forward pass (over all local devices).")
_ROW_TOKENS = flags.DEFINE_integer("row_tokens", 4096, "Tokens of one packed row; a longer record gets a row of "
                                   "its own.")
_ROW_CROPS = flags.DEFINE_integer("row_crops", 32, "ViT crops (image crops or video frames) of one packed row.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute and parameter dtype.")
_ATTENTION = flags.DEFINE_enum("attention", None, ["xla", "blockwise", "pallas", "cudnn"],
                               "Attention backend (default: the saved model's, with "
                               "its dense 'xla' reference run as 'blockwise').")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Run as one of several processes (jax.distributed, with "
                                  "--coordinator_address/--num_processes/--process_id or the cluster's own "
                                  "detection): each scores every n-th record on its own devices into a part "
                                  "file; process 0 joins the parts into the output.")
_CACHE = flags.DEFINE_string("compilation_cache", "~/.cache/mrrm_jax/xla", "Where compiled programs are kept for "
                             "the next run (JAX's persistent compilation cache); '' = compile anew every run.")


def start_processes() -> None:
    """Joins the other processes under --distributed; a usage error for process flags without it."""
    if process_flags.given() and not _DISTRIBUTED.value:
        raise ValueError(f"{', '.join(process_flags.given())} need --distributed")
    if _DISTRIBUTED.value:
        process_flags.initialize()


def load_reward_model(checkpoint: str):
    """The `RewardModel` in `checkpoint`, shaped by these flags."""
    host_malloc.keep_freed_memory()  # before jax starts its threads
    import jax

    from mrrm_jax.scoring.reward_model import RewardModel  # after flag parsing: jax starts with the model

    if _CACHE.value:  # a scoring run's programs are the same from run to run: compile them once
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(_CACHE.value).expanduser()))
    return RewardModel.load(checkpoint, dtype=_DTYPE.value, attention=_ATTENTION.value, rows=_ROWS.value,
                            row_tokens=_ROW_TOKENS.value, row_crops=_ROW_CROPS.value)
