"""One GRPO run in a workdir: the policy (a converted base, or the demo's warmed-up one) with LoRA, its
reference (the same base with the adapter off: no second copy of the weights), the reward (a reward-model
directory scored in this process, or a server URL), and the loop:

    sample G responses per prompt (KV cache) -> rewards of each prompt's G in one pass (`multi`) or one
    pass each (`single`) -> group-normalised advantages -> `updates_per_batch` clipped-ratio steps on the
    LoRA factors, KL to the reference

Every step's prompts and sampling key derive from (seed, step) alone, so a run resumed from its latest
checkpoint (LoRA factors, optimizer state, step) takes exactly the steps it would have taken. Metrics
go to `metrics.jsonl` (kinds "train" and "eval") and TensorBoard, as the reward-model trainer's do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mrrm_jax import backbones
from mrrm_jax.backbones import checkpoint
from mrrm_jax.core import lora, sharding, tree_paths
from mrrm_jax.data import packing, records, synthetic
from mrrm_jax.policy import objective as objective_lib
from mrrm_jax.policy import sampler, warmup
from mrrm_jax.policy import prompts as prompts_lib
from mrrm_jax.policy.prompts import Prompt, PromptRows
from mrrm_jax.rl.client import LocalScorer, RewardClient
from mrrm_jax.scoring.reward_model import RewardModel
from mrrm_jax.training.checkpoints import RunCheckpoints
from mrrm_jax.training.metrics import MetricsWriter
from mrrm_jax.training.step import make_optimizer


class RunError(Exception):
    """A run that cannot start or go on; the message says what to change."""


class _NoDataState:
    """GRPO's data position is its step (prompts derive from (seed, step)): the checkpoint's data item
    holds nothing, and restoring it sets nothing."""

    def set_state(self, state) -> None:
        pass

    def start_prefetch(self) -> None:  # grain's restore calls it on every iterator
        pass


@dataclasses.dataclass
class Policy:
    model: object
    base: dict
    processor: object
    rows: PromptRows
    stop_ids: tuple[int, ...]


def stop_ids(tokenizer) -> tuple[int, ...]:
    """The end-of-turn and end-of-text ids of a Qwen-vocabulary chat tokenizer (both backbones')."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    ids.add(tokenizer.eos_token_id)
    return tuple(sorted(i for i in ids if isinstance(i, int) and i >= 0))


def prompt_budget(cfg) -> packing.RowBudget:
    p = cfg.policy.prompt
    return packing.RowBudget(row_tokens=p.tokens, row_crops=p.crops, row_pooled=p.pooled, row_examples=1,
                             max_responses=1, pool_slots=p.pool_slots, row_patches=p.patches)


def data_files(cfg, workdir: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(train, eval) JSONL files; "synthetic" writes the demo corpus (the reward-model demo's seeds)."""
    out = []
    for split in ("train", "eval"):
        name = cfg.data[split]
        if name == "synthetic":
            sizes = cfg.data.synthetic
            out.append(synthetic.write_corpus(workdir / "data" / split, sizes[f"{split}_images"],
                                              sizes[f"{split}_videos"], cfg.seed * 2 + (split == "eval") + 100))
        elif not pathlib.Path(name).is_file():
            raise RunError(f"data.{split}={name!r} is not a JSONL file")
        else:
            out.append(pathlib.Path(name))
    return out[0], out[1]


def load_policy(cfg, workdir: pathlib.Path, train_prompts) -> Policy:
    """The policy's base and processor: `policy.checkpoint` (a converted base; its directory's processor
    files, or `policy.processor_dir`), or, without one, a model of `policy.dims` from random weights
    given the SFT warm-up (saved under workdir/policy_base and reused)."""
    runtime = dict(dtype=cfg.policy.dtype, param_dtype=cfg.policy.dtype, attention=cfg.policy.attention,
                   remat=cfg.policy.remat, with_lm_head=True)
    if not cfg.policy.checkpoint and not cfg.policy.dims:
        raise RunError("policy.checkpoint is empty: give a converted base directory (tools/convert_checkpoint.py)")
    if cfg.policy.checkpoint:
        base_dir = pathlib.Path(cfg.policy.checkpoint)
        processor_dir = pathlib.Path(cfg.policy.processor_dir or base_dir)
    else:
        base_dir, processor_dir = workdir / "policy_base", workdir / "processor"
        if not (processor_dir / "processor_config.json").exists():
            backbones.write_processor(cfg.policy.type, processor_dir, **cfg.policy.processor)
    try:
        processor = backbones.load_processor(processor_dir)
    except (OSError, ValueError) as error:
        raise RunError(f"policy processor {processor_dir}: {error}") from error
    if base_dir.exists():
        config, base = checkpoint.load_base(base_dir)
        config = config.replace(**{k: v for k, v in runtime.items() if k != "with_lm_head"})
    else:
        config_class = backbones.BACKBONES[cfg.policy.type].config_class
        config = backbones.with_processor(config_class.from_dims(cfg.policy.dims.to_dict(), **runtime), processor)
        base = backbones.module(config).init(jax.random.key(cfg.seed), backbones.init_batch(config))["params"]
    config = backbones.with_processor(config, processor)
    model = sampler.policy(config)
    rows = PromptRows(processor, prompt_budget(cfg), backbones.media(config))
    policy = Policy(model, base, processor, rows, stop_ids(processor.tokenizer))
    if not base_dir.exists():
        s = cfg.sft
        policy.base = warmup.warm_up(model, base, train_prompts, rows, tuple(s.train), s.steps, s.rows,
                                     s.learning_rate, cfg.sampling.max_new_tokens, policy.stop_ids[0], cfg.seed,
                                     log=lambda line: print(line, flush=True))
        checkpoint.save_params(base_dir, config, policy.base)
    return policy


def make_scorer(cfg, media_root: pathlib.Path):
    """The reward: in process on a reward-model directory (`multi`: a group in one pass; `single`: one
    pass per response), or the server at `reward.url`."""
    if cfg.reward.url:
        return RewardClient(cfg.reward.url, cfg.reward.api_key or None)
    if not pathlib.Path(cfg.reward.checkpoint, checkpoint.BASE_DIR).is_dir():
        raise RunError(f"reward.checkpoint={cfg.reward.checkpoint!r} is not a reward-model directory")
    model = RewardModel.load(cfg.reward.checkpoint, rows=cfg.reward.rows, row_tokens=cfg.reward.row_tokens,
                             row_crops=cfg.reward.row_crops)
    return LocalScorer(model, media_root, cfg.reward.mode)


def decoded(tokenizer, tokens_bn: np.ndarray, lengths_b: np.ndarray) -> list[str]:
    """Each row's response text: its tokens up to its length, special tokens (the stop) dropped."""
    return [tokenizer.decode(row[:length].tolist(), skip_special_tokens=True).strip()
            for row, length in zip(tokens_bn, lengths_b)]


def groups_of(prompts: list[Prompt], texts: list[str], group_size: int) -> list[dict]:
    return [{"prompt": p.question, "responses": texts[i * group_size:(i + 1) * group_size], **p.refs}
            for i, p in enumerate(prompts)]


def settings(cfg, stop_ids: tuple[int, ...]) -> tuple:
    """(objective, LoRA spec, sampling, optimizer) of a config."""
    g = cfg.grpo
    return (objective_lib.Objective(g.clip_eps, g.kl_coef, g.advantage),
            lora.LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0, targets=tuple(cfg.lora.targets)),
            sampler.Sampling(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p, stop_ids),
            make_optimizer(g.learning_rate, g.num_steps * g.updates_per_batch, clip_norm=g.clip_norm))


def initial_state(base: dict, spec: lora.LoraSpec, tx, seed: int) -> dict:
    """Step 0: the LoRA factors (B at zero: the policy starts as its base) and their optimizer state."""
    factors = tree_paths.escape(lora.init(base, spec, jax.random.key(seed + 1)))
    return {"step": jnp.int32(0), "lora": factors, "opt": tx.init(factors)}


def micro_batches(tree, chunks: int):
    """Rows [B, ...] -> [chunks, B / chunks, ...], chunk c taking rows c, c + chunks, ...: with the rows
    split over the mesh in contiguous blocks, every chunk keeps rows on every device."""
    return jax.tree.map(lambda x: x.reshape(-1, chunks, *x.shape[1:]).swapaxes(0, 1), tree)


def from_micro_batches(x, rows: int):
    return x.swapaxes(0, 1).reshape(rows, *x.shape[2:])


def programs(model, spec: lora.LoraSpec, sampling: sampler.Sampling, objective: objective_lib.Objective,
             tx, micro_rows: int = 0) -> dict:
    """The loop's jitted pieces, as `Run` calls them and `bench/grpo_memory.py` compiles them for a slice:
    sample (static: samples, sampling), policy_logp, ref_logp (the adapter off), update (one optimizer
    step on the LoRA factors). The full forwards run `micro_rows` rows at a time (0: all at once), the
    update accumulating the micro-batches' gradients: the same step, in a fraction of the memory."""
    # logprobs are taken at the sampling temperature (the distribution the tokens came from)
    view = lambda base, factors: lora.apply(base, tree_paths.unescape(factors), spec, dropout=False)
    chunks_of = lambda tokens_bn: tokens_bn.shape[0] // micro_rows if micro_rows else 1

    def sample(base, factors, prompts, key, samples, sampling):
        return sampler.sample(model, view(base, factors), prompts, sampling, key, samples)

    def logprobs(params, batch, tokens_bn):
        return objective_lib.token_logprobs(sampler.token_logits(model, params, batch), tokens_bn,
                                            sampling.temperature)

    def logprobs_in_micro_batches(params, batch, tokens_bn):
        logp_cbn = jax.lax.map(lambda micro: logprobs(params, *micro)[0],
                               micro_batches((batch, tokens_bn), chunks_of(tokens_bn)))
        return from_micro_batches(logp_cbn, tokens_bn.shape[0])

    def update(state, base, batch, tokens_bn, old_logp_bn, ref_logp_bn, advantages_b):
        tokens = jnp.maximum(batch["response_mask"].sum(), 1).astype(jnp.float32)  # the whole batch's

        def loss_fn(factors, micro):
            batch, tokens_bn, old_logp_bn, ref_logp_bn, advantages_b = micro
            logp_bn, entropy_bn = logprobs(view(base, factors), batch, tokens_bn)
            loss, metrics = objective_lib.grpo_loss(logp_bn, old_logp_bn, ref_logp_bn, advantages_b,
                                                    batch["response_mask"], objective, tokens)
            metrics["entropy"] = (entropy_bn * batch["response_mask"]).sum() / tokens
            return loss, metrics

        def accumulate(total, micro):
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["lora"], micro)
            return jax.tree.map(jnp.add, total, (grads, {"loss": loss, **metrics})), None

        micro = micro_batches((batch, tokens_bn, old_logp_bn, ref_logp_bn, advantages_b), chunks_of(tokens_bn))
        loss, metrics = jax.eval_shape(loss_fn, state["lora"], jax.tree.map(lambda x: x[0], micro))
        zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (state["lora"], {"loss": loss, **metrics}))
        (grads, metrics), _ = jax.lax.scan(accumulate, zero, micro)
        updates, opt = tx.update(grads, state["opt"], state["lora"])
        return ({"step": state["step"], "lora": optax.apply_updates(state["lora"], updates), "opt": opt},
                metrics)

    return {"sample": jax.jit(sample, static_argnums=(4, 5)),
            "policy_logp": jax.jit(lambda base, factors, batch, tokens:
                                   logprobs_in_micro_batches(view(base, factors), batch, tokens)),
            "ref_logp": jax.jit(logprobs_in_micro_batches),
            "update": jax.jit(update)}


