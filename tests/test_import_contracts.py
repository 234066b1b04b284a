"""The boundaries the module docstrings state, checked on what an import really loads.

Each contract imports its modules in a fresh interpreter and inspects `sys.modules`, so an import three
modules deep breaks it as surely as a direct one:

- the tuning policy, the scheduler (engine/scheduler.py, engine/queues.py) and the caches do no I/O and
  need no torch: none of aiohttp, kubernetes, kopf, requests or torch is loaded, and no FleetLM module
  they load imports socket or subprocess itself (those two are checked on the project's own imports:
  asyncio, which the caches use for single-flight futures, loads both for its transports);
- the engine knows nothing of HTTP: no aiohttp loaded by any module of fleetlm_runtime.engine;
- the operator uses nothing of the runtime but its contract and its config schema.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
IO_PACKAGES = ("aiohttp", "kubernetes", "kopf", "requests", "torch")
IO_STDLIB = ("socket", "subprocess")

# Run in a fresh interpreter: imports every module of `packages` plus `modules`, then reports what was
# loaded and, for each FleetLM module loaded, the top-level names it imports itself.
PROBE = textwrap.dedent(
    """
    import ast, importlib, json, pkgutil, sys
    packages, modules = json.loads(sys.argv[1])
    for package in packages:
        root = importlib.import_module(package)
        modules += [info.name for info in pkgutil.walk_packages(root.__path__, package + ".")]
    for name in modules:
        importlib.import_module(name)
    own = {}
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if not name.startswith("fleetlm_") or not path:
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
        own[name] = sorted(imported)
    print(json.dumps({"loaded": sorted(sys.modules), "own": own, "probed": modules}))
    """
)


def _probe(*, packages: tuple[str, ...] = (), modules: tuple[str, ...] = ()) -> dict:
    paths = [str(REPO_ROOT / part) for part in ("operator", "runtime", "router", "dev")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([list(packages), list(modules)])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _top(name: str) -> str:
    return name.split(".", maxsplit=1)[0]


PURE = {
    "policy": {"packages": ("fleetlm_operator.policy",)},
    "scheduler": {"modules": ("fleetlm_runtime.engine.scheduler", "fleetlm_runtime.engine.queues")},
    "caches": {"packages": ("fleetlm_runtime.caches",)},
}


@pytest.mark.parametrize("part", sorted(PURE))
def test_pure_parts_load_no_io_and_no_torch(part: str) -> None:
    result = _probe(**PURE[part])
    assert len(result["probed"]) >= 2, result["probed"]  # the walk found the modules it should check
    loaded = {_top(name) for name in result["loaded"]}
    assert loaded.isdisjoint(IO_PACKAGES), sorted(loaded & set(IO_PACKAGES))
    direct = {
        module: sorted({_top(name) for name in imported} & set(IO_STDLIB)) for module, imported in result["own"].items()
    }
    assert {module: names for module, names in direct.items() if names} == {}


def test_the_engine_knows_nothing_of_http() -> None:
    result = _probe(packages=("fleetlm_runtime.engine",))
    assert "fleetlm_runtime.engine.scheduler" in result["probed"]
    assert not [name for name in result["loaded"] if _top(name) == "aiohttp"]
    assert not [name for name in result["loaded"] if name.startswith("fleetlm_runtime.server")]


def test_the_operator_uses_only_the_runtimes_contract_and_config() -> None:
    result = _probe(packages=("fleetlm_operator",))
    assert "fleetlm_operator.handlers.main" in result["probed"]
    runtime = {name for name in result["loaded"] if _top(name) == "fleetlm_runtime"}
    assert runtime <= {"fleetlm_runtime", "fleetlm_runtime.contract", "fleetlm_runtime.config"}, sorted(runtime)
    assert "torch" not in {_top(name) for name in result["loaded"]}
