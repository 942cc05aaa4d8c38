"""A training run's data: its processor directory, its data files and their packed batches.

Reads only the data parts of the run spec (`ProcessorSpec`, `DataSpec`, the budget) and the packing
shapes it is given; the model is not its business.
"""

from __future__ import annotations

import dataclasses
import pathlib

import grain
import jax

from mrrm_jax import backbones
from mrrm_jax.data import examples, pipeline, records, synthetic, tfds_records
from mrrm_jax.training.spec import ConfigError, DataSpec, ProcessorSpec


def open_processor(spec: ProcessorSpec, base_dir: str, workdir: pathlib.Path):
    """The run's processor directory and its processor, loaded once here: a setting our preprocessing
    does not implement must stop the run at the start, not in a data worker."""
    if spec.dir:
        out = pathlib.Path(spec.dir)
    elif base_dir:
        out = pathlib.Path(base_dir)
        if not (out / "tokenizer_config.json").exists():
            raise ConfigError(f"model.base_dir={base_dir!r} has no tokenizer/processor files: set "
                              "processor.dir to the Hugging Face checkpoint directory it was converted from")
    else:
        out = workdir / "processor"
        if not (out / "processor_config.json").exists():
            try:
                backbones.write_processor(spec.model_type, out, **spec.settings)
            except TypeError as error:
                raise ConfigError(f"processor.kwargs {spec.settings} for a {spec.model_type} processor: {error}") from error
    try:
        return out, backbones.load_processor(out)
    except (OSError, ValueError) as error:
        raise ConfigError(f"processor {out}: {error}") from error


@dataclasses.dataclass(frozen=True)
class Mixture:
    """Prepared sources trained on together: each one's records file, name (its directory's) and weight."""
    files: tuple[pathlib.Path, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]


def mixture(spec: DataSpec) -> Mixture:
    files, names = [], []
    for entry, _ in spec.mixture:
        path = pathlib.Path(entry)
        file = path / "records.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"data.mixture: {entry!r} is not a prepared directory (no records.jsonl) or a JSONL file")
        name = (path if path.is_dir() else path.parent).name or "source"
        names.append(name if name not in names else f"{name}_{len(names)}")
        files.append(file)
    return Mixture(tuple(files), tuple(names), tuple(weight for _, weight in spec.mixture))


def data_file(spec: DataSpec, split: str, workdir: pathlib.Path, seed: int) -> pathlib.Path | str | Mixture | None:
    """The JSONL of a split, a "tfds:DATA_DIR:SPLIT" spec, or the training split's `Mixture`;
    "synthetic" writes the demo corpus into the workdir first."""
    if split == "train" and spec.mixture:
        return mixture(spec)
    name = getattr(spec, split)
    if not name:
        return None
    if name == "synthetic":
        sizes = spec.synthetic
        seed = seed * 2 + (split == "eval")  # different corpora for training and evaluation
        return synthetic.write_corpus(workdir / "data" / split, sizes[f"{split}_images"], sizes[f"{split}_videos"],
                                      seed)
    if name.startswith("tfds:"):
        record_items(name)  # fails early on a bad spec or directory
        return name
    path = pathlib.Path(name)
    if not path.exists():
        raise ConfigError(f"data.{split}={name!r} does not exist")
    return path


def record_items(source: pathlib.Path | str):
    """The grain source of a data file: JSONL records, or a prepared TFDS split (media inside)."""
    if isinstance(source, pathlib.Path):
        return records.read_jsonl(source)
    try:
        _, data_dir, split = source.split(":")
        builder = tfds_records.MultiResponseRecords(data_dir=data_dir)
        return tfds_records.RecordSource(builder.as_data_source(split))
    except (ValueError, AssertionError, KeyError) as error:
        raise ConfigError(f"data {source!r}: expected tfds:DATA_DIR:SPLIT of a prepared dataset ({error})") from error


def mixture_items(sources: Mixture) -> list[list]:
    """Each source's items, ids prefixed with the source's name, media under its own directory."""
    return [[(f"{name}/{record_id}", record, records.MediaDir(file.parent)) for record_id, record in records.read_jsonl(file)]
            for file, name in zip(sources.files, sources.names)]


def batches(source: pathlib.Path | str | Mixture, train: bool, spec: DataSpec, budget: examples.Budget,
            processor: pathlib.Path, packing: pipeline.PackingConfig, seed: int,
            media_transform: str = "none") -> grain.IterDataset:
    """This process's share of a split's records as packed batches: training shuffles and repeats in
    worker processes; evaluation reads one pass in order, in this process."""
    # A JSONL's media are under its directory unless `media_root` says otherwise; TFDS holds its own.
    media_root = spec.media_root or (source.parent if isinstance(source, pathlib.Path) else None)
    mixed = isinstance(source, Mixture)
    prepare = pipeline.PrepareExample(processor, backbones.load_processor, budget, seed + (0 if train else 1), media_root,
                                      media_transform, packing.row, sources=source.names if mixed else (),
                                      separate=packing.media if spec.single_response else None)
    return pipeline.batches(mixture_items(source) if mixed else record_items(source), prepare, packing, seed,
                            spec.num_epochs if train else 1, spec.num_workers if train else 0, jax.process_index(),
                            jax.process_count(), shuffle=train, num_threads=spec.num_threads,
                            mixture=list(source.weights) if mixed else None)
