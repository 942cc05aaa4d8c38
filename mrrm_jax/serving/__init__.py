"""The reward server: batcher (dynamic batching, one model thread), media_refs (request media, no
network), groups (OpenRLHF's /get_reward: response extraction, grouping, within-group rewards),
metrics (Prometheus), app (the FastAPI routes); `mrrm_jax.serve` is its command line."""
