"""The reward server for RL loops: a whole GRPO group scored in one forward pass.

    python -m mrrm_jax.serve --checkpoint=DIR [--host=127.0.0.1] [--port=8000] [--media_root=DIR] \\
        [--max_batch_tokens=16384] [--max_wait_ms=5] [--group_size=0] [--group_timeout_s=30] [--api_key=...] \\
        [--deterministic]

POST /score (native groups), POST /get_reward (OpenRLHF's remote reward model), GET /health (ready
after warm-up), GET /metrics (Prometheus). The logic lives in `mrrm_jax.serving`.
"""

from __future__ import annotations

import logging
import pathlib
import sys
import threading

from absl import app, flags
from absl import logging as absl_logging

from mrrm_jax.scoring import batch_shapes
from mrrm_jax.core import host_malloc

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Reward-model directory (trained here or imported).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind; loopback unless told otherwise.")
_PORT = flags.DEFINE_integer("port", 8000, "Port.")
_MEDIA_ROOT = flags.DEFINE_string("media_root", None, "Media paths in requests resolve under (and only under) "
                                  "this folder; without it only inline media (data: URI, base64) are accepted.")
_MAX_BATCH_TOKENS = flags.DEFINE_integer("max_batch_tokens", 16384, "Tokens per model batch (rows x row length).")
_ROW_TOKENS = flags.DEFINE_integer("row_tokens", 4096, "Length of one packed row: the longest group accepted.")
_ROW_CROPS = flags.DEFINE_integer("row_crops", 64, "ViT crops (image crops or video frames) per row.")
_MAX_RESPONSES = flags.DEFINE_integer("max_responses", 16, "Largest group (responses per prompt).")
_ROW_GROUPS = flags.DEFINE_integer("row_groups", 8, "Groups packed into one row at most.")
_LENGTH_BUCKETS = flags.DEFINE_integer("length_buckets", 3, "Row shapes: the full row, its half, quarter, ... "
                                       "(this many), so that a short group alone does not pay for a full row.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 5.0, "How long a batch waits for more groups after its first.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 0, "/get_reward: buffer entries across requests until a group "
                                   "has this many (0: group within each request).")
_GROUP_TIMEOUT_S = flags.DEFINE_float("group_timeout_s", 30.0, "/get_reward: score an incomplete group after this.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require 'Authorization: Bearer KEY'.")
_REWARD = flags.DEFINE_enum("reward", "raw", ["raw", "zscore"], "/get_reward rewards: raw scores or within-group "
                            "z-scores.")
_MODE = flags.DEFINE_enum("mode", "multi", ["multi", "single"], "multi: a group in one pass; single: one pass per "
                          "response (the baseline).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every batch shape before reporting ready.")
_MAX_BODY_MB = flags.DEFINE_float("max_body_mb", 64.0, "Largest request body.")
_REQUEST_TIMEOUT_S = flags.DEFINE_float("request_timeout_s", 120.0, "Per-request limit (504 after).")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "Bit-identical scores however a group is batched: one "
                                    "batch shape, a row per group (costs the packing).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute and parameter dtype.")


def main(argv) -> None:
    host_malloc.keep_freed_memory()  # before jax starts its threads
    import uvicorn

    from mrrm_jax.scoring.reward_model import RewardModel
    from mrrm_jax.serving import app as serving_app
    from mrrm_jax.serving.batcher import Batcher
    from mrrm_jax.serving.metrics import ServerMetrics

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every restore at INFO
    log = logging.getLogger("mrrm_jax.serve")
    log.setLevel(logging.INFO)
    try:
        if len(argv) > 1:
            raise ValueError(f"unexpected arguments: {argv[1:]}")
        if not _CHECKPOINT.value or not pathlib.Path(_CHECKPOINT.value).is_dir():
            raise ValueError(f"--checkpoint {_CHECKPOINT.value} is not a reward-model directory")
        if _MAX_BATCH_TOKENS.value < _ROW_TOKENS.value:
            raise ValueError(f"--max_batch_tokens {_MAX_BATCH_TOKENS.value} is less than one row "
                             f"(--row_tokens {_ROW_TOKENS.value})")
        if _MEDIA_ROOT.value is not None and not pathlib.Path(_MEDIA_ROOT.value).is_dir():
            raise ValueError(f"--media_root {_MEDIA_ROOT.value} is not a directory")
        model = RewardModel.load(_CHECKPOINT.value, dtype=_DTYPE.value)
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    metrics = ServerMetrics()
    budget = batch_shapes.row_budget(model.processor, _ROW_TOKENS.value, _ROW_CROPS.value, _ROW_GROUPS.value,
                                     _MAX_RESPONSES.value)
    batcher = Batcher(model, budget, _MAX_BATCH_TOKENS.value // _ROW_TOKENS.value, _MAX_WAIT_MS.value / 1000,
                      metrics.on_batch, _LENGTH_BUCKETS.value, _DETERMINISTIC.value)
    settings = serving_app.ServeSettings(
        media_root=_MEDIA_ROOT.value, api_key=_API_KEY.value, mode=_MODE.value, reward=_REWARD.value,
        group_size=_GROUP_SIZE.value, group_timeout_s=_GROUP_TIMEOUT_S.value,
        request_timeout_s=_REQUEST_TIMEOUT_S.value, max_body_bytes=int(_MAX_BODY_MB.value * (1 << 20)))
    api = serving_app.create_app(model, batcher, settings, metrics)

    def warm_up():
        if _WARMUP.value:
            programs = batcher.warm_up()
            log.info("warm: %d programs compiled (rows %s x %d row lengths, with and without media)", programs,
                     batcher.row_buckets, _LENGTH_BUCKETS.value)
        batcher.start()
        api.state.ready = True

    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    uvicorn.run(api, host=_HOST.value, port=_PORT.value, log_level="warning")
    batcher.stop()


if __name__ == "__main__":
    app.run(main)
