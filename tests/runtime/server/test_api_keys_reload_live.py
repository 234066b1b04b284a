"""A rotated API-keys Secret applies without a restart and without dropping a request.

The key file is laid out as the kubelet mounts a Secret: `keys.yaml -> ..data/keys.yaml`, with `..data`
a symlink swapped atomically to a new timestamped directory on every update. A real `fleetlm-runtime`
process serves a stream through the swap; the new key works, the removed one is refused, an invalid
version is refused whole (the keys in force stay), and the process is the same one throughout.
"""

from __future__ import annotations

import json
import os
import pathlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from fleetlm_dev.testing import wait_for

QOS = {
    "classes": [{"name": "gold", "priority": 0}, {"name": "silver", "priority": 1}],
    "defaultClass": "gold",
    "requireApiKey": True,
}


def _publish(secret_dir: pathlib.Path, version: int, text: str) -> None:
    """What the kubelet does on a Secret update: a new directory, then one atomic symlink swap."""
    new = secret_dir / f"..{version}"
    new.mkdir()
    (new / "keys.yaml").write_text(text)
    tmp_link = secret_dir / "..data_tmp"
    tmp_link.symlink_to(new.name)
    os.replace(tmp_link, secret_dir / "..data")


def _status(url: str, key: str, body: dict[str, Any] | None = None) -> int:
    data = json.dumps(body or {"model": "tiny", "prompt": "x", "max_tokens": 1}).encode()
    request = urllib.request.Request(
        url + "/v1/completions",
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_rotated_keys_apply_live_without_dropping_requests(
    tmp_path: pathlib.Path, start_runtime: Callable[..., Any], process_config: Callable[..., dict[str, Any]]
) -> None:
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    _publish(secret_dir, 1, "old-key: gold\n")
    (secret_dir / "keys.yaml").symlink_to("..data/keys.yaml")
    qos = {**QOS, "apiKeysFile": str(secret_dir / "keys.yaml")}
    runtime = start_runtime(process_config(qos=qos))
    runtime.wait_ready()
    pid = runtime.proc.pid
    assert _status(runtime.url, "old-key") == 200
    assert _status(runtime.url, "new-key") == 401

    # A long stream under the old key runs across the rotation.
    outcome: dict[str, Any] = {}

    def stream() -> None:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}
        request = urllib.request.Request(
            runtime.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": "Bearer old-key", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as resp:
            outcome["status"] = resp.status
            outcome["body"] = resp.read().decode()

    streamer = threading.Thread(target=stream)
    streamer.start()
    _publish(secret_dir, 2, "new-key: silver\n")
    wait_for("the new key to be accepted", lambda: _status(runtime.url, "new-key") == 200, timeout_s=20)
    assert _status(runtime.url, "old-key") == 401
    streamer.join(timeout=60)
    assert outcome["status"] == 200 and outcome["body"].rstrip().endswith("data: [DONE]")
    assert '"finish_reason":"length"' in outcome["body"]  # it ran to the end: nothing was dropped

    # An invalid version (an unknown class) is refused whole: the keys in force stay.
    _publish(secret_dir, 3, "new-key: platinum\nthird-key: gold\n")
    wait_for("the refusal to be logged", lambda: "invalid; keeping the 1 keys in force" in runtime.log(), timeout_s=20)
    time.sleep(0.5)
    assert _status(runtime.url, "new-key") == 200
    assert _status(runtime.url, "third-key") == 401
    assert runtime.proc.pid == pid and runtime.proc.poll() is None  # never restarted
