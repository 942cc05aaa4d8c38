"""Training: model and state on the mesh, the jitted step (step.py), evaluation, checkpoints, the loop.

State = {"step", "trainable": {"head", "lora", "base"?}, "opt"}; the frozen base is a separate,
never-donated argument (no gradients, no optimizer state). LoRA factors are keyed by their
kernel path with "|" for "/" (Orbax keys are plain names). One optimizer step = `grad_accum`
micro-steps over packed rows; the loss is the mean over the step's real examples, however many
the packing put into its rows.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import re
import shutil
import signal
import threading
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mrrm_jax import checkpoint, lora, reward, sharding
from mrrm_jax.data import examples, packing, pipeline, records, synthetic, tfds_records
from mrrm_jax.data import processor as processor_lib
from mrrm_jax.data.tokenizer import write_molmo2_processor_dir
from mrrm_jax.metrics import MetricsWriter
from mrrm_jax.models.molmo2 import Molmo2, Molmo2Config
from mrrm_jax.models.molmo2.config import AdapterConfig, TextConfig, VisionConfig
from mrrm_jax.step import Model, eval_scores, initial_state, make_optimizer, train_step, trainable_tree

log = logging.getLogger(__name__)

# Keys that may differ between a run and the checkpoint it resumes (the rest must match).
RESUMABLE_CHANGES = ("train.num_steps", "log_every", "checkpoint.every_steps", "checkpoint.keep",
                     "eval.every_steps", "eval.controls", "data.num_workers", "data.num_threads")


class ConfigError(ValueError):
    """A problem with the configuration, data paths or the workdir; reported without a traceback."""


class RunError(RuntimeError):
    """The run cannot go on (an evaluation with nothing to score, NaN scores); reported without a traceback."""


# -- the model ------------------------------------------------------------------------------------

def model_config(cfg: ml_collections.ConfigDict) -> Molmo2Config:
    m = cfg.model
    runtime = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention,
                   scan_unroll=m.scan_unroll, with_lm_head=False)
    if m.base_dir:
        return checkpoint.load_config(m.base_dir).replace(**runtime)
    if m.preset:
        return getattr(Molmo2Config, m.preset)(**runtime)
    dims = m.dims.to_dict()
    return Molmo2Config(vision=VisionConfig(**dims["vision"]), adapter=AdapterConfig(**dims["adapter"]),
                        text=TextConfig(**dims["text"]), **runtime)


def dummy_batch(config: Molmo2Config, tokens: int = 8) -> dict:
    return {"tokens": jnp.zeros((1, tokens), jnp.int32), "positions": jnp.zeros((1, tokens), jnp.int32),
            "segment_ids": jnp.ones((1, tokens), jnp.int32),
            "crops": jnp.zeros((1, 1, config.vision.num_patches, config.vision.patch_dim)),
            "pooling": jnp.zeros((1, 1, 4), jnp.int32)}


def abstract_base(config: Molmo2Config) -> dict:
    return jax.eval_shape(lambda: Molmo2(config).init(jax.random.key(0), dummy_batch(config))["params"])


def load_base(cfg, config: Molmo2Config, mesh) -> dict:
    """The frozen base on the mesh: converted weights from `model.base_dir`, or a seeded random init."""
    shapes = abstract_base(config)
    shardings = sharding.tree_shardings(shapes, mesh)
    if cfg.model.base_dir:
        with_head = config.replace(with_lm_head=True)
        stored_shardings = sharding.tree_shardings(abstract_base(with_head), mesh)
        _, base = checkpoint.load_base(cfg.model.base_dir, shardings=stored_shardings, dtype=config.param_dtype)
        base.pop("lm_head", None)  # the reward path never uses it (design decision 8)
        return base
    init = jax.jit(lambda key: fan_in_init(Molmo2(config).init(key, dummy_batch(config))["params"], key),
                   out_shardings=shardings)
    return init(jax.random.key(cfg.seed))


def fan_in_init(params: dict, key) -> dict:
    """Every kernel redrawn from N(0, 1 / fan_in), for training from scratch.

    The port initialises like transformers (N(0, 0.02)), which suits 2560-wide layers (0.02 ~
    1/sqrt(2560)) but shrinks a 64-wide signal ~6x per layer: a random tiny ViT + adapter then hands
    the LM image features of ~1e-7, and nothing can be learned from the media.
    """
    flat = checkpoint.flatten(params)
    keys = dict(zip(flat, jax.random.split(key, len(flat))))
    redraw = lambda p, v: jax.random.normal(keys[p], v.shape, v.dtype) / np.sqrt(v.shape[-2])
    return checkpoint.nest({p: redraw(p, v) if p.endswith("kernel") else v for p, v in flat.items()})


def lora_spec(cfg) -> lora.LoraSpec | None:
    if not cfg.lora.rank:
        return None
    return lora.LoraSpec(rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout)


def init_trainable(cfg, config: Molmo2Config, base: dict) -> dict:
    """{"head", "lora" ("|"-joined kernel paths), "base" (the `train.full_train` leaves, float32)}."""
    key_lora, key_head = jax.random.split(jax.random.key(cfg.seed + 1))
    head = reward.ValueHead(head_config(cfg)).init(key_head, jnp.zeros((1, config.text.hidden_size)))["params"]
    spec = lora_spec(cfg)
    factors = {} if spec is None else lora.init(base, spec, key_lora)
    trained = {p: v for p, v in checkpoint.flatten(base).items() if any(re.fullmatch(r, p) for r in cfg.train.full_train)}
    if cfg.train.full_train and not trained:
        raise ConfigError(f"train.full_train {tuple(cfg.train.full_train)} matches no base parameter")
    return trainable_tree(head, factors, checkpoint.nest({p: v.astype(jnp.float32) for p, v in trained.items()}))


def init_state(cfg, config: Molmo2Config, base: dict, tx) -> dict:
    return initial_state(init_trainable(cfg, config, base), tx)


def head_config(cfg) -> reward.HeadConfig:
    return reward.HeadConfig(**cfg.head.to_dict())


def optimizer(cfg) -> optax.GradientTransformation:
    t = cfg.train
    return make_optimizer(t.learning_rate, t.num_steps, t.warmup_steps, t.weight_decay, t.clip_norm)


# -- data ------------------------------------------------------------------------------------------

def processor_dir(cfg, workdir: pathlib.Path) -> pathlib.Path:
    """The run's processor directory, checked once here: a setting our preprocessing does not implement
    must stop the run at the start, not in a data worker."""
    if cfg.processor.dir:
        out = pathlib.Path(cfg.processor.dir)
    elif cfg.model.base_dir:
        out = pathlib.Path(cfg.model.base_dir)
        if not (out / "tokenizer_config.json").exists():
            raise ConfigError(f"model.base_dir={cfg.model.base_dir!r} has no tokenizer/processor files: set "
                              "processor.dir to the Hugging Face checkpoint directory it was converted from")
    else:
        out = workdir / "processor"
        if not (out / "processor_config.json").exists():
            k = cfg.processor.kwargs
            size = {"height": k.crop, "width": k.crop}
            write_molmo2_processor_dir(
                out, image_processor_kwargs=dict(size=size, max_crops=k.max_crops, overlap_margins=[1, 1]),
                video_processor_kwargs=dict(size=size, num_frames=k.num_frames, max_fps=k.max_fps))
    try:
        processor_lib.load(out)
    except (OSError, ValueError) as error:
        raise ConfigError(f"processor {out}: {error}") from error
    return out


def data_file(cfg, split: str, workdir: pathlib.Path) -> pathlib.Path | str | None:
    """The JSONL of a split, or a "tfds:DATA_DIR:SPLIT" spec; "synthetic" writes the demo corpus into
    the workdir first."""
    name = cfg.data[split]
    if not name:
        return None
    if name == "synthetic":
        s = cfg.data.synthetic
        seed = cfg.seed * 2 + (split == "eval")  # different corpora for training and evaluation
        return synthetic.write_corpus(workdir / "data" / split, s[f"{split}_images"], s[f"{split}_videos"], seed)
    if name.startswith("tfds:"):
        _record_items(name)  # fails early on a bad spec or directory
        return name
    path = pathlib.Path(name)
    if not path.exists():
        raise ConfigError(f"data.{split}={name!r} does not exist")
    return path


def _record_items(spec: pathlib.Path | str):
    """The grain source of a data file: JSONL records, or a prepared TFDS split (media inside)."""
    if isinstance(spec, pathlib.Path):
        return records.read_jsonl(spec)
    try:
        _, data_dir, split = spec.split(":")
        builder = tfds_records.MultiResponseRecords(data_dir=data_dir)
        return tfds_records.RecordSource(builder.as_data_source(split))
    except (ValueError, AssertionError, KeyError) as error:
        raise ConfigError(f"data {spec!r}: expected tfds:DATA_DIR:SPLIT of a prepared dataset ({error})") from error


def packing_config(cfg, config: Molmo2Config, rows_per_batch: int) -> pipeline.PackingConfig:
    p = cfg.packing
    row = packing.RowBudget(p.row_tokens, p.row_crops, p.row_pooled, p.row_examples, p.max_responses, p.pool_slots)
    return pipeline.PackingConfig(row, (config.vision.num_patches, config.vision.patch_dim), rows_per_batch, p.window)


def dataset(cfg, config, split: str, path: pathlib.Path, processor: pathlib.Path, rows_per_batch: int,
            media_transform: str = "none") -> grain.IterDataset:
    b = cfg.budget
    budget = examples.Budget(b.max_tokens, b.max_vision_tokens, max_frames=b.max_frames, min_frames=b.min_frames)
    # A JSONL's media are under its directory unless `media_root` says otherwise; TFDS holds its own.
    media_root = cfg.data.media_root or (path.parent if isinstance(path, pathlib.Path) else None)
    train = split == "train"
    packed = packing_config(cfg, config, rows_per_batch)
    prepare = pipeline.PrepareExample(processor, config, budget, cfg.seed + (0 if train else 1), media_root,
                                      media_transform, packed.row)
    epochs = (None if cfg.data.num_epochs < 0 else cfg.data.num_epochs) if train else 1
    return pipeline.batches(_record_items(path), prepare, packed,
                            cfg.seed, epochs, cfg.data.num_workers if train else 0,
                            jax.process_index(), jax.process_count(), shuffle=train, num_threads=cfg.data.num_threads)


def to_global(local: dict, mesh, micro_steps: int | None = None) -> dict:
    """A host batch [rows_local, ...] -> global arrays; with `micro_steps`, [micro, rows, ...]."""
    out = {}
    for name, value in local.items():
        if name in ("counts", "media_kind"):
            continue  # host-side bookkeeping
        if micro_steps is not None:
            value = value.reshape(micro_steps, -1, *value.shape[1:])
        lead = 0 if micro_steps is None else 1
        out[name] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim, lead), value)
    return out


# -- evaluation -------------------------------------------------------------------------------------

def evaluate(scores_fn, state, base, batches, mesh, empty: dict) -> dict:
    """Best-of-N accuracy (top score == label) per media kind and overall, over one pass of `batches`.

    Every process runs the same number of batches (`empty` ones once its shard is done) and sees the
    gathered results, so all processes return the same numbers. No example to score, or a NaN score, is
    a `RunError`: an accuracy of 0.0 or of NaN-ordered scores would read as a result.
    """
    hits = np.zeros(len(pipeline.MEDIA_KINDS), np.int64)
    totals = np.zeros(len(pipeline.MEDIA_KINDS), np.int64)
    iterator = iter(batches)
    while True:
        local = next(iterator, None)
        if not multihost_utils.process_allgather(np.array(local is not None)).any():
            break
        local = empty if local is None else local
        scores = multihost_utils.process_allgather(scores_fn(state, base, to_global(local, mesh)), tiled=True)
        labels = multihost_utils.process_allgather(local["labels"], tiled=True).reshape(-1)
        kinds = multihost_utils.process_allgather(local["media_kind"], tiled=True).reshape(-1)
        if np.isnan(scores).any():  # -inf marks empty response slots; NaN is never a score
            raise RunError(f"evaluation at step {int(state['step'])}: the model gave NaN scores")
        correct = (scores.reshape(len(labels), -1).argmax(-1) == labels) & (labels >= 0)
        for kind in range(len(pipeline.MEDIA_KINDS)):
            hits[kind] += correct[kinds == kind].sum()
            totals[kind] += ((kinds == kind) & (labels >= 0)).sum()
    if not totals.sum():
        raise RunError("evaluation scored no example: every eval record was skipped (the counts say why)")
    out = {f"accuracy_{k}": float(hits[i] / totals[i]) for i, k in enumerate(pipeline.MEDIA_KINDS) if totals[i]}
    out.update({f"examples_{k}": int(totals[i]) for i, k in enumerate(pipeline.MEDIA_KINDS) if totals[i]})
    out["accuracy"] = float(hits.sum() / totals.sum())
    return out


# -- checkpoints -----------------------------------------------------------------------------------

def _comparable(cfg) -> dict:
    flat = {}

    def visit(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                visit(key + ".", v)
            elif key not in RESUMABLE_CHANGES:
                flat[key] = list(v) if isinstance(v, tuple) else v
    visit("", json.loads(cfg.to_json()))
    return flat


def check_resumable(manager: ocp.CheckpointManager, cfg, workdir) -> int | None:
    """The step to resume from, after checking the checkpoint was written by this config."""
    step = manager.latest_step()
    if step is None:
        return None
    saved = manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]["config"]
    now = _comparable(cfg)
    diffs = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diffs:
        shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diffs[:8])
        raise ConfigError(f"workdir {workdir} holds checkpoints of another config ({shown}). Nothing was "
                          "changed; use a new --workdir or the config that wrote them.")
    return step


class _IteratorState:
    """A frozen copy of a data iterator's state for grain's checkpoint handler (the save may be async)."""

    def __init__(self, state: dict):
        self._state = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state


# -- the loop --------------------------------------------------------------------------------------

def _validate(cfg) -> None:
    t = cfg.train
    if t.rows_per_step % t.grad_accum:
        raise ConfigError(f"train.rows_per_step={t.rows_per_step} is not a multiple of train.grad_accum={t.grad_accum}")
    if t.rows_per_step % jax.process_count():
        raise ConfigError(f"train.rows_per_step={t.rows_per_step} does not split over {jax.process_count()} processes")
    if t.objective not in reward.OBJECTIVES:
        raise ConfigError(f"train.objective={t.objective!r}: expected one of {reward.OBJECTIVES}")
    if not cfg.data.train:
        raise ConfigError("data.train is empty: give a JSONL file or 'synthetic'")
    if cfg.model.preset and not cfg.model.base_dir:
        raise ConfigError(f"model.preset={cfg.model.preset!r} needs model.base_dir (a converted checkpoint); "
                          "a preset alone only serves tools/aot_compile.py")


REWARD_MODEL_DIR = "reward_model"


def export_reward_model(cfg, out: pathlib.Path, config: Molmo2Config, base: dict, trainable: dict,
                        processor: pathlib.Path) -> None:
    """The trained model as a reward-model directory (checkpoint.py) that `mrrm_jax.score` loads.

    Its `base/` links the converted base the run read; a run that trained base weights (or started
    from a random init) writes its own, with those weights in place.
    """
    trainable = multihost_utils.process_allgather(trainable, tiled=True)
    own_base = bool(trainable["base"]) or not cfg.model.base_dir
    if own_base:
        base = multihost_utils.process_allgather(base, tiled=True)
    # Every process takes part in the Orbax saves (collectives across all processes, process 0 writes;
    # a save made by process 0 alone waits for the others forever); the other files are process 0's.
    first = jax.process_index() == 0
    if first:
        if out.exists():
            shutil.rmtree(out)  # a finished run asked again: written anew from the same state
        out.mkdir(parents=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("mrrm_jax: reward model directory made")
    if own_base:
        # The trained leaves are float32; the base is stored in the model's parameter dtype.
        params = jax.tree.map(lambda w: np.asarray(jnp.asarray(w, config.param_dtype)),
                              reward.overlay(base, trainable["base"]))
        checkpoint.save_params(out / checkpoint.BASE_DIR, config, params)
    elif first:
        (out / checkpoint.BASE_DIR).symlink_to(pathlib.Path(cfg.model.base_dir).absolute())
    lora_factors = {path.replace("|", "/"): ab for path, ab in trainable["lora"].items()}
    checkpoint.save_trainable(out, {"head": trainable["head"], "lora": lora_factors}, head_config(cfg), lora_spec(cfg))
    if first:
        shutil.copytree(processor, out / checkpoint.PROCESSOR_DIR)
        log.info("reward model written to %s", out)


def train(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train (or resume) in `workdir`; returns the final evaluation ({} without eval data). A finished
    run leaves its reward model in `workdir/reward_model` (for `mrrm_jax.score`)."""
    _validate(cfg)
    try:
        mesh = sharding.make_mesh(cfg.mesh.to_dict())
    except ValueError as error:  # a shape the devices do not fit, or too few CPU threads for them
        raise ConfigError(f"config.mesh: {error}") from error
    # Under the mesh the model pins its activations to the batch axes (sharding.constrain_rows), which
    # is what makes the 4B step fit a TPU (aot.py compiles it the same way).
    with jax.set_mesh(mesh):
        return _train(cfg, pathlib.Path(workdir).absolute(), mesh)


