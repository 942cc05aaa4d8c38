"""The run spec: a config (configs/*.py) parsed once, at the start, into frozen dataclasses.

Every check of a config lives here and fails with a `ConfigError` that names the key and the fix,
before anything is read, written or compiled. Everything below the spec (trainer, step, the run's
data, aot) reads these types, never ml_collections. Where a type already exists for a part of the
spec (the backbone's config, `lora.LoraSpec`, `reward.HeadConfig`, `examples.Budget`,
`packing.RowBudget`) the spec holds that type.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import TYPE_CHECKING

import jax.numpy as jnp

from mrrm_jax.backbones import checkpoint
from mrrm_jax.core import lora
from mrrm_jax.core import reward
from mrrm_jax.data import examples, packing
from mrrm_jax.models.attention import BACKENDS
from mrrm_jax import backbones
from mrrm_jax.models.decoder import REMAT_POLICIES

if TYPE_CHECKING:  # configs are ConfigDicts; the spec itself needs no ml_collections (bench/gpu.py runs without it)
    import ml_collections

# Keys that may differ between a run and the checkpoint it resumes (the rest must match).
RESUMABLE_CHANGES = ("train.num_steps", "log_every", "checkpoint.every_steps", "checkpoint.keep",
                     "eval.every_steps", "eval.controls", "data.num_workers", "data.num_threads",
                     "model.remat_budget_gib")
EVAL_CONTROLS = ("black", "frozen")  # media blanked at evaluation: the model must lose its accuracy


class ConfigError(ValueError):
    """A problem with the configuration, data paths or the workdir; reported without a traceback."""


@dataclasses.dataclass(frozen=True)
class ProcessorSpec:
    dir: str  # "" = the base's processor files, else one written into the workdir with the settings below
    model_type: str  # whose processor to write (`backbones.write_processor`)
    settings: dict  # its settings (`processor.kwargs`)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    train: str  # a JSONL file, "tfds:DATA_DIR:SPLIT" or "synthetic"
    eval: str  # the same, or "" for none
    mixture: tuple[tuple[str, float], ...]  # (prepared directory or JSONL, weight) per source, or ()
    media_root: str  # "" = the JSONL file's directory
    num_epochs: int | None  # None: repeat for as many steps as the run takes
    num_workers: int
    num_threads: int
    synthetic: dict[str, int]  # {train,eval}_{images,videos}: the demo corpus' sizes
    single_response: bool = False  # each response in its own sequence: a single-response RM (the baseline)


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    num_steps: int
    rows_per_step: int  # packed rows per optimizer step, all processes together
    grad_accum: int
    objective: str
    full_train: tuple[str, ...]  # regexes of base parameters trained in full


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    learning_rate: float
    warmup_steps: int
    weight_decay: float
    clip_norm: float


@dataclasses.dataclass(frozen=True)
class RunSpec:
    seed: int
    model: object  # the backbone's config (the table in backbones/__init__.py), e.g. Molmo2Config
    base_dir: str  # a converted base (tools/convert_checkpoint.py); "" = a seeded random init
    processor: ProcessorSpec
    head: reward.HeadConfig
    lora: lora.LoraSpec | None  # None: no LoRA
    data: DataSpec
    budget: examples.Budget
    row: packing.RowBudget
    window: int  # examples packed together
    train: TrainSpec
    optimizer: OptimizerSpec
    mesh: dict[str, int]
    log_every: int
    checkpoint_every: int
    checkpoint_keep: int
    eval_every: int
    eval_controls: tuple[str, ...]
    remat_budget_gib: float  # device memory for `model.remat="auto"`; 0: the device's own
    # The config's keys and values that a resumed run must share with its checkpoint (all but
    # RESUMABLE_CHANGES), as written into every checkpoint.
    fingerprint: dict = dataclasses.field(repr=False, compare=False)

    @property
    def micro_rows(self) -> int:
        """Rows of one micro-step, all processes together."""
        return self.train.rows_per_step // self.train.grad_accum


def parse(cfg: ml_collections.ConfigDict, training: bool = True) -> RunSpec:
    """The spec of `cfg`, or a `ConfigError`; needs no device (the CLI parses before JAX starts).
    `training=False` (AOT compiles) allows a preset without weights and no training data."""
    c = cfg
    _check(c.train.grad_accum >= 1 and c.train.rows_per_step % c.train.grad_accum == 0,
           f"train.rows_per_step={c.train.rows_per_step} is not a multiple of train.grad_accum={c.train.grad_accum}")
    _check(c.train.objective in reward.OBJECTIVES,
           f"train.objective={c.train.objective!r}: expected one of {reward.OBJECTIVES}")
    if training and not c.data.train and not c.data.mixture:
        _fail("data.train is empty: give a JSONL file, tfds:DATA_DIR:SPLIT or 'synthetic', or data.mixture")
    _check_mixture(c.data)
    if training and c.model.preset and not c.model.base_dir:
        _fail(f"model.preset={c.model.preset!r} needs model.base_dir (a converted checkpoint); "
             "a preset alone only serves tools/aot_compile.py")
    for key in ("log_every", "checkpoint.every_steps", "checkpoint.keep", "eval.every_steps", "train.num_steps"):
        _check(_get(c, key) >= 1, f"{key}={_get(c, key)} must be at least 1")
    unknown_controls = set(c.eval.controls) - set(EVAL_CONTROLS)
    _check(not unknown_controls, f"eval.controls has {sorted(unknown_controls)}: expected some of {EVAL_CONTROLS}")
    _check(c.data.num_epochs == -1 or c.data.num_epochs >= 1, f"data.num_epochs={c.data.num_epochs}: -1 or at least 1")
    for pattern in c.train.full_train:
        try:
            re.compile(pattern)
        except re.error as error:
            _fail(f"train.full_train: {pattern!r} is not a regular expression ({error})")

    model = _model(c.model)
    processor = ProcessorSpec(c.processor.dir, model.model_type, c.processor.kwargs.to_dict())
    budget = examples.Budget(**c.budget.to_dict())
    p = c.packing
    row = packing.RowBudget(p.row_tokens, p.row_crops, p.row_pooled, p.row_examples, p.max_responses, p.pool_slots,
                            p.get("row_patches", 0))
    _check_row_holds_budget(row, budget, backbones.media(model))
    try:
        head = reward.HeadConfig(**c.head.to_dict())
    except (TypeError, ValueError) as error:
        _fail(f"head: {error}")
    _check(c.lora.rank >= 0, f"lora.rank={c.lora.rank} must be 0 (no LoRA) or more")
    return RunSpec(
        seed=c.seed, model=model, base_dir=c.model.base_dir, processor=processor, head=head,
        lora=lora.LoraSpec(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout) if c.lora.rank else None,
        data=DataSpec(c.data.train, c.data.eval, tuple((str(d), float(w)) for d, w in c.data.mixture), c.data.media_root,
                      None if c.data.num_epochs == -1 else c.data.num_epochs, c.data.num_workers,
                      c.data.num_threads, c.data.synthetic.to_dict(), c.data.single_response),
        budget=budget, row=row, window=p.window,
        train=TrainSpec(c.train.num_steps, c.train.rows_per_step, c.train.grad_accum, c.train.objective,
                        tuple(c.train.full_train)),
        optimizer=OptimizerSpec(c.train.learning_rate, c.train.warmup_steps, c.train.weight_decay, c.train.clip_norm),
        mesh=c.mesh.to_dict(), log_every=c.log_every, checkpoint_every=c.checkpoint.every_steps,
        checkpoint_keep=c.checkpoint.keep, eval_every=c.eval.every_steps, eval_controls=tuple(c.eval.controls),
        remat_budget_gib=c.model.remat_budget_gib, fingerprint=_fingerprint(c))


def check_mesh(spec: RunSpec, mesh, process_count: int) -> None:
    """Every process reads as many rows, and every micro-step's rows split evenly over the mesh's batch
    axes (data x fsdp)."""
    _check(spec.train.rows_per_step % process_count == 0,
           f"train.rows_per_step={spec.train.rows_per_step} does not split over {process_count} processes: "
           "make it a multiple of the process count")
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    _check(spec.micro_rows % ways == 0,
           f"train.rows_per_step={spec.train.rows_per_step} must be a multiple of data x fsdp x grad_accum = "
           f"{ways * spec.train.grad_accum}")


def _model(m):
    _check(m.type in backbones.BACKBONES, f"model.type={m.type!r}: expected one of {sorted(backbones.BACKBONES)}")
    _check(m.attention in BACKENDS, f"model.attention={m.attention!r}: expected one of {sorted(BACKENDS)}")
    remats = ("none", *REMAT_POLICIES, "auto")  # "auto": resolved by `aot.resolve_remat` on the devices
    _check(m.remat in remats, f"model.remat={m.remat!r}: expected one of {remats}")
    _check(m.remat_budget_gib >= 0, f"model.remat_budget_gib={m.remat_budget_gib} must be 0 (the device's) or more")
    for key in ("param_dtype", "dtype"):
        try:
            jnp.dtype(m[key])
        except TypeError:
            _fail(f"model.{key}={m[key]!r} is not a dtype name (e.g. float32, bfloat16)")
    runtime = dict(param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat, attention=m.attention,
                   scan_unroll=m.scan_unroll, with_lm_head=False)
    config_class = backbones.BACKBONES[m.type].config_class
    if m.base_dir:
        try:
            config = checkpoint.load_config(m.base_dir).replace(**runtime)
        except (OSError, ValueError) as error:
            _fail(f"model.base_dir={m.base_dir!r}: {error}")
        _check(config.model_type == m.type, f"model.base_dir={m.base_dir!r} holds a {config.model_type} "
               f"checkpoint, but model.type={m.type!r}")
        return config
    if m.preset:
        presets = config_class.PRESETS
        _check(m.preset in presets, f"model.preset={m.preset!r}: expected one of {presets} for model.type={m.type!r}")
        return getattr(config_class, m.preset)(**runtime)
    try:
        return config_class.from_dims(m.dims.to_dict(), **runtime)
    except (KeyError, TypeError) as error:
        _fail(f"model.dims: {error}")


def check_row_media(spec: RunSpec, processor) -> None:
    """What the row must hold for the processor's largest media (`processor_problem` of the backbone's
    media layout): known only once the processor's files are."""
    problem = backbones.media(spec.model).processor_problem(spec.row, spec.budget, processor)
    _check(problem is None, problem)


