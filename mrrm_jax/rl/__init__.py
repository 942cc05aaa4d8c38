"""Reward functions for RL frameworks, on the reward server (`mrrm_jax.serve`) or in process.

Each scores the G rollouts of one prompt as ONE group (one forward pass) the way its framework lays
them out: verl (`verl.MrrmRewardManager`, its reward loop's manager; rollouts grouped by uid on the
server), tunix (`tunix.make_reward_fn`, by trajectory row), TRL (`trl.make_reward_func`, by question
and image within the local slice; one RolloutGroup per call in AsyncGRPO). OpenRLHF needs no code:
point `--reward.remote_url` at `http://HOST:PORT/get_reward` and start the server with `--group_size`.
"""
