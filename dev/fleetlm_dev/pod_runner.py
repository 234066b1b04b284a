"""A kubelet stand-in for the local control plane: runs each runtime pod's container as a process.

The local control plane has no nodes and no container runtime, so the pods of an LLMService stay Pending.
`PodRunner.sync()` plays the kubelet for them, the way Kubernetes would run the container:

* the pod's ConfigMap and Secret volumes are written to a directory of its own, and the container's
  command runs with each mount path pointing there (the runtime config the operator rendered, its admin
  token), plus `--host` set to a loopback address of the pod's own (127.x.y.z, port 8000 like the
  container port);
* once the process answers /ready, the pod's status is patched Running and Ready with that address as its
  podIP, so the operator scrapes and tunes it like any pod;
* a pod that is deleted (scale-down) terminates as a real one does: it leaves the ready endpoints at once
  (the EndpointSlice controller's part), its container's preStop sleep runs out while it still serves the
  requests clients sent it before they saw the endpoints change, then it gets SIGTERM (the runtime drains its
  in-flight streams) and SIGKILL once the pod's terminationGracePeriodSeconds have passed since the deletion.
  None of this blocks the sync: the other pods start, turn ready and are probed meanwhile;
* a Job's pod (restartPolicy Never) runs to completion instead: its exit code becomes the pod's phase
  (Succeeded or Failed) and a terminated container status (the last log lines as the message, as with
  FallbackToLogsOnError), so the real Job controller counts it, retries it or fails the Job;
* a PersistentVolumeClaim volume is one directory per claim under `<directory>/volumes/`, shared by every
  pod that mounts it (a model cache's fill Job writes it, the runtime pods read it);
* a pod that mounts its ServiceAccount token gets one from the TokenRequest API; as this stand-in cannot
  write /var/run/secrets, it hands the token, the CA and the server to the process as FLEETLM_API_TOKEN_FILE,
  FLEETLM_API_CA_FILE and FLEETLM_API_SERVER (read by the model-cache fill program).
* a container process that exits is started again on the same address after a backoff, as restartPolicy
  Always does (CrashLoopBackOff, scaled down: 1 s doubling to 10 s), and the pod is not Ready meanwhile;
* a container's `resources.limits.cpu` is enforced as a CFS quota on a cgroup of the pod's own
  (`cpu_limits`), so pods share this machine's cores as pods share a node's, and a replica added adds its
  share; the pods' parent cgroup is weighted above the rest of the machine, so a pod gets its quota beside
  other work as it would on a node; the readiness probe, like the kubelet's, takes a pod out after a 503
  at once but only after `PROBE_FAILURE_THRESHOLD` probes in a row that timed out (a throttled pod answers
  late, not never).

Only for the demo and for trying the operator without a cluster; nothing here is used in production.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import pathlib
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from fleetlm_dev import cluster, cpu_limits, paths, supervise, testing

RUNTIME_PORT = 8000
PROBE_FAILURE_THRESHOLD = 3  # the kubelet's default failureThreshold
DEFAULT_GRACE_S = 30.0  # a pod's terminationGracePeriodSeconds when its spec has none


@dataclass
class RunningPod:
    name: str
    ip: str
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path
    ready: bool = False
    exit_reported: bool = False
    runs_to_completion: bool = False  # a Job's pod: no /ready, its exit code is reported instead
    command: list[str] = field(default_factory=list)  # what the container runs, for a restart
    env: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    restart_at: float | None = None  # when an exited container is started again
    backoff: supervise.Backoff = field(default_factory=supervise.Backoff)
    cpu_limit: float | None = None  # cores, from resources.limits.cpu
    cpu_enforced: bool = False
    probe_timeouts: int = 0  # readiness probes in a row that got no answer in time
    pre_stop_s: float = 0.0  # the container's lifecycle.preStop sleep
    grace_s: float = DEFAULT_GRACE_S  # the pod's terminationGracePeriodSeconds
    deleted_at: float | None = None  # time.monotonic() when the pod was seen deleted
    sigterm_at: float | None = None  # when its process got SIGTERM (after the preStop sleep)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{RUNTIME_PORT}"


@dataclass
class PodRunner:
    plane: cluster.ControlPlane
    namespace: str
    selector: str  # label selector of the pods to run, e.g. "app.kubernetes.io/instance=tiny-demo"
    directory: pathlib.Path
    pods: dict[str, RunningPod] = field(default_factory=dict)
    terminating: list[RunningPod] = field(default_factory=list)  # deleted pods whose process has not exited
    cpu: cpu_limits.CpuLimits | None = None  # made with the first pod that has a CPU limit

    def sync(self) -> list[str]:
        """Start processes for new pods, mark started ones Ready, stop those whose pod is gone.
        Returns what happened, as lines for the log."""
        events: list[str] = []
        listed = json.loads(
            self.plane.kubectl("get", "pods", "-n", self.namespace, "-l", self.selector, "-o", "json").stdout
        )["items"]
        live = {p["metadata"]["name"]: p for p in listed if not p["metadata"].get("deletionTimestamp")}
        for name in list(self.pods):
            if name not in live:
                events.append(self._begin_termination(self.pods.pop(name)))
        events.extend(self._advance_terminations())
        for name, pod in live.items():
            running = self.pods.get(name)
            if running is None and _runs_to_completion(pod):
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before this runner saw it (a Job's pod is never rerun)
                running = self._start(pod)
                running.runs_to_completion = True
                self.pods[name] = running
                events.append(f"pod {name}: running its container to completion")
            elif running is not None and running.runs_to_completion:
                if running.process.poll() is not None and not running.exit_reported:
                    running.exit_reported = True
                    self._mark_terminated(pod, running)
                    events.append(f"pod {name}: exited with {running.process.returncode}")
            elif running is None:
                running = self._start(pod)
                self.pods[name] = running
                events.append(f"pod {name}: starting fleetlm-runtime on {running.url}")
            elif not running.ready and running.process.poll() is None and _answers(running.url + "/ready") is True:
                self._mark_ready(name, running.ip)
                running.ready = True
                events.append(f"pod {name}: ready on {running.url}")
            elif running.process.poll() is not None:
                events.extend(self._restart_exited(name, running))
            elif running.ready:
                events.extend(self._probe_readiness(name, running))
        return events

    def ready_urls(self) -> list[str]:
        return [p.url for p in self.pods.values() if p.ready and p.process.poll() is None]

    def stop_all(self) -> None:
        """SIGTERM every pod's process at once (terminating ones too), then wait for each (SIGKILL after 30 s)."""
        every = [*self.pods.values(), *self.terminating]
        for pod in every:
            if pod.process.poll() is None:
                pod.process.send_signal(signal.SIGTERM)
        for pod in every:
            testing.stop_process(pod.process, timeout_s=30)
        self.pods.clear()
        self.terminating.clear()
        if self.cpu is not None:
            self.cpu.close()

    def _limit_cpu(self, running: RunningPod) -> None:
        if running.cpu_limit is None:
            return
        if self.cpu is None:
            self.cpu = cpu_limits.CpuLimits()
        running.cpu_enforced = self.cpu.place(running.name, running.process.pid, running.cpu_limit)

    # ----------------------------------------------------------------------------------------------

    def _start(self, pod: dict[str, Any]) -> RunningPod:
        name = pod["metadata"]["name"]
        root = self.directory / name
        root.mkdir(parents=True, exist_ok=True)
        container = pod["spec"]["containers"][0]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        mounts: dict[str, pathlib.Path] = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            local = self._claim_dir(volume) or root / mount["name"]
            local.mkdir(parents=True, exist_ok=True)
            self._materialize(volume, local)
            mounts[mount["mountPath"]] = local
        _localize_config_files(root, volumes, mounts)
        command = [_localize(arg, mounts) for arg in container["command"] + container.get("args", [])]
        binary = paths.venv_bin(command[0])
        if binary is not None:
            command[0] = str(binary)
        elif command[0] in ("python", "python3"):
            command[0] = sys.executable
        ip = free_loopback_address()
        env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        env.update(self._env_from_sources(pod, container))
        env.update(self._service_account_env(pod, root))
        host_args = [] if _runs_to_completion(pod) else ["--host", ip]
        log_path = root / "runtime.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [*command, *host_args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_base_env(), **env},
            )
        cpu = container.get("resources", {}).get("limits", {}).get("cpu")
        running = RunningPod(
            name=name, ip=ip, process=process, log_path=log_path, command=[*command, "--host", ip],
            env={**_base_env(), **env}, cpu_limit=cpu_limits.parse_cpu(cpu) if cpu is not None else None,
            pre_stop_s=_pre_stop_sleep_s(container),
            grace_s=float(pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)),
        )  # fmt: skip
        self._limit_cpu(running)
        return running

    def _begin_termination(self, running: RunningPod) -> str:
        """A deleted pod: out of the ready endpoints now (`ready_urls` no longer lists it); its process runs on
        through the preStop sleep, so a request a client routed to it just before it left them is served."""
        running.deleted_at = time.monotonic()
        running.ready = False
        self.terminating.append(running)
        return (
            f"pod {running.name} deleted: out of the endpoints; SIGTERM after its {running.pre_stop_s:g}s preStop "
            f"sleep, SIGKILL {running.grace_s:g}s after the deletion"
        )

    def _advance_terminations(self) -> list[str]:
        """Each terminating pod one step on: SIGTERM once its preStop sleep is over, SIGKILL once its grace period
        is, and forgotten (its CPU share released) once its process has exited."""
        events: list[str] = []
        now = time.monotonic()
        for running in list(self.terminating):
            assert running.deleted_at is not None
            process = running.process
            if process.poll() is None and running.sigterm_at is None and now >= running.deleted_at + running.pre_stop_s:
                process.send_signal(signal.SIGTERM)
                running.sigterm_at = now
                events.append(f"pod {running.name}: preStop done, its runtime got SIGTERM and drains")
            if process.poll() is None and now >= running.deleted_at + running.grace_s:
                process.kill()
                process.wait()
                events.append(f"pod {running.name}: still running {running.grace_s:g}s after its deletion, SIGKILL")
            if process.poll() is not None:
                self.terminating.remove(running)
                if self.cpu is not None:
                    self.cpu.release(running.name)
                events.append(f"pod {running.name}: terminated (exit {process.returncode})")
        return events

    def _restart_exited(self, name: str, running: RunningPod) -> list[str]:
        """restartPolicy Always: an exited container is not Ready, and starts again after the backoff."""
        now = time.monotonic()
        if not running.exit_reported:
            running.exit_reported = True
            running.restart_at = now + running.backoff.after_exit(now - running.started_at)
            if running.ready:
                running.ready = False
                self._mark_not_ready(name)
            return [
                f"pod {name}: runtime exited with {running.process.returncode}; restarting in "
                f"{running.restart_at - now:.0f}s (see {running.log_path})"
            ]
        if running.restart_at is None or now < running.restart_at:
            return []
        with running.log_path.open("ab") as log:
            log.write(f"--- pod_runner: restart {running.restarts + 1} ---\n".encode())
            running.process = subprocess.Popen(running.command, stdout=log, stderr=subprocess.STDOUT, env=running.env)
        self._limit_cpu(running)
        running.restarts += 1
        running.started_at = now
        running.restart_at = None
        running.exit_reported = False
        return [f"pod {name}: container restarted ({running.restarts} restarts) on {running.url}"]

    def _probe_readiness(self, name: str, running: RunningPod) -> list[str]:
        """The readiness probe: a ready pod whose /ready answers anything but 200 (draining, its engine dead,
        its process exiting) is taken out of the endpoints at once, before its process is gone; one that
        does not answer in time, after PROBE_FAILURE_THRESHOLD probes in a row."""
        answer = _answers(running.url + "/ready")
        running.probe_timeouts = running.probe_timeouts + 1 if answer is None else 0
        if answer is True or (answer is None and running.probe_timeouts < PROBE_FAILURE_THRESHOLD):
            return []
        running.probe_timeouts = 0
        running.ready = False
        self._mark_not_ready(name)
        return [f"pod {name}: readiness probe failed, not ready"]

    def _mark_not_ready(self, name: str) -> None:
        conditions = [{"type": t, "status": "False"} for t in ("ContainersReady", "Ready")]
        status = {"status": {"conditions": conditions}}
        with contextlib.suppress(cluster.ClusterError):  # the pod may be gone already
            self.plane.kubectl(
                "patch", "pod", name, "-n", self.namespace, "--subresource=status", "--type=strategic",
                "-p", json.dumps(status),
            )  # fmt: skip

    def _materialize(self, volume: dict[str, Any], target: pathlib.Path) -> None:
        """ConfigMap and Secret volumes become files, as the kubelet projects them; others stay empty."""
        if "configMap" in volume:
            obj = json.loads(
                self.plane.kubectl(
                    "get", "configmap", volume["configMap"]["name"], "-n", self.namespace, "-o", "json"
                ).stdout
            )
            for key, value in (obj.get("data") or {}).items():
                (target / key).write_text(value)
        elif "secret" in volume:
            obj = json.loads(
                self.plane.kubectl(
                    "get", "secret", volume["secret"]["secretName"], "-n", self.namespace, "-o", "json"
                ).stdout
            )
            for key, value in (obj.get("data") or {}).items():
                (target / key).write_bytes(base64.b64decode(value))

    def _claim_dir(self, volume: dict[str, Any]) -> pathlib.Path | None:
        """The directory standing in for a PersistentVolumeClaim, shared by every pod that mounts it."""
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        return self.directory / "volumes" / self.namespace / claim if claim else None

    def _env_from_sources(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """Environment variables from the downward API (metadata.*) and from Secret keys."""
        env: dict[str, str] = {}
        for variable in container.get("env", []):
            source = variable.get("valueFrom") or {}
            if "fieldRef" in source:
                field_path = source["fieldRef"]["fieldPath"]
                if field_path.startswith("metadata."):
                    env[variable["name"]] = str(pod["metadata"].get(field_path.removeprefix("metadata."), ""))
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                found = self.plane.kubectl("get", "secret", ref["name"], "-n", self.namespace, "-o", "json",
                                           check=False)  # fmt: skip
                data = json.loads(found.stdout).get("data", {}) if found.returncode == 0 else {}
                if ref["key"] in data:
                    env[variable["name"]] = base64.b64decode(data[ref["key"]]).decode()
        return env

    def _service_account_env(self, pod: dict[str, Any], root: pathlib.Path) -> dict[str, str]:
        """A token for the pod's ServiceAccount (TokenRequest, as the kubelet projects it), where it mounts one."""
        spec = pod["spec"]
        account = spec.get("serviceAccountName")
        if not account or not spec.get("automountServiceAccountToken"):
            return {}
        token = self.plane.kubectl("create", "token", account, "-n", self.namespace, "--duration=1h").stdout.strip()
        token_path = root / "serviceaccount-token"
        token_path.write_text(token)
        return {
            "FLEETLM_API_SERVER": self.plane.server,
            "FLEETLM_API_TOKEN_FILE": str(token_path),
            "FLEETLM_API_CA_FILE": str(self.plane.pki.ca_cert),
        }

    def _mark_terminated(self, pod: dict[str, Any], running: RunningPod) -> None:
        """A finished container, as the kubelet reports it: the Job controller reads phase and exit code."""
        code = int(running.process.returncode or 0)
        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": pod["metadata"].get("creationTimestamp", now),
            "finishedAt": now,
        }
        if code != 0:  # FallbackToLogsOnError: the last lines of the log, at most 2048 bytes
            terminated["message"] = running.log_path.read_bytes()[-2048:].decode(errors="replace")
        container = pod["spec"]["containers"][0]
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                   "ready": False, "restartCount": 0, "started": False,
                                   "state": {"terminated": terminated}}],
        }  # fmt: skip
        self.plane.kubectl("patch", "pod", running.name, "-n", self.namespace, "--subresource=status",
                           "--type=strategic", "-p", json.dumps({"status": status}))  # fmt: skip

    def _mark_ready(self, name: str, ip: str) -> None:
        ready = [{"type": t, "status": "True"} for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": ready}}
        self.plane.kubectl(
            "patch", "pod", name, "-n", self.namespace, "--subresource=status", "--type=strategic",
            "-p", json.dumps(status),
        )  # fmt: skip


def _runs_to_completion(pod: dict[str, Any]) -> bool:
    """A Job's pod (or any pod with restartPolicy Never): run once, report the exit code."""
    owners = pod["metadata"].get("ownerReferences") or []
    return pod["spec"].get("restartPolicy") == "Never" or any(o.get("kind") == "Job" for o in owners)


def _pre_stop_sleep_s(container: dict[str, Any]) -> float:
    """The container's preStop pause: a `sleep` handler's seconds (an exec handler cannot run here), else 0."""
    pre_stop = (container.get("lifecycle") or {}).get("preStop") or {}
    return float((pre_stop.get("sleep") or {}).get("seconds", 0))


def _localize(arg: str, mounts: dict[str, pathlib.Path]) -> str:
    for mount_path, local in mounts.items():
        if arg == mount_path or arg.startswith(mount_path.rstrip("/") + "/"):
            return str(local) + arg[len(mount_path.rstrip("/")) :]
    return arg


def _localize_config_files(
    root: pathlib.Path, volumes: dict[str, dict[str, Any]], mounts: dict[str, pathlib.Path]
) -> None:
    """Paths inside the projected ConfigMap files (the runtime config names its API-keys file and its
    admin token by their mount paths) point at this pod's directories too, as the command line does."""
    for name, volume in volumes.items():
        if "configMap" not in volume or not (root / name).is_dir():
            continue
        for path in (root / name).iterdir():
            text = path.read_text()
            for mount_path, local in mounts.items():
                text = text.replace(mount_path.rstrip("/") + "/", str(local) + "/")
            path.write_text(text)


def _base_env() -> dict[str, str]:
    # One torch thread per pod: several pods share this machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _answers(url: str) -> bool | None:
    """True: 200. False: another status, or the connection refused. None: no answer within the timeout."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return bool(resp.status == 200)
    except TimeoutError:
        return None
    except urllib.error.URLError as error:
        return None if isinstance(error.reason, TimeoutError) else False
    except OSError:
        return False


def free_loopback_address() -> str:
    for _ in range(100):
        host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((host, RUNTIME_PORT))
            except OSError:
                continue
            return host
    raise RuntimeError(f"no free loopback address with port {RUNTIME_PORT}")
