"""Every example manifest in examples/ is a valid LLMService and renders into objects."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from fleetlm_operator.api import models, names
from fleetlm_operator.builders import configmap, deployment

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[3] / "examples").glob("llmservice-*.yaml"))


def test_the_three_documented_examples_exist() -> None:
    assert {path.name for path in EXAMPLES} >= {
        "llmservice-cpu-demo.yaml",
        "llmservice-gpu-chat.yaml",
        "llmservice-multiclass.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_validates_and_renders(path: pathlib.Path) -> None:
    manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert manifest["apiVersion"] == names.API_VERSION
    assert manifest["kind"] == names.KIND
    svc = models.LLMService.model_validate(manifest)
    deployment.build_deployment(svc, default_image="ghcr.io/fleetlm/runtime:test")
    configmap.build_config_map(svc)


def test_cpu_demo_needs_no_gpu() -> None:
    [path] = [path for path in EXAMPLES if path.name == "llmservice-cpu-demo.yaml"]
    svc = models.LLMService.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert svc.spec.model.source == "builtin:tiny"
    assert svc.spec.runtime.gpus == 0


def test_multiclass_example_sheds_only_its_batch_class() -> None:
    [path] = [path for path in EXAMPLES if path.name == "llmservice-multiclass.yaml"]
    svc = models.LLMService.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert [qos_class.name for qos_class in svc.spec.qos.classes if qos_class.sheddable] == ["batch"]
    assert svc.spec.qos.default_class == "standard"
