"""`model.remat="auto"`: the policy with the least recomputation whose compiled step fits the device,
from XLA's memory plan of the real step (`training/aot.py`); none fitting, or a device that reports no
memory and no `model.remat_budget_gib`, is a clear error."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import pytest

from mrrm_jax.training import aot
from mrrm_jax.training import spec as run_spec
from mrrm_jax.training import trainer
from tests.test_train import small_config

DEVICES = jax.devices()[:1]


def _spec(remat: str, budget_gib: float = 0.0) -> run_spec.RunSpec:
    return run_spec.parse(small_config(**{"model.remat": remat, "model.remat_budget_gib": budget_gib}))


@pytest.fixture(scope="module")
def plans() -> dict[str, int]:
    """Each policy's planned bytes per device, from XLA's memory analysis of the compiled step."""
    spec = _spec("none")
    return {policy: aot.planned_bytes(dataclasses.replace(spec, model=spec.model.replace(remat=policy)), DEVICES)
            for policy in aot.REMAT_ORDER}


def test_remat_lowers_the_planned_memory(plans):
    assert all(isinstance(n, int) and n > 0 for n in plans.values()), plans
    assert plans["full"] < plans["dots"] < plans["none"], plans


def test_auto_takes_the_least_recomputation_that_fits(plans):
    # A budget that the most saving policy fits and the plain step does not.
    budget = plans["full"] / (1 - aot.REMAT_MARGIN) * 1.001
    expected = next(p for p in aot.REMAT_ORDER if plans[p] <= (1 - aot.REMAT_MARGIN) * budget)
    assert expected != "none"
    spec, plan = aot.resolve_remat(_spec("auto", budget / 2**30), DEVICES)
    assert spec.model.remat == expected
    assert list(plan) == list(aot.REMAT_ORDER[:aot.REMAT_ORDER.index(expected) + 1])  # stops at the first fit
    assert plan == {p: plans[p] for p in plan}


def test_nothing_fitting_and_no_known_memory_are_clear_errors(plans):
    with pytest.raises(run_spec.ConfigError, match=r"no policy's step fits .* none .* dots .* dots_no_batch .* full"):
        aot.resolve_remat(_spec("auto", plans["full"] / 2 / 2**30), DEVICES)
    with pytest.raises(run_spec.ConfigError, match="reports none: set model.remat_budget_gib"):
        aot.resolve_remat(_spec("auto"), DEVICES)


def test_a_run_with_auto_trains_on_the_chosen_policy(tmp_path, plans, caplog):
    budget_gib = plans["none"] / (1 - aot.REMAT_MARGIN) * 2 / 2**30  # roomy: the plain step
    cfg = small_config(**{"model.remat": "auto", "model.remat_budget_gib": budget_gib, "train.num_steps": 2})
    with caplog.at_level(logging.INFO, logger="mrrm_jax.training.aot"):
        trainer.train(run_spec.parse(cfg), tmp_path)
    assert "model.remat='auto': none" in caplog.text
    saved = json.loads((tmp_path / "reward_model" / "base" / "config.json").read_text())
    assert saved["remat"] == "none"  # the policy, never "auto", goes into the exported model
