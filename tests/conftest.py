"""Shared fixtures: tiny random transformers Molmo2 models, saved and converted by our tool."""

from __future__ import annotations

import os

# Tests must never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pathlib
import subprocess
import sys
from importlib import metadata

import pytest
from absl import flags
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# grain's worker processes read absl flags; under pytest nobody parses the command line for absl.
flags.FLAGS.mark_as_parsed()

from tests import oracle

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> oracle.TinyModels:
    """One tiny Molmo2 (GQA, qkv bias, scaled rope on some layers), saved in both layouts and converted."""
    return oracle.make_tiny_models(pathlib.Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory):
    """One tiny Qwen3-VL (the real config shrunk, deepstack on 2 ViT blocks), saved and converted by our tool."""
    from tests import qwen3_vl_oracle

    return qwen3_vl_oracle.make_tiny_qwen(pathlib.Path(tmp_path_factory.mktemp("qwen")))


@pytest.fixture(scope="session")
def processor_dir(tmp_path_factory) -> pathlib.Path:
    from mrrm_jax.backbones.molmo2.processor_files import write_molmo2_processor_dir

    return write_molmo2_processor_dir(tmp_path_factory.mktemp("processor"), **oracle.PROCESSOR_KWARGS)


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory, tiny_models, processor_dir) -> pathlib.Path:
    """A reward-model directory around the tiny base: LoRA with non-zero B, a random value head."""
    import shutil

    import jax
    import jax.numpy as jnp

    from mrrm_jax.backbones import checkpoint
    from mrrm_jax.core import lora
    from mrrm_jax.core import reward
    from mrrm_jax.backbones import load_processor

    out = tmp_path_factory.mktemp("reward")
    shutil.copytree(tiny_models.converted_native, out / checkpoint.BASE_DIR)
    config, base = checkpoint.load_base(out / checkpoint.BASE_DIR)
    spec = lora.LoraSpec(rank=4, alpha=8)
    factors = lora.init(base, spec, jax.random.key(0))
    factors = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape), factors)
    head_config = reward.HeadConfig()
    head = reward.ValueHead(head_config).init(jax.random.key(2), jnp.zeros((1, config.text.hidden_size)))["params"]
    head = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), head)
    checkpoint.save_trainable(out, {"lora": factors, "head": head}, head_config, spec)
    load_processor(processor_dir).save_pretrained(out / checkpoint.PROCESSOR_DIR)
    return out


@pytest.fixture(scope="session")
def model(tiny_reward_dir):
    """The tiny reward model loaded once for every test that scores (one jit cache: each batch shape
    compiles once in the whole run)."""
    from mrrm_jax.scoring.reward_model import RewardModel

    return RewardModel.load(tiny_reward_dir)


def _runtime_distributions() -> list[metadata.Distribution]:
    """The installed distributions `pip install -e .` brings: our requirements and theirs, no extras."""
    seen, todo, found = set(), ["mrrm_jax"], []
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(distribution)
        for requirement in map(Requirement, distribution.requires or []):
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


@pytest.fixture(scope="session")
def no_torch_env(tmp_path_factory) -> dict:
    """An environment holding only what `pip install -e .` installs (no torch, no test extras): `python -S`
    (no site-packages) over a folder of links to those distributions' files, plus this checkout."""
    packages = tmp_path_factory.mktemp("runtime_site_packages")
    for distribution in _runtime_distributions():
        root = pathlib.Path(distribution.locate_file(""))
        for top in {pathlib.PurePath(f).parts[0] for f in distribution.files or []} - {"..", "__pycache__"}:
            if (root / top).exists() and not (packages / top).exists() and not top.endswith(".pth"):
                (packages / top).symlink_to(root / top)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(packages)]), "JAX_PLATFORMS": "cpu"}
    probe = "import importlib.util, sys; assert importlib.util.find_spec('torch') is None; import torch"
    blocked = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True)
    assert "ModuleNotFoundError: No module named 'torch'" in blocked.stderr, blocked.stderr
    return env
