"""All of the operator's handlers; importing this module registers them with kopf.

Run with `fleetlm-operator` or `kopf run --standalone -A -m fleetlm_operator.handlers.main`.
"""

from __future__ import annotations

from fleetlm_operator.handlers import idle, lifecycle, model_cache, reconcile, tune

HANDLER_MODULES = (lifecycle, reconcile, model_cache, tune, idle)
