"""Only the idle handler scales a service to zero (after spec.replicas.idleTimeout, with the router holding
requests): the tuner's floor is one replica even where spec.replicas.min is 0, so it never undoes the
router's scale-up nor idles a service on its own."""

from __future__ import annotations

import pytest

from fleetlm_operator import bridge
from fleetlm_operator.api import spec_models


def _spec(replicas: dict[str, object], router: dict[str, object] | None = None) -> spec_models.LLMServiceSpec:
    data: dict[str, object] = {"model": {"source": "builtin:tiny"}, "replicas": replicas}
    if router is not None:
        data["router"] = router
    return spec_models.LLMServiceSpec.model_validate(data)


@pytest.mark.parametrize(
    ("replicas", "router", "floor"),
    [
        ({"min": 0, "max": 4, "idleTimeout": "5m"}, {"enabled": True}, 1),
        ({"min": 0, "max": 4}, None, 1),
        ({"min": 2, "max": 4}, None, 2),
    ],
)
def test_the_tuners_floor(replicas: dict[str, object], router: dict[str, object] | None, floor: int) -> None:
    assert bridge.policy_spec_of(_spec(replicas, router)).min_replicas == floor
