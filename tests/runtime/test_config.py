"""RuntimeConfig: YAML with schemaVersion, camelCase or snake_case keys, and errors that name the field."""

from __future__ import annotations

import pathlib

import pytest

from fleetlm_runtime import config, contract


def test_defaults_round_trip_through_the_configmap_shape() -> None:
    cfg = config.RuntimeConfig()
    dumped = config.dump_config(cfg)
    assert dumped[contract.CONFIG_SCHEMA_VERSION_KEY] == contract.CONFIG_SCHEMA_VERSION
    assert "maxBatchSize" in dumped["batching"]
    assert config.parse_config(dumped) == cfg


def test_yaml_file_with_classes_and_snake_case(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "runtime.yaml"
    path.write_text(
        """
schemaVersion: v1
model: {source: "builtin:tiny", dtype: float32}
server: {port: 9000, drainGracePeriodS: 5}
batching: {max_batch_size: 8, maxBatchTokens: 256, maxQueueLen: 10}
qos:
  defaultClass: standard
  classes:
    - {name: interactive, priority: 0, weight: 4, ttftTargetS: 0.2, tpotTargetS: 0.05}
    - {name: standard, priority: 1}
    - {name: batch, priority: 2, sheddable: true, queueLimit: 5}
caching: {responseCache: {enabled: true, maxEntries: 10}}
"""
    )
    cfg = config.load_config(path)
    assert cfg.server.port == 9000
    assert cfg.batching.max_batch_size == 8
    assert cfg.qos.by_name()["batch"].queue_limit == 5
    assert cfg.qos.by_name()["interactive"].ttft_target_s == 0.2
    assert cfg.caching.response_cache.enabled
    assert cfg.served_model_name == "tiny"


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"batching": {"maxBatchSize": 0}}, "batching.maxBatchSize"),
        ({"batching": {"maxBatchSize": 64, "maxBatchTokens": 32}}, "maxBatchTokens (32) must be >= maxBatchSize"),
        ({"server": {"port": 70000}}, "server.port"),
        ({"server": {"drainGracePeriodS": -1}}, "server.drainGracePeriodS"),
        ({"model": {"dtype": "int3"}}, "model.dtype"),
        ({"qos": {"classes": [{"name": "Bad Name"}]}}, "qos.classes.0.name"),
        ({"qos": {"classes": [{"name": "a"}, {"name": "a"}], "defaultClass": "a"}}, "duplicate class names: a"),
        ({"qos": {"defaultClass": "gold"}}, "defaultClass 'gold'"),
        ({"batching": {"maxBatchSiz": 3}}, "batching.maxBatchSiz"),
        ({"schemaVersion": "v0"}, "schemaVersion: unsupported version"),
    ],
)
def test_errors_name_the_field(data: dict[str, object], needle: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.parse_config(data)
    assert needle in str(caught.value)


def test_with_limits_validates_the_pair() -> None:
    cfg = config.RuntimeConfig()
    assert cfg.with_limits(max_batch_size=4, max_batch_tokens=64).batching.max_batch_size == 4
    with pytest.raises(config.ConfigError, match="maxBatchTokens"):
        cfg.with_limits(max_batch_size=128, max_batch_tokens=64)


def test_unreadable_and_non_mapping_files(tmp_path: pathlib.Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(config.ConfigError, match="expected a mapping"):
        config.load_config(bad)


def test_api_keys_file_maps_keys_to_known_classes(tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("k1: interactive\nk2: batch\n")
    assert config.load_api_keys(keys, classes={"interactive", "batch"}) == {"k1": "interactive", "k2": "batch"}
    with pytest.raises(config.ConfigError, match="unknown classes batch"):
        config.load_api_keys(keys, classes={"interactive"})