class Run:
    def __init__(self, cfg, workdir: pathlib.Path):
        self.cfg, self.workdir = cfg, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        train_file, eval_file = data_files(cfg, workdir)
        counter = records.SkipCounter()
        roots = [prompts_lib.media_root(f, cfg.data.media_root or None) for f in (train_file, eval_file)]
        # One scorer for both splits: the groups name their media relative to a directory above both.
        ref_root = pathlib.Path(os.path.commonpath(roots))
        self.train = prompts_lib.read_prompts(train_file, roots[0], ref_root, counter, cfg.data.blank_media)
        self.eval = prompts_lib.read_prompts(eval_file, roots[1], ref_root, counter,
                                             cfg.data.blank_media)[: cfg.eval.prompts]
        self.skips = dict(counter)
        if len(self.train) < cfg.grpo.prompts_per_step or not self.eval:
            raise RunError(f"{len(self.train)} usable training prompts (need {cfg.grpo.prompts_per_step} per "
                           f"step) and {len(self.eval)} for evaluation; skipped: {self.skips}")
        rows, micro = cfg.grpo.prompts_per_step * cfg.grpo.group_size, cfg.grpo.micro_rows
        if micro and rows % micro:
            raise RunError(f"grpo.micro_rows={micro} does not divide a step's {rows} rows (prompts_per_step x group_size)")
        self.scorer = make_scorer(cfg, ref_root)  # before the warm-up: a wrong reward path fails at once
        self.mesh = sharding.make_mesh(cfg.mesh.to_dict())
        self.policy = load_policy(cfg, workdir, self.train)
        # The base laid out as the trainer lays it out (FSDP over 'fsdp', replicated over 'data'); the
        # rollouts' rows go over the batch axes (`_rows`), and everything the jitted pieces compute follows.
        self.policy.base = jax.device_put(self.policy.base, sharding.tree_shardings(self.policy.base, self.mesh))
        self.objective, self.lora_spec, self.sampling, self.tx = settings(cfg, self.policy.stop_ids)
        self._compile()

    def _compile(self):
        jitted = programs(self.policy.model, self.lora_spec, self.sampling, self.objective, self.tx,
                          self.cfg.grpo.micro_rows)

        def on_mesh(fn):  # activations pinned to the batch axes (`sharding.constrain_rows`), as in training
            def run(*args):
                with jax.set_mesh(self.mesh):
                    return fn(*args)
            return run

        self._sample, self._policy_logp, self._ref_logp, self._update = (
            on_mesh(jitted[name]) for name in ("sample", "policy_logp", "ref_logp", "update"))

    def _rows(self, tree):
        """Arrays of rows on the mesh: over the batch axes where those divide them all, else replicated."""
        split = sharding.rows_split(self.mesh, *jax.tree.leaves(tree))
        place = lambda x: sharding.batch_sharding(self.mesh, x.ndim) if split else NamedSharding(self.mesh, P())
        return jax.tree.map(lambda x: jax.device_put(x, place(x)), tree)

    def initial_state(self) -> dict:
        state = initial_state(self.policy.base, self.lora_spec, self.tx, self.cfg.seed)
        return jax.device_put(state, sharding.tree_shardings(state, self.mesh))

    # -- one step ---------------------------------------------------------------------------------
    def generate(self, factors, prompts: list[Prompt], key, samples: int, sampling=None) -> tuple:
        """(prompt batch, tokens [P * samples, N], lengths, texts) of the policy's samples."""
        prompt_batch = self._rows(self.policy.rows.batch(prompts))
        out = self._sample(self.policy.base, factors, prompt_batch, key, samples, sampling or self.sampling)
        tokens_bn, lengths_b = np.asarray(out["tokens"]), np.asarray(out["lengths"])
        return prompt_batch, tokens_bn, lengths_b, decoded(self.policy.processor.tokenizer, tokens_bn, lengths_b)

    def rollouts(self, factors, prompts: list[Prompt], key, samples: int) -> tuple:
        """(model batch with responses, sampled tokens, lengths, texts, rewards [P * samples])."""
        prompt_batch, tokens_bn, lengths_b, texts = self.generate(factors, prompts, key, samples)
        rewards = self.scorer.score(groups_of(prompts, texts, samples))
        batch = sampler.with_responses(prompt_batch, tokens_bn, lengths_b, samples)
        return batch, tokens_bn, lengths_b, texts, np.asarray(rewards, np.float32).reshape(-1)

    def step(self, state: dict, step: int) -> tuple[dict, dict]:
        g = self.cfg.grpo
        rng = np.random.default_rng([self.cfg.seed, step])
        prompts = [self.train[i] for i in rng.choice(len(self.train), g.prompts_per_step, replace=False)]
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
        batch, tokens_bn, lengths_b, _, rewards_b = self.rollouts(state["lora"], prompts, key, g.group_size)
        advantages_b = objective_lib.advantages(jnp.asarray(rewards_b), g.group_size, self.objective)
        batch, tokens_bn, advantages_b = self._rows((batch, tokens_bn, advantages_b))
        old_logp_bn = self._policy_logp(self.policy.base, state["lora"], batch, tokens_bn)
        ref_logp_bn = self._ref_logp(self.policy.base, batch, tokens_bn)
        for _ in range(g.updates_per_batch):
            state, metrics = self._update(state, self.policy.base, batch, tokens_bn, old_logp_bn, ref_logp_bn,
                                          advantages_b)
        state = {**state, "step": jnp.int32(step)}
        rewards_gk = rewards_b.reshape(-1, g.group_size)
        scalars = {name: float(value) for name, value in jax.device_get(metrics).items()}
        scalars.update(reward_mean=float(rewards_b.mean()), reward_std=float(rewards_gk.std(1).mean()),
                       response_length=float(lengths_b.mean()))
        return state, scalars

    def evaluate(self, factors, step: int) -> dict:
        """On the held-out prompts: the mean reward of G samples (the validation reward), how often a sample
        is the corpus's best answer, and the same for the greedy answer."""
        g, key = self.cfg.grpo, jax.random.fold_in(jax.random.key(self.cfg.seed + 7), step)
        rewards, correct, greedy_correct = [], [], []
        greedy = dataclasses.replace(self.sampling, temperature=0.0)
        for first in range(0, len(self.eval), g.prompts_per_step):
            prompts = self.eval[first: first + g.prompts_per_step]
            _, _, _, texts, rewards_b = self.rollouts(factors, prompts, jax.random.fold_in(key, first), g.group_size)
            rewards.append(rewards_b)
            correct += [t == p.best for p, t in zip(np.repeat(prompts, g.group_size), texts)]
            greedy_texts = self.generate(factors, prompts, key, 1, greedy)[3]
            greedy_correct += [t == p.best for p, t in zip(prompts, greedy_texts)]
        return {"reward": float(np.concatenate(rewards).mean()), "accuracy": float(np.mean(correct)),
                "greedy_accuracy": float(np.mean(greedy_correct))}

    # -- the loop ---------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> dict:
        cfg = self.cfg
        checkpoints = RunCheckpoints(self.workdir / "checkpoints", cfg.checkpoint.keep)
        snapshot = json.loads(cfg.to_json())
        state = self.initial_state()

        def same_run(run: dict) -> None:
            if run.get("config") != snapshot:
                raise RunError(f"{self.workdir / 'checkpoints'} holds another config's run; use a new --workdir")

        restored = checkpoints.restore(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                                    state),
                                       _NoDataState(), same_run)
        start = 0
        if restored is not None:
            start, state, _ = restored
            print(f"[grpo] resumed at step {start}", flush=True)
        metrics = MetricsWriter(self.workdir, cfg.grpo.num_steps)
        results = {"skipped": self.skips}
        try:
            if start == 0:
                results["eval_before"] = self._evaluated(metrics, state, 0)
            for step in range(start + 1, cfg.grpo.num_steps + 1):
                state, scalars = self.step(state, step)
                metrics.write(step, scalars)
                if step % cfg.log_every == 0 or step == cfg.grpo.num_steps:
                    metrics.progress(step, scalars)
                if step % cfg.eval.every_steps == 0 or step == cfg.grpo.num_steps:
                    results["eval"] = self._evaluated(metrics, state, step)
                if step % cfg.checkpoint.every_steps == 0 or step == cfg.grpo.num_steps or stop.is_set():
                    checkpoints.save(step, state, {}, {"config": snapshot})
                if stop.is_set():
                    print(f"[grpo] stopped at step {step}; checkpoint saved", flush=True)
                    break
        finally:
            checkpoints.wait()
            checkpoints.close()
            metrics.close()
        results["steps"] = int(state["step"])
        (self.workdir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        return results

    def _evaluated(self, metrics: MetricsWriter, state: dict, step: int) -> dict:
        scalars = self.evaluate(state["lora"], step)
        metrics.write(step, scalars, prefix="eval")
        metrics.progress(step, scalars, prefix="eval")
        return scalars
