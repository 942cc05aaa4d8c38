"""Per-chip memory of a GRPO config's programs on a TPU slice, compiled from this CPU host (libtpu; no
TPU, no weights): does the policy fit beside the reward model, with its sampler's KV cache?

    python -m bench.grpo_memory [--config=configs/grpo_molmo2_4b_v5p.py] [--topology=v5p:2x2x1]

Compiles, with abstract arguments on the config's mesh, the loop's four jitted pieces (`loop.programs`:
the sampler at prompts x G rows with its cache of prompt + new-token slots, the policy's and the
reference's log-probabilities, one LoRA update) and the reward model's forward on its own batch
(`reward_model.forward`, rows split over every chip as `RewardModel` splits them), for the dimensions of
`policy.preset` and `reward.preset`. Prints XLA's plan per program, and the step's peak per chip: what
stays resident between programs (the policy's base, LoRA factors and optimizer state, the reward
model's parameters) plus the largest program's own arguments, outputs and temporaries.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mrrm_jax import backbones
from mrrm_jax.core import reward, sharding
from mrrm_jax.data import packing
from mrrm_jax.models.attention import inference_backend
from mrrm_jax.policy import loop, prompts, sampler
from mrrm_jax.scoring import batch_shapes, reward_model
from mrrm_jax.training import aot, step


def placed(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def chip_bytes(tree) -> int:
    """Bytes of one chip's shards of an abstract tree."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def on_rows(mesh, shapes: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.batch_sharding(mesh, len(s.shape)))
            for k, s in shapes.items()}


def preset_config(cfg_model, preset: str, **runtime):
    return getattr(backbones.BACKBONES[cfg_model].config_class, preset)(**runtime)


