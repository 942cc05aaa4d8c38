"""The train step as pure functions of a run spec: state, step, evaluation scores, abstract shapes.

Kept apart from the trainer (data, checkpoints, the loop) so that code without the data stack (the
AOT compiler, benchmarks) runs the very step the trainer runs. State = {"step", "trainable":
{"head", "lora", "base"}, "opt"}; the frozen base is a separate, never-donated argument (no
gradients, no optimizer state). LoRA factors in `trainable` are keyed by their escaped kernel path
(`tree_paths.escape`). One optimizer step = `grad_accum` micro-steps over packed rows; the loss is
the mean over the step's real examples, however many the packing put into its rows.
"""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mrrm_jax.core import lora
from mrrm_jax.core import reward
from mrrm_jax.core import tree_paths
from mrrm_jax.data import packing
from mrrm_jax import backbones
from mrrm_jax.training.spec import ConfigError, OptimizerSpec, RunSpec


def make_optimizer(learning_rate: float, num_steps: int, warmup_steps: int = 0, weight_decay: float = 0.0,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear decay to 0 after an optional linear warmup, global-norm clipping (the paper's)."""
    decay = optax.linear_schedule(learning_rate, 0.0, max(num_steps - warmup_steps, 1))
    schedule = decay if not warmup_steps else optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def optimizer(spec: RunSpec) -> optax.GradientTransformation:
    o: OptimizerSpec = spec.optimizer
    return make_optimizer(o.learning_rate, spec.train.num_steps, o.warmup_steps, o.weight_decay, o.clip_norm)


def trainable_tree(head: dict, factors: dict, base: dict | None = None) -> dict:
    """What the step trains: {"head", "lora" (LoRA factors, escaped keys), "base" (a sub-tree of the
    backbone trained in full; {} for none)}."""
    return {"head": head, "lora": tree_paths.escape(factors), "base": base or {}}


def initial_state(trainable: dict, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.int32(0), "trainable": trainable, "opt": tx.init(trainable)}


def abstract_base(config) -> dict:
    """The backbone's parameter shapes (float32)."""
    return jax.eval_shape(lambda: backbones.module(config).init(jax.random.key(0), backbones.init_batch(config))["params"])


def init_trainable(spec: RunSpec, base: dict) -> dict:
    """The head and LoRA factors drawn from the run's seed; the `train.full_train` leaves of `base` in float32."""
    key_lora, key_head = jax.random.split(jax.random.key(spec.seed + 1))
    head = reward.ValueHead(spec.head).init(key_head, jnp.zeros((1, spec.model.text.hidden_size)))["params"]
    factors = {} if spec.lora is None else lora.init(base, spec.lora, key_lora)
    trained = {p: v.astype(jnp.float32) for p, v in tree_paths.flatten(base).items()
               if any(re.fullmatch(r, p) for r in spec.train.full_train)}
    if spec.train.full_train and not trained:
        raise ConfigError(f"train.full_train {spec.train.full_train} matches no base parameter")
    return trainable_tree(head, factors, tree_paths.nest(trained))


def init_state(spec: RunSpec, base: dict, tx: optax.GradientTransformation) -> dict:
    return initial_state(init_trainable(spec, base), tx)


def model(spec: RunSpec) -> Model:
    return Model(backbones.module(spec.model), reward.ValueHead(spec.head), spec.lora, spec.train.objective)


def batch_shapes(spec: RunSpec) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """{name: (shape, dtype)} of one optimizer step's batch, [micro-steps, rows, ...], all processes
    together; host-side keys (counts, media kinds) left out."""
    config = spec.model
    layout = packing.row_layout(spec.row, backbones.media(config))
    lead = (spec.train.grad_accum, spec.micro_rows)
    return {k: ((*lead, *shape), dtype) for k, (shape, dtype, _) in layout.items() if k != "media_kind"}


@dataclasses.dataclass(frozen=True)
class Model:
    """What the jitted functions close over (hashable and static)."""

    backbone: nn.Module
    head: reward.ValueHead
    spec: lora.LoraSpec | None
    objective: str

    def losses(self, base, trainable, batch, rng=None):
        trainable = {**trainable, "lora": tree_paths.unescape(trainable["lora"])}
        return reward.example_losses(self.backbone, self.head, base, trainable, batch, self.spec, rng,
                                     self.objective)


def _correct(scores, labels_e):
    """Per example slot: the top score is the labelled response."""
    scores_en = scores.reshape(-1, scores.shape[-1])
    return (jnp.argmax(scores_en, -1) == labels_e) & (labels_e >= 0)


def train_step(model: Model, tx, state: dict, base: dict, batch: dict, rng):
    """One optimizer step over `batch` leaves [micro-steps, rows, ...]; returns (state, metrics)."""
    step_rng = jax.random.fold_in(rng, state["step"])

    def micro(carry, inputs):
        grads, loss_sum, count, correct = carry
        micro_batch, key = inputs

        def total_loss(trainable):
            per_example, real, scores = model.losses(base, trainable, micro_batch, key)
            return per_example.sum(), (real, scores)

        (loss, (real, scores)), g = jax.value_and_grad(total_loss, has_aux=True)(state["trainable"])
        hits = _correct(scores, micro_batch["labels"].reshape(-1)).sum()
        return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + real.sum(), correct + hits), None

    micro_steps = batch["tokens"].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, state["trainable"])
    carry = (zeros, jnp.float32(0), jnp.int32(0), jnp.int32(0))
    (grads, loss_sum, count, correct), _ = jax.lax.scan(micro, carry, (batch, jax.random.split(step_rng, micro_steps)))
    examples_ = jnp.maximum(count, 1)
    grads = jax.tree.map(lambda g: g / examples_, grads)  # the mean over the step's examples
    updates, opt = tx.update(grads, state["opt"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    metrics = {"loss": loss_sum / examples_, "accuracy": correct / examples_, "examples": count,
               "grad_norm": optax.tree.norm(grads)}
    return {"step": state["step"] + 1, "trainable": trainable, "opt": opt}, metrics


def eval_scores(model: Model, state: dict, base: dict, batch: dict):
    return model.losses(base, state["trainable"], batch)[2]