def _check_row_holds_budget(row: packing.RowBudget, budget: examples.Budget, media) -> None:
    """An example the length budget accepts must fit an empty row in tokens, vision tokens (the media
    layout's `budget_problem`) and responses; records beyond that (many images, more responses than a
    row's slots) are counted skips, not config errors."""
    _check(budget.max_tokens <= row.row_tokens,
           f"budget.max_tokens={budget.max_tokens} exceeds packing.row_tokens={row.row_tokens}: examples the "
           "budget accepts would not fit a row; lower the budget or raise the row")
    problem = media.budget_problem(row, budget)
    _check(problem is None, problem)
    _check(row.max_responses >= 2, f"packing.max_responses={row.max_responses}: an example has 2 responses or more")
    _check(row.row_examples >= 1, f"packing.row_examples={row.row_examples} must be at least 1")


def _fingerprint(cfg: ml_collections.ConfigDict) -> dict:
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


def _check_mixture(data) -> None:
    if not data.mixture:
        return
    _check(not data.train, f"data.train={data.train!r} and data.mixture are both set: give one")
    _check(data.num_epochs == -1, "data.mixture repeats every source for as long as the run: data.num_epochs must be -1")
    _check(not data.media_root, "data.mixture: each prepared directory holds its own media; data.media_root must be empty")
    for entry in data.mixture:
        _check(isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
               and isinstance(entry[1], (int, float)) and entry[1] > 0,
               f"data.mixture entry {entry!r}: expected (DIR, weight > 0)")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _fail(message: str):
    raise ConfigError(message)
