"""Simulator runs shared by the bar tests: each trace is replayed once per session, with a fixed seed."""

from __future__ import annotations

import pytest

from fleetlm_dev.sim import run, workload

SEED = 1


@pytest.fixture(scope="session")
def step_run() -> run.Outcome:
    return run.simulate(workload.TRACES["step"], run.POLICIES["fleetlm"], seed=SEED)


@pytest.fixture(scope="session")
def diurnal_run() -> run.Outcome:
    return run.simulate(workload.TRACES["diurnal"], run.POLICIES["fleetlm"], seed=SEED)


@pytest.fixture(scope="session")
def class_mix_run() -> run.Outcome:
    return run.simulate(workload.TRACES["class-mix"], run.POLICIES["fleetlm"], seed=SEED)


@pytest.fixture(scope="session")
def startup60_run() -> run.Outcome:
    return run.simulate(workload.TRACES["startup60"], run.POLICIES["fleetlm"], seed=SEED)
