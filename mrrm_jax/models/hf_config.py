"""Reading transformers `config.json` sub-configs into our frozen dataclasses (shared by the backbones)."""

from __future__ import annotations

from typing import Any


def build(cls, raw: dict, fields: dict):
    """`cls` from the keys of `raw` named in `fields` (transformers key -> our field); absent or null keys
    keep our defaults."""
    return cls(**{ours: tupled(raw[theirs]) for theirs, ours in fields.items() if raw.get(theirs) is not None})


def tupled(value: Any):
    """JSON lists -> tuples, so configs stay hashable (they are static arguments under jit)."""
    return tuple(tupled(v) for v in value) if isinstance(value, list) else value
