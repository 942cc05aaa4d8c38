"""Training records that duplicate a benchmark item: same image and near-identical prompt.

VL-RewardBench was built from VLFeedback, RLAIF-V, POVID and WildVision battles, four of our ten
sources, so a model trained on them unfiltered has seen test items. A training record is dropped when
its image matches a benchmark image AND its prompt matches that item's prompt:

- image: the same bytes (SHA-256), or the same 64-bit perceptual hash within `MAX_HASH_DISTANCE` bits
  (a DCT hash: survives re-encoding, resizing and mild recompression; a different picture differs in
  ~32 of the 64 bits);
- prompt: the Jaccard similarity of word 3-grams of the normalised text (lower case, punctuation and
  `<image>` removed, whitespace collapsed) at least `MIN_PROMPT_SIMILARITY`.

Both, not either: a benchmark image reused with another question, or a stock question asked of another
picture, is not a duplicate. Benchmark records without an image (videos, text) are not indexed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pathlib
import re

import numpy as np
import scipy.fft
from PIL import Image

from mrrm_jax.benchmarks import formats
from mrrm_jax.data.examples import Skip

MAX_HASH_DISTANCE = 10  # of 64 bits; re-encoded and resized copies measure 0-4 in the tests
MIN_PROMPT_SIMILARITY = 0.8
HASH_SIDE = 32  # the image is reduced to HASH_SIDE x HASH_SIDE grey before the DCT
# A benchmark file named like its release (or given as NAME:PATH) -> its reader in `formats`.
RELEASE_NAMES = {"all_data.json": "multimodal_rewardbench", "mm_reward_bench.jsonl": "mm_rlhf_rewardbench"}


def perceptual_hash(image: Image.Image) -> int:
    """64 bits: the signs of the 8x8 lowest DCT frequencies of the grey image against their median."""
    grey = np.asarray(image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS), np.float64)
    low_88 = scipy.fft.dctn(grey, norm="ortho")[:8, :8]
    bits = (low_88 > np.median(low_88.reshape(-1)[1:])).reshape(-1)  # the DC term left out of the median
    return int("".join("1" if b else "0" for b in bits), 2)


def normalise(prompt: str) -> str:
    return " ".join(re.sub(r"[^\w]+", " ", prompt.replace("<image>", " ").lower()).split())


def shingles(prompt: str, n: int = 3) -> frozenset:
    words = normalise(prompt).split()
    return frozenset(tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1)))


def similarity(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclasses.dataclass(frozen=True)
class Item:
    benchmark: str
    id: str
    shingles: frozenset


class Index:
    """Benchmark items by image: exact bytes in a dict, perceptual hashes in one array for a vector scan."""

    def __init__(self):
        self.by_sha: dict[str, list[Item]] = {}
        self.hashed: dict[int, list[Item]] = {}  # perceptual hash -> items
        self.indexed: dict[str, int] = {}  # benchmark -> items indexed
        self._codes = np.zeros(0, np.uint64)  # the keys of `hashed`, in order, for the scan

    def add(self, benchmark: str, item_id: str, prompt: str, raw: bytes) -> None:
        image = Image.open(io.BytesIO(raw))
        item = Item(benchmark, item_id, shingles(prompt))
        self.by_sha.setdefault(hashlib.sha256(raw).hexdigest(), []).append(item)
        code = perceptual_hash(image)
        if code not in self.hashed:
            self._codes = np.append(self._codes, np.uint64(code))
        self.hashed.setdefault(code, []).append(item)
        self.indexed[benchmark] = self.indexed.get(benchmark, 0) + 1

    def matches(self, raw: bytes, image: Image.Image, prompt: str) -> list[Item]:
        """The benchmark items with this image (bytes or hash) and a near-identical prompt."""
        same_image = list(self.by_sha.get(hashlib.sha256(raw).hexdigest(), []))
        distance = np.bitwise_count(self._codes ^ np.uint64(perceptual_hash(image)))
        for code in self._codes[distance <= MAX_HASH_DISTANCE]:
            same_image += self.hashed[int(code)]
        words = shingles(prompt)
        found = {(i.benchmark, i.id): i for i in same_image if similarity(words, i.shingles) >= MIN_PROMPT_SIMILARITY}
        return list(found.values())


def benchmark_name(spec: str) -> tuple[str, pathlib.Path]:
    """"NAME:PATH" or a PATH whose file name says the benchmark (a parquet is VL-RewardBench's)."""
    name, sep, path = spec.partition(":")
    if sep and name in formats.BENCHMARKS:
        return name, pathlib.Path(path)
    path = pathlib.Path(spec)
    name = "vl_rewardbench" if path.suffix == ".parquet" else RELEASE_NAMES.get(path.name)
    if name is None:
        raise ValueError(f"--decontaminate {spec!r}: name the benchmark as NAME:PATH with NAME one of "
                         f"{', '.join(formats.BENCHMARKS)}")
    return name, path


def build_index(specs: list[str]) -> tuple[Index, dict]:
    """The index of every image item of the benchmark files, and what was left out per benchmark
    (records without an image, records whose image cannot be read)."""
    index, left_out = Index(), {}
    for spec in specs:
        name, path = benchmark_name(spec)
        _, items = formats.read(name, path)
        for item in items:
            reason = _add(index, name, item)
            if reason:
                left_out.setdefault(spec, {}).setdefault(reason, 0)
                left_out[spec][reason] += 1
    return index, left_out


def _add(index: Index, name: str, item) -> str | None:
    if isinstance(item, formats.RecordError):
        return "unreadable_record"
    images = item.media.get("image")
    if not images:
        return "no_image"
    for image in [images] if isinstance(images, str) else images:
        try:
            source = item.files.open(image, item.id, "image")  # a path (a media tree) or bytes (parquet)
            raw = source.read() if hasattr(source, "read") else pathlib.Path(source).read_bytes()
            index.add(name, item.id, item.prompt, raw)
        except (OSError, ValueError, Skip):  # an image we cannot read cannot be matched: counted
            return "unreadable_image"
    return None
