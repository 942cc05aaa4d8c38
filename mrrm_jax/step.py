"""The train step and the evaluation scores as pure functions of (model, state, base, batch).

Kept apart from trainer.py (data pipeline, checkpoints, the loop) so that code without the data stack
(the AOT compiler, benchmarks) can run the very step the trainer runs. State = {"step", "trainable":
{"head", "lora", "base"?}, "opt"}; LoRA factors in `trainable` are keyed by their kernel path with
"|" for "/" (Orbax keys are plain names).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from mrrm_jax import lora, reward
from mrrm_jax.models.molmo2 import Molmo2


def make_optimizer(learning_rate: float, num_steps: int, warmup_steps: int = 0, weight_decay: float = 0.0,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW with linear decay to 0 after an optional linear warmup, global-norm clipping (the paper's)."""
    decay = optax.linear_schedule(learning_rate, 0.0, max(num_steps - warmup_steps, 1))
    schedule = decay if not warmup_steps else optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), decay], [warmup_steps])
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def trainable_tree(head: dict, factors: dict, base: dict | None = None) -> dict:
    """What the step trains: {"head", "lora" (LoRA factors, "|" for "/" in their keys), "base" (a
    sub-tree of the backbone trained in full; {} for none)}."""
    return {"head": head, "lora": {k.replace("/", "|"): v for k, v in factors.items()}, "base": base or {}}


def initial_state(trainable: dict, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.int32(0), "trainable": trainable, "opt": tx.init(trainable)}


@dataclasses.dataclass(frozen=True)
class Model:
    """What the jitted functions close over (hashable and static)."""

    backbone: Molmo2
    head: reward.ValueHead
    spec: lora.LoraSpec | None
    objective: str

    def losses(self, base, trainable, batch, rng=None):
        trainable = {**trainable, "lora": {k.replace("|", "/"): v for k, v in trainable["lora"].items()}}
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
