"""Training: restore, step, log, save, evaluate and export, as a run spec says.

The step itself is `step.py`; the data, `data.py`; the checkpoints, `checkpoints.py` (all in `training/`).
A run stops early, with a checkpoint, when the caller sets `stop` (the CLI does on SIGTERM): every
process agrees on when, so multi-host runs stop together.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import pathlib
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mrrm_jax.backbones import checkpoint
from mrrm_jax.core import reward
from mrrm_jax.core import sharding
from mrrm_jax.training import aot, step
from mrrm_jax.core import tree_paths
from mrrm_jax.data import pipeline
from mrrm_jax.training import data as training_data
from mrrm_jax.training.metrics import MetricsWriter, SkipLog
from mrrm_jax import backbones
from mrrm_jax.training.checkpoints import RunCheckpoints
from mrrm_jax.training.spec import ConfigError, RunSpec, check_mesh, check_row_media

log = logging.getLogger(__name__)
REWARD_MODEL_DIR = "reward_model"


class RunError(RuntimeError):
    """The run cannot go on (an evaluation with nothing to score, NaN scores); reported without a traceback."""


# -- the model ------------------------------------------------------------------------------------

def load_base(spec: RunSpec, mesh) -> dict:
    """The frozen base on the mesh: converted weights from `spec.base_dir`, or a seeded random init."""
    config = spec.model
    shardings = sharding.tree_shardings(step.abstract_base(config), mesh)
    if spec.base_dir:
        # The reward path never uses the LM head (design decision 8).
        _, base = checkpoint.load_base(spec.base_dir, shardings=shardings, dtype=config.param_dtype, skip=("lm_head",))
        return base
    init = jax.jit(lambda key: fan_in_init(backbones.module(config).init(key, backbones.init_batch(config))["params"], key),
                   out_shardings=shardings)
    return init(jax.random.key(spec.seed))


def fan_in_init(params: dict, key) -> dict:
    """Every kernel redrawn from N(0, 1 / fan_in), for training from scratch.

    The port initialises like transformers (N(0, 0.02)), which suits 2560-wide layers (0.02 ~
    1/sqrt(2560)) but shrinks a 64-wide signal ~6x per layer: a random tiny ViT + adapter then hands
    the LM image features of ~1e-7, and nothing can be learned from the media.
    """
    flat = tree_paths.flatten(params)
    keys = dict(zip(flat, jax.random.split(key, len(flat))))
    redraw = lambda p, v: jax.random.normal(keys[p], v.shape, v.dtype) / np.sqrt(v.shape[-2])
    return tree_paths.nest({p: redraw(p, v) if p.endswith("kernel") else v for p, v in flat.items()})


def to_global(local: dict, mesh, micro_steps: int | None = None) -> dict:
    """A host batch [rows_local, ...] -> global arrays; with `micro_steps`, [micro, rows, ...]."""
    out = {}
    for name, value in local.items():
        if name in (*pipeline.HOST_KEYS, "media_kind"):
            continue  # host-side bookkeeping
        if micro_steps is not None:
            value = value.reshape(micro_steps, -1, *value.shape[1:])
        lead = 0 if micro_steps is None else 1
        out[name] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, value.ndim, lead), value)
    return out


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"mrrm_jax: {name}")


def _total(counts: np.ndarray) -> np.ndarray:
    """The skip counts of all processes together: each process counts the records of its own shard."""
    return multihost_utils.process_allgather(counts).sum(0) if jax.process_count() > 1 else counts


def _any_process(*flags: bool) -> tuple[bool, ...]:
    """Each flag, true if it is true on any process."""
    if jax.process_count() == 1:
        return flags
    return tuple(bool(v) for v in multihost_utils.process_allgather(np.array(flags)).reshape(-1, len(flags)).any(0))


# -- evaluation -------------------------------------------------------------------------------------

def evaluate(scores_fn, state, base, batches, mesh, empty: dict, stop: threading.Event | None = None) -> dict | None:
    """Best-of-N accuracy (top score == label) per media kind and overall, over one pass of `batches`.

    Every process runs the same number of batches (`empty` ones once its shard is done) and sees the
    gathered results, so all processes return the same numbers. No example to score, or a NaN score, is
    a `RunError`: an accuracy of 0.0 or of NaN-ordered scores would read as a result. None: `stop`
    was set on some process before the pass ended.
    """
    hits = np.zeros(len(pipeline.MEDIA_KINDS), np.int64)
    totals = np.zeros(len(pipeline.MEDIA_KINDS), np.int64)
    skips = []  # this process's
    iterator = iter(batches)
    while True:
        local = next(iterator, None)
        more, stopping = _any_process(local is not None, stop is not None and stop.is_set())
        if stopping:
            return None
        if not more:
            break
        local = empty if local is None else local
        skips += local["skips"]
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
        raise RunError(f"evaluation scored no example: every eval record was skipped "
                       f"({pipeline.most_common(skips, 'reason') or 'the eval data is empty'})")
    out = {f"accuracy_{k}": float(hits[i] / totals[i]) for i, k in enumerate(pipeline.MEDIA_KINDS) if totals[i]}
    out.update({f"examples_{k}": int(totals[i]) for i, k in enumerate(pipeline.MEDIA_KINDS) if totals[i]})
    out["accuracy"] = float(hits.sum() / totals.sum())
    return out


# -- export ----------------------------------------------------------------------------------------

def export_reward_model(spec: RunSpec, out: pathlib.Path, base: dict, trainable: dict, processor: pathlib.Path) -> None:
    """The trained model as a reward-model directory (backbones/checkpoint.py) that `mrrm_jax.score` loads.

    Its `base/` links the converted base the run read; a run that trained base weights (or started
    from a random init) writes its own, with those weights in place.
    """
    trainable = multihost_utils.process_allgather(trainable, tiled=True)
    own_base = bool(trainable["base"]) or not spec.base_dir
    if own_base:
        base = multihost_utils.process_allgather(base, tiled=True)
    # Every process takes part in the Orbax saves (collectives across all processes, process 0 writes;
    # a save made by process 0 alone waits for the others forever); the other files are process 0's.
    first = jax.process_index() == 0
    if first:
        if out.exists():
            shutil.rmtree(out)  # a finished run asked again: written anew from the same state
        out.mkdir(parents=True)
    _barrier("reward model directory made")
    if own_base:
        # The trained leaves are float32; the base is stored in the model's parameter dtype.
        params = jax.tree.map(lambda w: np.asarray(jnp.asarray(w, spec.model.param_dtype)),
                              reward.overlay(base, trainable["base"]))
        checkpoint.save_params(out / checkpoint.BASE_DIR, spec.model, params)
    elif first:
        (out / checkpoint.BASE_DIR).symlink_to(pathlib.Path(spec.base_dir).absolute())
    checkpoint.save_trainable(out, {"head": trainable["head"], "lora": tree_paths.unescape(trainable["lora"])},
                              spec.head, spec.lora)
    if first:
        shutil.copytree(processor, out / checkpoint.PROCESSOR_DIR)
        log.info("reward model written to %s", out)


# -- the run ---------------------------------------------------------------------------------------

def train(spec: RunSpec, workdir: str | pathlib.Path, stop: threading.Event | None = None) -> dict:
    """Train (or resume) in `workdir`; returns the final evaluation ({} without eval data, or when
    stopped early). A finished run leaves its reward model in `workdir/reward_model`."""
    try:
        mesh = sharding.make_mesh(spec.mesh)
    except ValueError as error:  # a shape the devices do not fit, or too few CPU threads for them
        raise ConfigError(f"config.mesh: {error}") from error
    check_mesh(spec, mesh, jax.process_count())
    # Under the mesh the model pins its activations to the batch axes (sharding.constrain_rows), which
    # is what makes the 4B step fit a TPU (aot.py compiles it the same way).
    with jax.set_mesh(mesh):
        return _Run(spec, pathlib.Path(workdir).absolute(), mesh).run(stop or threading.Event())


def workdir_files(spec: RunSpec, workdir: pathlib.Path) -> tuple:
    """(train data, eval data, processor directory, processor), the demo corpus and the processor
    written into the workdir if the config asks. With several processes, process 0 writes first: the
    workdir may be shared, and processes writing the same files at once would read each other's
    half-written media or lose the corpus's temporary file to another's rename."""
    if jax.process_index():
        _barrier("workdir files")
    try:
        return (training_data.data_file(spec.data, "train", workdir, spec.seed),
                training_data.data_file(spec.data, "eval", workdir, spec.seed),
                *training_data.open_processor(spec.processor, spec.base_dir, workdir))
    finally:
        if not jax.process_index():
            _barrier("workdir files")  # also when it raised: the others then raise the same error


def packing_config(spec: RunSpec, rows: int, sources: tuple[str, ...] = ()) -> pipeline.PackingConfig:
    """Batches of `rows` packed rows shaped for the spec's model (counted per source for a mixture)."""
    return pipeline.PackingConfig(spec.row, backbones.media(spec.model), rows, spec.window, sources=sources)


