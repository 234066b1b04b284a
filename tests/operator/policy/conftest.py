"""Fixtures for policy tests: the builders of fleetlm_dev.policy_inputs, under the names the tests take."""

from __future__ import annotations

import pytest

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow, build_spec, build_window


@pytest.fixture
def make_spec() -> MakeSpec:
    return build_spec


@pytest.fixture
def make_window() -> MakeWindow:
    return build_window
