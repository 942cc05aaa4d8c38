"""Reward functions for RL frameworks, on the reward server (`mrrm_jax.serve`) or in process.

Each groups the G rollouts of one prompt into ONE `/score` group (one forward pass) the way its
framework lays them out: verl (`verl.compute_score`, its batch reward manager), tunix
(`tunix.make_reward_fn`, contiguous blocks of G), TRL (`trl.make_reward_func`, by prompt within the
local slice). OpenRLHF needs no code: point `--remote_rm_url` / `--reward.remote_url` at
`http://HOST:PORT/get_reward`.
"""
