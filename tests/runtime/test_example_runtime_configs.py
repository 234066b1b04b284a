"""The runtime configs shipped in examples/runtime/ load, with the API keys they point at."""

from __future__ import annotations

import pathlib

import yaml

from fleetlm_runtime import config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_qos_overload_example_loads_with_its_keys() -> None:
    cfg = config.parse_config(yaml.safe_load((ROOT / "examples" / "runtime" / "qos-overload.yaml").read_text()))
    assert [c.name for c in cfg.qos.classes] == ["critical", "standard", "sheddable"]
    assert [c.name for c in cfg.qos.classes if c.sheddable] == ["sheddable"]
    keys = yaml.safe_load((ROOT / str(cfg.qos.api_keys_file)).read_text())
    assert set(keys.values()) == {"critical", "standard", "sheddable"}
