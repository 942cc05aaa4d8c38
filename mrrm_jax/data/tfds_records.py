"""A TFDS dataset of records in the paper's schema with their media inside: ArrayRecord files, written
and read without TensorFlow, read at random through `builder.as_data_source()` by grain.

Build it from JSONL files (`<split>.jsonl`, media paths relative to the file) in a directory:

    builder = MultiResponseRecords(data_dir=out_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=jsonl_dir))
    source = RecordSource(builder.as_data_source("train"))   # for pipeline.batches

or `python tools/build_tfds.py --jsonl_dir=DIR --data_dir=OUT`. Each element holds the record's id
(`file:line`), its JSON text as written (a line that is not JSON stays as text, to be counted as a
skip by the pipeline, like the JSONL reader does) and the bytes of every media file it names: an image,
a video file, or each image of a frame directory (as `dir/file`). A file that is missing or outside
the directory is left out, so reading the record gives the same counted skip as the JSONL source.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from mrrm_jax.data import records
from mrrm_jax.data.media import FRAME_SUFFIXES


class MultiResponseRecords(tfds.core.GeneratorBasedBuilder):
    """Multi-response reward records with embedded media (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "A directory of <split>.jsonl files; media paths relative to it."

    def __init__(self, **kwargs):
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        blob = tfds.features.Tensor(shape=(), dtype=np.object_)
        # The JSONL order is kept (the pipeline shuffles per epoch), so both sources index alike.
        return self.dataset_info_from_configs(disable_shuffling=True, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "record": tfds.features.Text(),
            "media": tfds.features.Sequence({"name": tfds.features.Text(), "data": blob}),
        }))

    def _split_generators(self, dl_manager):
        files = sorted(pathlib.Path(dl_manager.manual_dir).glob("*.jsonl"))
        if not files:
            raise FileNotFoundError(f"no .jsonl files in {dl_manager.manual_dir}")
        return {path.stem: self._generate_examples(path) for path in files}

    def _generate_examples(self, path: pathlib.Path):
        root = path.parent.resolve()
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            record_id = f"{path.name}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            media = _media_files(record, root) if isinstance(record, dict) else {}
            yield record_id, {"id": record_id, "record": line,
                              "media": {"name": list(media), "data": list(media.values())}}


def _media_files(record: dict, root: pathlib.Path) -> dict[str, bytes]:
    """name -> bytes for every readable media file a record names (a frame directory: each frame)."""
    names = records.media_names(record)
    out = {}
    for name in names:
        path = (root / name).resolve()
        if not path.is_relative_to(root) or not path.exists():
            continue  # read back as a counted skip (missing_file / path_outside_root)
        if path.is_dir():
            for frame in sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES):
                out[f"{records.normalise_name(name)}/{frame.name}"] = frame.read_bytes()
        else:
            out[records.normalise_name(name)] = path.read_bytes()
    return out


class RecordSource:
    """A grain source over a TFDS data source: (record id, record, `records.MediaBlobs` of its media) per element."""

    def __init__(self, data_source):
        self.data_source = data_source

    def __len__(self) -> int:
        return len(self.data_source)

    def __getitem__(self, index: int):
        element = self.data_source[index]
        record_id, line = _text(element["id"]), _text(element["record"])
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = line
        media = element["media"]
        return record_id, record, records.MediaBlobs({_text(n): bytes(d) for n, d in zip(media["name"], media["data"])})


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