def _workdir_files(cfg, workdir: pathlib.Path) -> tuple:
    """(train data, eval data, processor directory) from `data_file` and `processor_dir`, which write the
    demo corpus and the processor into the workdir. With several processes, process 0 writes them before
    the others look: the workdir may be shared (one filesystem), and processes writing the same files at
    once read each other's half-written media or lose the corpus's temporary file to another's rename.
    A workdir that is not shared gets its own copy from each process, as before."""
    def barrier():
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mrrm_jax: workdir files")
    if jax.process_index():
        barrier()
    try:
        return data_file(cfg, "train", workdir), data_file(cfg, "eval", workdir), processor_dir(cfg, workdir)
    finally:
        if not jax.process_index():
            barrier()  # also when it raised: the others then raise the same error themselves


def _total(counts: np.ndarray) -> np.ndarray:
    """The skip counts of all processes together: each process counts the records of its own shard."""
    return multihost_utils.process_allgather(counts).sum(0)


def _train(cfg: ml_collections.ConfigDict, workdir: pathlib.Path, mesh) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    manager = ocp.CheckpointManager(workdir / "checkpoints", options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.checkpoint.keep, enable_async_checkpointing=True))
    resume_step = check_resumable(manager, cfg, workdir)
    train_path, eval_path, processor = _workdir_files(cfg, workdir)

    rows, micro_steps = cfg.train.rows_per_step, cfg.train.grad_accum
    if rows % (mesh.shape["data"] * mesh.shape["fsdp"] * micro_steps):
        raise ConfigError(f"train.rows_per_step={rows} must be a multiple of data x fsdp x grad_accum = "
                          f"{mesh.shape['data'] * mesh.shape['fsdp'] * micro_steps}")
    config = model_config(cfg)
    base = load_base(cfg, config, mesh)
    model = Model(Molmo2(config), reward.ValueHead(head_config(cfg)), lora_spec(cfg), cfg.train.objective)
    tx = optimizer(cfg)
    make_state = functools.partial(init_state, cfg, config, tx=tx)
    state_shardings = sharding.tree_shardings(jax.eval_shape(make_state, base), mesh)
    state = jax.jit(make_state, out_shardings=state_shardings)(base)

    local_rows = rows // jax.process_count()
    train_iter = iter(dataset(cfg, config, "train", train_path, processor, local_rows))
    counts = np.zeros(len(pipeline.COUNT_KEYS), np.int64)
    if resume_step is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = manager.restore(resume_step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=grain.checkpoint.CheckpointRestore(train_iter),
            run=ocp.args.JsonRestore()))
        state = restored["state"]
        if jax.process_index() == 0:  # the saved counts are all processes' together (`_total`): one carries them on
            counts = np.array([restored["run"]["counts"].get(k, 0) for k in pipeline.COUNT_KEYS], np.int64)
        log.info("resumed from step %d", resume_step)

    step_fn = jax.jit(functools.partial(train_step, model, tx), donate_argnums=(0,),
                      out_shardings=(state_shardings, None))
    scores_fn = jax.jit(functools.partial(eval_scores, model))
    rng = jax.random.key(cfg.seed + 2)
    writer = MetricsWriter(workdir, cfg.train.num_steps)

    def save(step: int, force: bool = False) -> None:
        run = {"config": _comparable(cfg), "counts": dict(zip(pipeline.COUNT_KEYS, _total(counts).tolist()))}
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState(train_iter.get_state())),
            run=ocp.args.JsonSave(run)), force=force)

    eval_rows = local_rows // micro_steps
    empty = pipeline.empty_batch(packing_config(cfg, config, eval_rows))

    def run_eval(step: int) -> dict:
        if eval_path is None:
            return {}
        results = {}
        for transform in ("none", *cfg.eval.controls):
            batches = dataset(cfg, config, "eval", eval_path, processor, eval_rows, transform)
            result = evaluate(scores_fn, state, base, batches, mesh, empty)
            prefix = "eval" if transform == "none" else f"eval_{transform}"
            writer.write(step, result, prefix)
            writer.progress(step, result, prefix)
            results[prefix] = result
        return results

    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())  # preemption: save, then exit
    step = int(state["step"])
    window = {"time": time.time(), "steps": 0, "examples": 0, "tokens": 0}
    try:
        while step < cfg.train.num_steps and not stop.is_set():
            local = next(train_iter, None)
            if local is None:
                log.info("data exhausted after %d epochs", cfg.data.num_epochs)
                break
            counts += local["counts"]
            state, metrics = step_fn(state, base, to_global(local, mesh, micro_steps), rng)
            step += 1
            window["steps"] += 1
            window["examples"] += int((local["labels"] >= 0).sum())
            window["tokens"] += int((local["segment_ids"] > 0).sum())
            if step % cfg.log_every == 0 or step == cfg.train.num_steps:
                metrics = jax.device_get(metrics)
                elapsed = time.time() - window["time"]
                # Throughput is per process (this host's rows); loss and accuracy are the step's, global.
                scalars = {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]),
                           "grad_norm": float(metrics["grad_norm"]), "examples_per_step": int(metrics["examples"]),
                           "tokens_per_s": window["tokens"] / elapsed, "examples_per_s": window["examples"] / elapsed,
                           "packing_efficiency": window["tokens"] / (window["steps"] * local["tokens"].size),
                           "skipped": int(_total(counts)[: pipeline.COUNT_KEYS.index("crops_reduced")].sum())}
                writer.write(step, scalars)
                writer.progress(step, scalars)
                window = {"time": time.time(), "steps": 0, "examples": 0, "tokens": 0}
            if step % cfg.checkpoint.every_steps == 0:
                save(step)
            if step % cfg.eval.every_steps == 0 and step < cfg.train.num_steps:
                run_eval(step)
        if manager.latest_step() != step:
            save(step, force=True)
        manager.wait_until_finished()
        if stop.is_set():
            log.warning("SIGTERM: saved step %d and stopped", step)
            return {}
        results = run_eval(step)
        writer.write(step, dict(zip(pipeline.COUNT_KEYS, _total(counts).tolist())), "counts")
        export_reward_model(cfg, workdir / REWARD_MODEL_DIR, config, base, state["trainable"], processor)
        return results
    finally:
        signal.signal(signal.SIGTERM, previous)
        writer.close()
        manager.close()