def measure(cfg, topology: str) -> dict:
    devices = aot.topology_devices(topology)
    mesh = sharding.make_mesh(cfg.mesh.to_dict(), devices)
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer's stop ids and the media's row room
        backbones.write_processor(cfg.policy.type, tmp, **cfg.policy.processor)
        processor = backbones.load_processor(tmp)
    dtype = cfg.policy.dtype
    config = backbones.with_processor(preset_config(cfg.policy.type, cfg.policy.preset, dtype=dtype, param_dtype=dtype,
                                                    attention=cfg.policy.attention, remat=cfg.policy.remat,
                                                    with_lm_head=True), processor)
    model = sampler.policy(config)
    objective, spec, sampling, tx = loop.settings(cfg, loop.stop_ids(processor.tokenizer))
    jitted = loop.programs(model, spec, sampling, objective, tx, cfg.grpo.micro_rows)

    base = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), step.abstract_base(config))
    base = placed(base, sharding.tree_shardings(base, mesh))
    state = jax.eval_shape(lambda b: loop.initial_state(b, spec, tx, cfg.seed), base)
    state = placed(state, sharding.tree_shardings(state, mesh))
    g, n = cfg.grpo, cfg.sampling.max_new_tokens
    layout = packing.row_layout(loop.prompt_budget(cfg), backbones.media(config))
    prompt_rows = on_rows(mesh, {k: jax.ShapeDtypeStruct((g.prompts_per_step, *shape), dt)
                                 for k, (shape, dt, _) in layout.items() if k not in prompts.SCORING_FIELDS})
    rows = g.prompts_per_step * g.group_size
    tokens = jax.ShapeDtypeStruct((rows, n), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))
    batch = on_rows(mesh, jax.eval_shape(lambda p, t, l: sampler.with_responses(p, t, l, g.group_size),
                                         prompt_rows, tokens, lengths))
    logp = jax.ShapeDtypeStruct((rows, n), jnp.float32, sharding=sharding.batch_sharding(mesh, 2))
    advantages = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=sharding.batch_sharding(mesh, 1))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))

    # The reward model: the policy's backbone type at `reward.preset`, laid out as `RewardModel` lays it
    # out (replicated, rows over every chip), one batch of `reward.rows` rows of `reward.row_tokens`.
    rm_mesh = Mesh(np.asarray(devices), ("data",))
    rm_config = preset_config(cfg.policy.type, cfg.reward.preset, dtype=dtype, param_dtype=dtype,
                              attention=inference_backend(cfg.policy.attention), remat="none", with_lm_head=False)
    rm_config = backbones.with_processor(rm_config, processor)
    head = reward.ValueHead(reward.HeadConfig())
    rm_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype), sharding=NamedSharding(rm_mesh, P())),
                             step.abstract_base(rm_config))
    head_params = jax.eval_shape(lambda: head.init(jax.random.key(0), jnp.zeros((1, rm_config.text.hidden_size))))
    head_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(rm_mesh, P())),
                               head_params["params"])
    rm_budget = batch_shapes.row_budget(processor, cfg.reward.row_tokens, cfg.reward.row_crops, 16, 16)
    rm_layout = packing.row_layout(rm_budget, backbones.media(rm_config))
    rm_batch = {k: jax.ShapeDtypeStruct((cfg.reward.rows, *shape), dt, sharding=NamedSharding(rm_mesh, P("data")))
                for k, (shape, dt, _) in rm_layout.items() if k != "media_kind"}
    rm_forward = jax.jit(functools.partial(reward_model.forward, backbones.module(rm_config), head, None, len(devices)))

    resident = {"policy base": chip_bytes(base), "LoRA + optimizer": chip_bytes(state),
                "reward model": chip_bytes((rm_params, head_params))}
    compiled, with_factors = {}, resident["policy base"] + chip_bytes(state["lora"])
    with jax.set_mesh(mesh):
        compiled["sample"] = (jitted["sample"].lower(base, state["lora"], prompt_rows, key, g.group_size, sampling),
                              with_factors)
        compiled["policy_logp"] = (jitted["policy_logp"].lower(base, state["lora"], batch, tokens), with_factors)
        compiled["ref_logp"] = (jitted["ref_logp"].lower(base, batch, tokens), resident["policy base"])
        compiled["update"] = (jitted["update"].lower(state, base, batch, tokens, logp, logp, advantages),
                              resident["policy base"] + resident["LoRA + optimizer"])
    compiled["reward"] = (rm_forward.lower(rm_params, head_params, rm_batch), resident["reward model"])
    plans = {}
    for name, (lowered, resident_args) in compiled.items():
        try:
            memory = lowered.compile().memory_analysis()
        except jax.errors.JaxRuntimeError as error:  # the TPU compiler checks the chip's HBM itself
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            raise SystemExit(f"error: {name} does not fit: {str(error).splitlines()[0]}") from None
        plans[name] = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                       "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
                       "own": memory.argument_size_in_bytes - resident_args + memory.output_size_in_bytes
                              - memory.alias_size_in_bytes + memory.temp_size_in_bytes}
    cache = jax.eval_shape(lambda: sampler.empty_cache(config, rows, layout["tokens"][0][0] + n))
    kind = devices[0].device_kind
    return {"topology": topology, "chips": len(devices), "hbm_gib": aot.HBM_GIB.get(kind), "resident": resident,
            "plans": plans, "cache_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache)),
            "peak": sum(resident.values()) + max(p["own"] for p in plans.values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grpo_molmo2_4b_v5p.py")
    parser.add_argument("--topology", default="v5p:2x2x1")
    args = parser.parse_args()
    cfg = importlib.import_module(args.config.removesuffix(".py").replace("/", ".")).get_config()
    m = measure(cfg, args.topology)
    gib = lambda b: f"{b / 2**30:.2f}"
    print(f"{args.config} on {m['topology']} ({m['chips']} chips, {m['hbm_gib']} GiB each), per chip:")
    print("resident: " + ", ".join(f"{k} {gib(v)} GiB" for k, v in m["resident"].items()))
    print(f"sampler KV cache (all chips): {gib(m['cache_bytes'])} GiB")
    print("| program | arguments | outputs | aliased | temporaries | beyond the resident, GiB |")
    print("|---|---|---|---|---|---|")
    for name, p in m["plans"].items():
        print(f"| {name} | {gib(p['arguments'])} | {gib(p['outputs'])} | {gib(p['aliased'])} | "
              f"{gib(p['temporaries'])} | {gib(p['own'])} |")
    print(f"peak per chip: {gib(m['peak'])} of {m['hbm_gib']} GiB")


if __name__ == "__main__":
    main()
