"""Shared fixtures: tiny random transformers Molmo2 models, saved and converted by our tool."""

from __future__ import annotations

import os

# Tests must never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib

import pytest

from tests import oracle


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> oracle.TinyModels:
    """One tiny Molmo2 (GQA, qkv bias, scaled rope on some layers), saved in both layouts and converted."""
    return oracle.make_tiny_models(pathlib.Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory) -> pathlib.Path:
    from mrrm_jax.data.tokenizer import write_molmo2_processor_dir

    return write_molmo2_processor_dir(tmp_path_factory.mktemp("processor"), **oracle.PROCESSOR_KWARGS)