class _Run:
    """One training run in a workdir: everything `train` sets up, then `run`."""

    def __init__(self, spec: RunSpec, workdir: pathlib.Path, mesh):
        workdir.mkdir(parents=True, exist_ok=True)
        self.train_file, self.eval_file, self.processor, processor = workdir_files(spec, workdir)
        check_row_media(spec, processor)
        spec = dataclasses.replace(spec, model=backbones.with_processor(spec.model, processor))
        if spec.model.remat == "auto":  # before anything builds the model: the policy whose step fits
            spec, _ = aot.resolve_remat(spec, list(mesh.devices.flat))
        self.spec, self.workdir, self.mesh = spec, workdir, mesh
        self.local_rows = spec.train.rows_per_step // jax.process_count()
        self.train_iter = iter(self._batches(self.train_file, train=True, rows=self.local_rows))
        self.counts = np.zeros(len(pipeline.COUNT_KEYS), np.int64)
        self.sources = self.train_file.names if isinstance(self.train_file, training_data.Mixture) else ()
        self.source_counts = np.zeros((len(self.sources), 2), np.int64)  # [source, (examples, skips)]

        tx = step.optimizer(spec)
        make_state = functools.partial(step.init_state, spec, tx=tx)
        abstract_state = jax.eval_shape(make_state, step.abstract_base(spec.model))
        state_shardings = sharding.tree_shardings(abstract_state, mesh)
        # Restored before the base is loaded: another config's checkpoints are refused at once.
        self.checkpoints = RunCheckpoints(workdir / "checkpoints", spec.checkpoint_keep)
        try:
            restored = self._restore(jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                                  abstract_state, state_shardings))
        except BaseException:
            self.checkpoints.close()  # its background threads would outlive the error
            raise
        self.base = load_base(spec, mesh)
        self.state = restored if restored is not None else jax.jit(make_state, out_shardings=state_shardings)(self.base)
        model = step.model(spec)
        self.step_fn = jax.jit(functools.partial(step.train_step, model, tx), donate_argnums=(0,),
                               out_shardings=(state_shardings, None))
        self.scores_fn = jax.jit(functools.partial(step.eval_scores, model))
        self.writer = MetricsWriter(workdir, spec.train.num_steps)
        self.skip_log = SkipLog(workdir, 0 if restored is None else int(restored["step"]))

    def _batches(self, source, train: bool, rows: int, media_transform: str = "none"):
        spec = self.spec
        sources = source.names if isinstance(source, training_data.Mixture) else ()
        return training_data.batches(source, train, spec.data, spec.budget, self.processor,
                                     packing_config(spec, rows, sources), spec.seed, media_transform)

    def _per_source(self) -> dict:
        """A mixture's records so far that gave an example, and that were skipped, per source."""
        if not self.sources:
            return {}
        totals = _total(self.source_counts)
        return {f"{kind}/{name}": int(totals[number, column]) for number, name in enumerate(self.sources)
                for column, kind in enumerate(("examples", "skipped"))}

    # checkpoints

    def _restore(self, abstract_state) -> dict | None:
        """The newest readable checkpoint's state (the data iterator and counts set to match), or None."""
        restored = self.checkpoints.restore(abstract_state, self.train_iter, self._check_same_config)
        if restored is None:
            return None
        step_, state, run = restored
        if jax.process_index() == 0:  # the saved counts are all processes' together (`_total`): one carries them on
            self.counts = np.array([run["counts"].get(k, 0) for k in pipeline.COUNT_KEYS], np.int64)
            saved = run.get("source_counts", {})
            self.source_counts = np.array([saved.get(name, [0, 0]) for name in self.sources], np.int64).reshape(-1, 2)
        log.info("resumed from step %d", step_)
        return state

    def _check_same_config(self, run: dict) -> None:
        saved, now = run["config"], self.spec.fingerprint
        diffs = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diffs:
            shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in diffs[:8])
            raise ConfigError(f"workdir {self.workdir} holds checkpoints of another config ({shown}). Nothing "
                              "was changed; use a new --workdir or the config that wrote them.")

    def _save(self, step_: int, force: bool = False) -> None:
        run = {"config": self.spec.fingerprint, "counts": dict(zip(pipeline.COUNT_KEYS, _total(self.counts).tolist())),
               **({"source_counts": dict(zip(self.sources, _total(self.source_counts).tolist()))} if self.sources else {})}
        self.checkpoints.save(step_, self.state, self.train_iter.get_state(), run, force)

    # evaluation

    def _evaluate(self, step_: int, stop: threading.Event) -> dict | None:
        """The eval split and its media controls; None when stopped before the end."""
        if self.eval_file is None:
            return {}
        rows = self.local_rows // self.spec.train.grad_accum
        empty = pipeline.empty_batch(packing_config(self.spec, rows))
        results = {}
        for transform in ("none", *self.spec.eval_controls):
            batches = self._batches(self.eval_file, train=False, rows=rows, media_transform=transform)
            result = evaluate(self.scores_fn, self.state, self.base, batches, self.mesh, empty, stop)
            if result is None:
                return None
            prefix = "eval" if transform == "none" else f"eval_{transform}"
            self.writer.write(step_, result, prefix)
            self.writer.progress(step_, result, prefix)
            results[prefix] = result
        return results

    # the loop

    def run(self, stop: threading.Event) -> dict:
        spec = self.spec
        try:
            step_ = int(self.state["step"])
            rng = jax.random.key(spec.seed + 2)
            throughput = _Throughput()
            stopped = False
            while step_ < spec.train.num_steps:
                (stopped,) = _any_process(stop.is_set())  # before reading: a checkpoint holds no unused batch
                if stopped:
                    break
                local = next(self.train_iter, None)  # a broken pipeline raises pipeline.PipelineError
                (exhausted,) = _any_process(local is None)
                if exhausted:
                    log.info("data exhausted after %d epochs", spec.data.num_epochs)
                    break
                self.counts += local["counts"]
                self.source_counts += local["source_counts"]
                self.skip_log.write(step_ + 1, local["skips"])
                batch = to_global(local, self.mesh, spec.train.grad_accum)
                self.state, metrics = self.step_fn(self.state, self.base, batch, rng)
                step_ += 1
                throughput.add(local)
                if step_ % spec.log_every == 0 or step_ == spec.train.num_steps:
                    scalars = {**_step_scalars(jax.device_get(metrics)), **throughput.take(),
                               "skipped": int(_total(self.counts)[: pipeline.COUNT_KEYS.index("crops_reduced")].sum()),
                               **self._per_source()}
                    self.writer.write(step_, scalars)
                    self.writer.progress(step_, scalars)
                if step_ % spec.checkpoint_every == 0:
                    self._save(step_)
                periodic_eval = step_ % spec.eval_every == 0 and step_ < spec.train.num_steps
                if periodic_eval and self._evaluate(step_, stop) is None:
                    stopped = True
                    break
            if self.checkpoints.latest_step() != step_:
                self._save(step_, force=True)
            self.checkpoints.wait()
            if stopped:
                log.warning("stopped: saved step %d", step_)
                return {}
            results = self._evaluate(step_, stop)
            if results is None:
                log.warning("stopped during the final evaluation: step %d is saved", step_)
                return {}
            self.writer.write(step_, dict(zip(pipeline.COUNT_KEYS, _total(self.counts).tolist())), "counts")
            export_reward_model(spec, self.workdir / REWARD_MODEL_DIR, self.base, self.state["trainable"],
                                self.processor)
            return results
        finally:
            # The workers' batches and the packer's examples sit in shared memory, unlinked as their arrays
            # are freed, by a grain thread that Python's exit stops with its queue undone: close and
            # collect now, while it runs.
            self.train_iter.close()
            gc.collect()
            self.writer.close()
            self.skip_log.close()
            self.checkpoints.close()


def _step_scalars(metrics: dict) -> dict:
    """The step's loss and accuracy, global across processes."""
    return {"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"]),
            "grad_norm": float(metrics["grad_norm"]), "examples_per_step": int(metrics["examples"])}


class _Throughput:
    """This process's examples and tokens per second, and its rows' share of real tokens, since the last `take`."""

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self.start, self.steps, self.examples, self.tokens, self.slots = time.time(), 0, 0, 0, 0

    def add(self, local: dict) -> None:
        self.steps += 1
        self.examples += int((local["labels"] >= 0).sum())
        self.tokens += int((local["segment_ids"] > 0).sum())
        self.slots += local["tokens"].size

    def take(self) -> dict:
        elapsed = time.time() - self.start
        out = {"tokens_per_s": self.tokens / elapsed, "examples_per_s": self.examples / elapsed,
               "packing_efficiency": self.tokens / self.slots}
        self._reset()
        return out
