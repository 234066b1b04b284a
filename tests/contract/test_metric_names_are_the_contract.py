"""The contract module is the one source of metric names: the runtime exports exactly those families.

The operator reads /metrics through `fleetlm_runtime.contract`; if the runtime renamed a metric without
changing the contract, these tests fail here instead of the tuning loop going blind in production.
"""

from __future__ import annotations

import ast
import pathlib

from prometheus_client import parser

from fleetlm_runtime import config, contract, metrics
from fleetlm_runtime.engine import outputs

RUNTIME = pathlib.Path(contract.__file__).parent


def _exported_families() -> dict[str, str]:
    m = metrics.RuntimeMetrics(model_name="tiny", max_model_len=2048, qos_classes=["default", "batch"])
    m.set_config(config.RuntimeConfig(), max_kv_tokens=4096)
    return {f.name: f.type for f in parser.text_string_to_metric_families(m.render().decode())}


def test_every_declared_family_is_exported_with_its_type() -> None:
    exported = _exported_families()
    for name in contract.COUNTERS:
        assert exported.get(name) == "counter", name
    for name in contract.HISTOGRAMS:
        assert exported.get(name) == "histogram", name
    for name in contract.GAUGES - contract.GPU_METRICS:
        assert exported.get(name) == "gauge", name


def test_nothing_is_exported_that_the_contract_does_not_name() -> None:
    declared = contract.COUNTERS | contract.GAUGES | contract.HISTOGRAMS | contract.VLLM_ALIASES
    assert set(_exported_families()) <= declared


def test_vllm_aliases_are_what_an_endpoint_picker_reads() -> None:
    """GIE's model-server protocol, default engine vLLM: queued, running, KV usage 0..1, cache block info."""
    m = metrics.RuntimeMetrics(model_name="tiny", max_model_len=64, qos_classes=["default", "batch"])
    m.set_config(config.RuntimeConfig(), max_kv_tokens=4096)
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render().decode())}
    for name in contract.VLLM_ALIASES:
        assert families[name].type == "gauge", name
    for name in (contract.VLLM_NUM_REQUESTS_WAITING, contract.VLLM_NUM_REQUESTS_RUNNING,
                 contract.VLLM_KV_CACHE_USAGE_PERC):  # fmt: skip
        (sample,) = families[name].samples
        assert sample.labels[contract.VLLM_LABEL_MODEL_NAME] == "tiny"
    (info,) = families[contract.VLLM_CACHE_CONFIG_INFO].samples
    assert info.value == 1
    assert info.labels["block_size"] == "16" and info.labels["num_gpu_blocks"] == str(4096 // 16)


def test_names_carry_the_prefix_and_counters_export_total() -> None:
    for name in contract.COUNTERS | contract.GAUGES | contract.HISTOGRAMS:
        assert name.startswith(contract.METRIC_PREFIX)
    text = metrics.RuntimeMetrics(model_name="tiny", max_model_len=64).render().decode()
    assert contract.sample_name(contract.GENERATION_TOKENS) + "{" in text
    assert contract.sample_name(contract.GENERATION_TOKENS) == "fleetlm_generation_tokens_total"


def test_gpu_metrics_are_absent_without_a_gpu_sampler() -> None:
    assert not set(_exported_families()) & contract.GPU_METRICS


def test_config_info_carries_the_contract_labels() -> None:
    m = metrics.RuntimeMetrics(model_name="tiny", max_model_len=64)
    cfg = config.RuntimeConfig().with_limits(max_batch_size=7, max_batch_tokens=700)
    m.set_config(cfg, max_kv_tokens=999)
    family = next(
        f for f in parser.text_string_to_metric_families(m.render().decode()) if f.name == contract.CONFIG_INFO
    )
    (sample,) = family.samples
    assert set(sample.labels) == {contract.LABEL_MODEL, *contract.CONFIG_INFO_LABELS}
    assert sample.labels["max_batch_size"] == "7"
    assert sample.labels["max_batch_tokens"] == "700"
    assert sample.labels["max_kv_tokens"] == "999"
    assert (sample.labels["kv_block_size"], sample.labels["kv_num_blocks"]) == ("16", "")  # no engine yet


def test_the_kv_pool_and_weights_are_published_once_the_engine_started() -> None:
    m = metrics.RuntimeMetrics(model_name="tiny", max_model_len=64)
    info = outputs.EngineInfo(
        model_id="tiny",
        max_model_len=64,
        vocab_size=10,
        eos_token_ids=frozenset(),
        kv_capacity_tokens=1024,
        forward_name="modules",
        kv_block_size=16,
        kv_num_blocks=64,
        kv_pool_bytes=520_192,
        weight_bytes=4096,
        load_seconds=1.5,
    )
    m.set_engine_info(info)
    m.set_config(config.RuntimeConfig(), max_kv_tokens=1024)
    families = {f.name: f for f in parser.text_string_to_metric_families(m.render().decode())}
    # Gauges of moments still to come (the ready time, say) are declared but have no sample yet.
    value = {
        name: families[name].samples[0].value
        for name in contract.GAUGES
        if families.get(name) and families[name].samples
    }
    assert value[contract.KV_CACHE_BLOCKS_TOTAL] == 64 and value[contract.KV_CACHE_POOL_BYTES] == 520_192
    assert value[contract.MODEL_WEIGHT_BYTES] == 4096 and value[contract.MODEL_LOAD_SECONDS] == 1.5
    (sample,) = families[contract.CONFIG_INFO].samples
    assert (sample.labels["kv_cache_memory"], sample.labels["kv_block_size"], sample.labels["kv_num_blocks"]) == (
        "520192",
        "16",
        "64",
    )


def test_contract_imports_only_the_standard_library() -> None:
    tree = ast.parse((RUNTIME / "contract.py").read_text())
    imported = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported <= {"__future__", "typing"}, imported


def test_buckets_match_vllm() -> None:
    assert contract.build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert contract.build_1_2_5_buckets(2048)[-1] == 2000
    assert contract.TTFT_BUCKETS_S[0] == 0.001 and contract.TTFT_BUCKETS_S[-1] == 2560.0
    assert contract.REQUEST_LATENCY_BUCKETS_S[-1] == 7680.0
