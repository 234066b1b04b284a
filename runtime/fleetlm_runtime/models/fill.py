"""Fill a model cache volume once: copy a checkpoint directory, or download it from the hub.

`python -m fleetlm_runtime.models.fill --source SRC --dest DIR` is the command of the model-cache Job
the operator creates. It writes into a hidden sibling of DIR and renames it into place only when every
file is there, with a manifest (`fleetlm-cache.json`: source, revision, each file's size and sha256),
so a replica never sees half a checkpoint and a second run with the same source finds DIR complete and
does nothing.

Progress goes where the operator reads it: a merge patch of one annotation on the fill's own Job
(`--report-job`), through the API server with the pod's ServiceAccount token (the operator grants that
account `get`/`patch` on that one Job and nothing else). Reporting is best effort: without an API
server the fill still works and the Job's own status says when it is done.

Exit codes tell the Job controller what to do: 0 filled, EXIT_PERMANENT (the source is missing or not a
checkpoint, the volume is too small: retrying cannot help, so the Job's pod failure policy fails the Job
at once) and EXIT_RETRYABLE (network errors, the deadline of this attempt: the Job retries with back-off
up to its backoffLimit). The hub path needs network and huggingface_hub; it is imported only there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import functools
import hashlib
import json
import os
import pathlib
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

EXIT_OK = 0
EXIT_PERMANENT = 2  # also what argparse exits with on a bad command line: equally permanent
EXIT_RETRYABLE = 3

MANIFEST_NAME = "fleetlm-cache.json"
ANNOTATION_PROGRESS = "fleetlm.dev/cache-progress"  # the operator's names.ANNOTATION_CACHE_PROGRESS
CHUNK_BYTES = 8 << 20
REPORT_EVERY_S = 1.0
# What the runtime loads from a hub repository: config, tokenizer and safetensors weights.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*")
SKIPPED_DIRS = frozenset({".git", ".cache", ".huggingface"})
# Optional cap on the copy's bandwidth, so one fill cannot saturate a shared volume or link (unset: none).
ENV_MAX_BYTES_PER_S = "FLEETLM_FILL_MAX_BYTES_PER_S"

# In-cluster API access, as every pod with a ServiceAccount token gets it; the env overrides let the
# local kubelet stand-in hand the same credentials to a plain process.
SA_DIR = pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount")


class FillError(Exception):
    """The fill cannot complete; `reason` is one CamelCase word for status, `retryable` picks the exit code."""

    def __init__(self, reason: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable


@dataclasses.dataclass(frozen=True, slots=True)
class ApiTarget:
    server: str
    token: str
    ca_file: str | None
    namespace: str
    job: str


class Reporter:
    """Patches the fill's progress onto its Job's annotation, at most once a second (and always the last)."""

    def __init__(self, target: ApiTarget | None, *, log: Callable[[str], None]) -> None:
        self._target = target
        self._log = log
        self._last_s = 0.0
        self._warned = False

    def report(self, phase: str, *, force: bool = False, **fields: Any) -> None:
        now = time.monotonic()
        if self._target is None or (not force and now - self._last_s < REPORT_EVERY_S):
            return
        self._last_s = now
        body = {"phase": phase, "time": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
        body.update({key: value for key, value in fields.items() if value is not None})
        patch = {"metadata": {"annotations": {ANNOTATION_PROGRESS: json.dumps(body, sort_keys=True)}}}
        target = self._target
        request = urllib.request.Request(
            f"{target.server}/apis/batch/v1/namespaces/{target.namespace}/jobs/{target.job}",
            data=json.dumps(patch).encode(),
            method="PATCH",
            headers={"Content-Type": "application/merge-patch+json", "Authorization": f"Bearer {target.token}"},
        )
        context = ssl.create_default_context(cafile=target.ca_file) if target.server.startswith("https") else None
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                response.read()
        except (OSError, urllib.error.URLError) as error:
            if not self._warned:  # progress is best effort; the Job's status still says when it ends
                self._log(f"cannot report progress to the API server: {error}")
                self._warned = True


def api_target(job: str | None, namespace: str | None, env: dict[str, str]) -> ApiTarget | None:
    """Where to report, from the in-cluster ServiceAccount (or the FLEETLM_API_* overrides); None if nowhere."""
    if not job:
        return None
    server = env.get("FLEETLM_API_SERVER")
    if not server and env.get("KUBERNETES_SERVICE_HOST"):
        server = f"https://{env['KUBERNETES_SERVICE_HOST']}:{env.get('KUBERNETES_SERVICE_PORT', '443')}"
    token_file = pathlib.Path(env.get("FLEETLM_API_TOKEN_FILE", str(SA_DIR / "token")))
    ca_file = env.get("FLEETLM_API_CA_FILE", str(SA_DIR / "ca.crt"))
    namespace = namespace or env.get("POD_NAMESPACE")
    if not namespace and (SA_DIR / "namespace").is_file():
        namespace = (SA_DIR / "namespace").read_text().strip()
    if not server or not namespace or not token_file.is_file():
        return None
    return ApiTarget(
        server=server.rstrip("/"),
        token=token_file.read_text().strip(),
        ca_file=ca_file if pathlib.Path(ca_file).is_file() else None,
        namespace=namespace,
        job=job,
    )


# ----------------------------------------------------------------------------------------------------
# Copying a directory


def _files(root: pathlib.Path) -> Iterator[pathlib.Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for filename in sorted(filenames):
            yield pathlib.Path(dirpath) / filename


def check_checkpoint(root: pathlib.Path) -> None:
    """Refuse what the runtime could never load: no config.json or no safetensors weights."""
    if not (root / "config.json").is_file():
        raise FillError("NotACheckpoint", f"{root} has no config.json", retryable=False)
    if not any(root.glob("*.safetensors")):
        raise FillError(
            "NotACheckpoint", f"{root} has no *.safetensors weights (only safetensors load)", retryable=False
        )


def copy_tree(
    source: pathlib.Path,
    target: pathlib.Path,
    *,
    deadline_s: float,
    progress: Callable[[int, int], None],
    max_bytes_per_s: int | None = None,
) -> list[dict[str, Any]]:
    """Copy every file of `source` into `target`, hashing as it goes; returns the manifest's file list."""
    if not source.exists():
        raise FillError("SourceNotFound", f"source {source} does not exist", retryable=False)
    if not source.is_dir():
        raise FillError("SourceNotADirectory", f"source {source} is not a directory", retryable=False)
    check_checkpoint(source)
    files = [path for path in _files(source) if path.is_file()]
    total = sum(path.stat().st_size for path in files)
    _check_space(target.parent, total)
    done = 0
    progress(done, total)
    entries = []
    chunk_bytes = CHUNK_BYTES if max_bytes_per_s is None else max(4096, min(CHUNK_BYTES, max_bytes_per_s // 4))
    started_s = time.monotonic()
    for path in files:
        relative = path.relative_to(source)
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as reader, destination.open("wb") as writer:
                while chunk := reader.read(chunk_bytes):
                    writer.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    progress(done, total)
                    if max_bytes_per_s is not None:
                        time.sleep(max(0.0, started_s + done / max_bytes_per_s - time.monotonic()))
                    if time.monotonic() > deadline_s:
                        raise FillError("Timeout", f"the fill ran out of time after {done} bytes", retryable=True)
        except PermissionError as error:
            raise FillError("SourceUnreadable", str(error), retryable=False) from error
        entries.append({"path": str(relative), "bytes": destination.stat().st_size, "sha256": digest.hexdigest()})
    return entries


def _check_space(directory: pathlib.Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise FillError(
            "VolumeTooSmall",
            f"the checkpoint needs {needed} bytes but the volume has {free} free: raise spec.model.cache.size",
            retryable=False,
        )


# ----------------------------------------------------------------------------------------------------
# Downloading from the hub (needs network; never exercised by the offline tests)


def download_hub(
    repo_id: str,
    target: pathlib.Path,
    *,
    revision: str | None,
    retries: int,
    deadline_s: float,
    progress: Callable[[int, int], None],
) -> list[dict[str, Any]]:
    # Imported here: only the hub path needs it, and an offline copy should not pay for its import.
    import huggingface_hub  # noqa: PLC0415
    from huggingface_hub import errors as hub_errors  # noqa: PLC0415

    permanent = (
        hub_errors.RepositoryNotFoundError,
        hub_errors.GatedRepoError,
        hub_errors.RevisionNotFoundError,
        hub_errors.EntryNotFoundError,
        hub_errors.HFValidationError,
    )
    token = os.environ.get("HF_TOKEN") or None
    api = huggingface_hub.HfApi(token=token)
    try:
        info = _with_retries(
            lambda: api.model_info(repo_id, revision=revision, files_metadata=True),
            retries=retries,
            deadline_s=deadline_s,
            permanent=permanent,
        )
    except permanent as error:
        raise FillError(
            type(error).__name__.removesuffix("Error") or "HubError", str(error), retryable=False
        ) from error
    wanted = [
        sibling
        for sibling in info.siblings or []
        if any(fnmatch.fnmatch(pathlib.PurePosixPath(sibling.rfilename).name, p) for p in HUB_PATTERNS)
    ]
    if not any(sibling.rfilename.endswith(".safetensors") for sibling in wanted):
        raise FillError("NotACheckpoint", f"{repo_id} has no safetensors weights", retryable=False)
    total = sum(sibling.size or 0 for sibling in wanted)
    _check_space(target.parent, total)
    done = 0
    progress(done, total)
    for sibling in wanted:
        if time.monotonic() > deadline_s:
            raise FillError("Timeout", f"the download ran out of time after {done} bytes", retryable=True)
        try:
            _with_retries(
                functools.partial(
                    huggingface_hub.hf_hub_download,
                    repo_id,
                    sibling.rfilename,
                    revision=info.sha,
                    local_dir=target,
                    token=token,
                ),
                retries=retries,
                deadline_s=deadline_s,
                permanent=permanent,
            )
        except permanent as error:
            raise FillError("HubFileMissing", str(error), retryable=False) from error
        done += sibling.size or 0
        progress(done, total)
    shutil.rmtree(target / ".cache", ignore_errors=True)  # huggingface_hub's download bookkeeping
    return [
        {"path": str(path.relative_to(target)), "bytes": path.stat().st_size, "sha256": _sha256(path)}
        for path in _files(target)
    ]


def _with_retries(
    call: Callable[[], Any], *, retries: int, deadline_s: float, permanent: tuple[type[BaseException], ...]
) -> Any:
    delay_s = 2.0
    for attempt in range(retries + 1):
        try:
            return call()
        except permanent:
            raise
        except Exception as error:  # network and server errors: try again, then let the Job retry
            if attempt == retries or time.monotonic() + delay_s > deadline_s:
                raise FillError("DownloadFailed", f"{type(error).__name__}: {error}", retryable=True) from error
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 60.0)
    raise AssertionError("unreachable")


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The fill: stage, write the manifest, rename into place


def read_manifest(directory: pathlib.Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def is_local(source: str) -> bool:
    return source.startswith("/")


def fill(
    *, source: str, dest: pathlib.Path, revision: str | None, timeout_s: float, retries: int, reporter: Reporter
) -> dict[str, Any]:
    """Fill `dest` from `source` unless it already holds that source; returns the manifest."""
    existing = read_manifest(dest)
    if existing is not None and existing.get("source") == source and existing.get("revision") == revision:
        reporter.report("Ready", force=True, bytesDone=existing["bytesTotal"], bytesTotal=existing["bytesTotal"])
        return existing
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):  # left by an attempt that died
        shutil.rmtree(stale, ignore_errors=True)
    staging = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    staging.mkdir()
    deadline_s = time.monotonic() + timeout_s

    def progress(done: int, total: int) -> None:
        reporter.report("Filling", force=done == 0, bytesDone=done, bytesTotal=total)

    try:
        if is_local(source):
            limit = os.environ.get(ENV_MAX_BYTES_PER_S)
            files = copy_tree(
                pathlib.Path(source),
                staging,
                deadline_s=deadline_s,
                progress=progress,
                max_bytes_per_s=int(limit) if limit else None,
            )
        else:
            files = download_hub(
                source.removeprefix("hf://"),
                staging,
                revision=revision,
                retries=retries,
                deadline_s=deadline_s,
                progress=progress,
            )
            check_checkpoint(staging)
        manifest = {
            "source": source,
            "revision": revision,
            "bytesTotal": sum(entry["bytes"] for entry in files),
            "files": files,
            "completedAt": datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        # The rename is the commit: before it `dest` is absent (or the old checkpoint), after it complete.
        if dest.exists():
            retired = dest.parent / f".{dest.name}.retired-{os.getpid()}"
            dest.rename(retired)
            staging.rename(dest)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    reporter.report("Ready", force=True, bytesDone=manifest["bytesTotal"], bytesTotal=manifest["bytesTotal"])
    return manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fleetlm_runtime.models.fill", description=__doc__.split("\n")[0])
    parser.add_argument("--source", required=True, help="An absolute path (local or a mounted PVC), or a hub id.")
    parser.add_argument("--dest", required=True, type=pathlib.Path, help="The directory to fill (on the volume).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds this attempt may take.")
    parser.add_argument("--retries", type=int, default=3, help="Retries of each hub request.")
    parser.add_argument("--report-job", default=None, help="The Job whose annotation carries the progress.")
    parser.add_argument("--report-namespace", default=None, help="Its namespace (default: the pod's).")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def log(line: str) -> None:
        print(f"fleetlm-fill: {line}", file=sys.stderr, flush=True)

    reporter = Reporter(api_target(args.report_job, args.report_namespace, dict(os.environ)), log=log)
    log(f"filling {args.dest} from {args.source}")
    try:
        manifest = fill(
            source=args.source,
            dest=args.dest,
            revision=args.revision,
            timeout_s=args.timeout,
            retries=args.retries,
            reporter=reporter,
        )
    except FillError as error:
        kind = "retryable" if error.retryable else "permanent"
        reporter.report("Failed", force=True, reason=error.reason, message=str(error)[:2000], retryable=error.retryable)
        # The last line is also the pod's termination message (FallbackToLogsOnError).
        log(f"failed ({kind}): {error.reason}: {error}")
        return EXIT_RETRYABLE if error.retryable else EXIT_PERMANENT
    log(f"ready: {len(manifest['files'])} files, {manifest['bytesTotal']} bytes in {args.dest}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
