# Two entry points, each doing all set-up on a fresh machine (see README.md):
#   make demo   the local demo        make test   the whole test suite, then the short e2e scenarios
#   make e2e    every end-to-end scenario (e2e/: the closed loop under surges and faults)
# Everything built or downloaded lives under $(FLEETLM_CACHE), never in the repository.

FLEETLM_CACHE ?= $(HOME)/.cache/fleetlm
export FLEETLM_CACHE
VENV := $(FLEETLM_CACHE)/venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
E2E_ARGS ?=

.PHONY: venv k8s system-deps lint test unit e2e e2e-short demo

# Installed once per change of a pyproject.toml (the stamp); the install is editable, so code changes
# need no reinstall. pip shows what it fetches: on a fresh machine that is several GB (torch).
# Two projects in one pip command: fleetlm (what ships) and dev/ (fleetlm-dev, the developer tools).
STAMP := $(VENV)/.fleetlm-installed

$(STAMP): pyproject.toml dev/pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -e '.[dev]' -e ./dev
	@touch $(STAMP)

venv: $(STAMP)

# The control plane and helm, built from the Go module proxy once; a no-op when the cache is complete.
k8s: venv
	@$(VENV)/bin/fleetlm-dev build

# System packages the tests use: Prometheus (Debian's) for the tuner's `metricsSource: prometheus`.
# Installed only where missing; needs root (CI runs as root) or an existing install.
system-deps:
	@command -v prometheus >/dev/null || { \
	  echo "installing Debian's prometheus package" >&2; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

# mypy checks the packages named in pyproject.toml's [tool.mypy], with --strict.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# pytest's exit code 5 (no tests collected) is a failure here, not a pass.
PYTEST_RUN = rc=0; $(PY) -m pytest $(1) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi

# The whole suite, then the short end-to-end scenarios (e2e/ a: a surge, b: overload with classes, c: runtime
# faults; about 6 minutes on a busy 2-core machine) as a second run of their own, with their own control plane.
# `make e2e` runs them all.
test: venv k8s system-deps lint
	@$(call PYTEST_RUN,$(PYTEST_ARGS))
	@$(call PYTEST_RUN,e2e -m "e2e and short" $(E2E_ARGS))

e2e-short: venv k8s
	@$(call PYTEST_RUN,e2e -m "e2e and short" -s $(E2E_ARGS))

e2e: venv k8s
	@$(call PYTEST_RUN,e2e -m e2e -s $(E2E_ARGS))

# The unit tier: everything that needs no control plane and no helm (pure logic, the engine, in-process and
# real runtime processes). Nothing to build but the venv.
unit: venv
	@$(call PYTEST_RUN,-m "not cluster and not e2e" --ignore=tests/helm $(PYTEST_ARGS))

demo: venv k8s
	$(VENV)/bin/fleetlm-dev demo
