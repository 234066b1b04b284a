"""The build cache is trusted only when complete: a damaged or half-written cache is detected."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

from fleetlm_dev import k8s_build


@pytest.fixture
def cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.setenv("FLEETLM_CACHE", str(tmp_path))
    bin_dir = tmp_path / "k8s" / "v1.99.0" / "bin"
    bin_dir.mkdir(parents=True)
    records = []
    for name in ("kube-apiserver", "etcd"):
        path = bin_dir / name
        path.write_bytes(name.encode() * 100)
        records.append(
            {
                "name": name,
                "size_bytes": path.stat().st_size,
                "sha256": k8s_build._sha256(path),
                "version": f"{name} v1.99.0",
            }
        )
    (bin_dir / k8s_build.MANIFEST_NAME).write_text(
        json.dumps({"recipe_version": k8s_build.RECIPE_VERSION, "binaries": records})
    )
    return bin_dir


def test_a_complete_cache_is_used(cache: pathlib.Path) -> None:
    toolset = k8s_build.load_complete("v1.99.0")
    assert toolset is not None
    assert toolset.path("etcd") == cache / "etcd"


def test_a_cache_without_manifest_is_incomplete(cache: pathlib.Path) -> None:
    (cache / k8s_build.MANIFEST_NAME).unlink()
    assert k8s_build.load_complete("v1.99.0") is None


def test_a_truncated_binary_is_detected(cache: pathlib.Path) -> None:
    with (cache / "etcd").open("r+b") as handle:
        handle.truncate(10)
    assert k8s_build.load_complete("v1.99.0") is None


def test_a_modified_binary_is_detected(cache: pathlib.Path) -> None:
    data = bytearray((cache / "etcd").read_bytes())
    data[0] ^= 0xFF
    (cache / "etcd").write_bytes(bytes(data))
    assert k8s_build.load_complete("v1.99.0") is None


def test_a_cache_from_an_older_recipe_is_rebuilt(cache: pathlib.Path) -> None:
    manifest = json.loads((cache / k8s_build.MANIFEST_NAME).read_text())
    manifest["recipe_version"] = k8s_build.RECIPE_VERSION - 1
    (cache / k8s_build.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert k8s_build.load_complete("v1.99.0") is None


def test_a_missing_binary_is_detected(cache: pathlib.Path) -> None:
    (cache / "kube-apiserver").unlink()
    assert k8s_build.load_complete("v1.99.0") is None


def test_a_garbled_manifest_is_incomplete(cache: pathlib.Path) -> None:
    (cache / k8s_build.MANIFEST_NAME).write_text("{not json")
    assert k8s_build.load_complete("v1.99.0") is None
    shutil.rmtree(cache)
    assert k8s_build.load_complete("v1.99.0") is None


def test_staging_tag_follows_the_release() -> None:
    assert k8s_build._staging_version("v1.37.2") == "v0.37.2"
    with pytest.raises(ValueError, match="k8s_version"):
        k8s_build._staging_version("1.37")


def test_a_second_builder_waits_and_uses_the_first_ones_build(
    cache: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds at once (make beside a test session) must not delete each other's half-built binaries:
    the second waits on the lock, then finds the first one's cache complete and builds nothing."""
    import fcntl
    import threading

    manifest = (cache / k8s_build.MANIFEST_NAME).read_text()
    (cache / k8s_build.MANIFEST_NAME).unlink()  # "not built yet"
    builds: list[str] = []
    monkeypatch.setattr(k8s_build, "_build_locked", lambda version, root: builds.append(version))
    monkeypatch.setattr(k8s_build.shutil, "which", lambda name: "/usr/bin/go")
    result: list[object] = []
    with (cache.parent / "build.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the first builder, mid-build
        waiter = threading.Thread(target=lambda: result.append(k8s_build.build("v1.99.0")))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive(), "the second builder did not wait for the lock"
        (cache / k8s_build.MANIFEST_NAME).write_text(manifest)  # the first builder finishes
    waiter.join(timeout=10)
    assert not waiter.is_alive()
    assert builds == [] and isinstance(result[0], k8s_build.Toolset)
