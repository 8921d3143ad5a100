"""`llmray up` / `llmray down` and ensure_ray joining the head they keep (llmray.localray)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmray import localray, procs
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# A fresh driver: ensure_ray, then a task; prints where it ran and whether it started a reaper.
DRIVER = """
import json, ray
from llmray import localray, procs
localray.ensure_ray(num_cpus=1)
print("RESULT " + json.dumps({
    "gcs": ray.get_runtime_context().gcs_address,
    "task": ray.get(ray.remote(lambda: 6 * 7).remote()),
    "reaper": procs._reaper is not None,
}), flush=True)
"""


def llmray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmray_cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )


def driver(home: Path | None = None) -> dict:
    env = {**os.environ, "LLMRAY_HOME": str(home)} if home is not None else None
    done = subprocess.run(
        [sys.executable, "-c", DRIVER],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind((localray.LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private LLMRAY_HOME; whatever head a test started there is ended, pass or fail."""
    monkeypatch.setenv("LLMRAY_HOME", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    markers: set[str] = set()
    original = localray.start_head

    def start_head(*args, **kwargs):  # the markers of heads started in this process
        head = original(*args, **kwargs)
        markers.add(head["marker"])
        return head

    monkeypatch.setattr(localray, "start_head", start_head)
    try:
        yield tmp_path
    finally:
        head = localray.recorded_head()
        if head is not None:
            markers.add(head.get("marker", ""))
        for marker in markers:
            localray.stop_processes(marker)


def test_no_head_recorded(home: Path) -> None:
    assert localray.live_head() is None
    done = llmray("down")
    assert done.returncode == 0, done.stderr
    assert "no local Ray is up" in done.stdout


def test_a_stale_record_is_removed(home: Path) -> None:
    localray.head_file().write_text(
        json.dumps({"address": f"{localray.LOOPBACK}:{closed_port()}", "marker": "gone"})
    )
    assert localray.live_head() is None
    assert not localray.head_file().exists()


def test_a_broken_record_is_no_head(home: Path) -> None:
    localray.head_file().write_text("{not json")
    assert localray.recorded_head() is None
    assert localray.live_head() is None


def test_up_rejects_zero_cpus(home: Path) -> None:
    done = llmray("up", "--num-cpus", "0")
    assert done.returncode == 2
    assert "--num-cpus" in done.stderr
    assert not localray.head_file().exists()


def test_processes_by_environment_marker_are_ended() -> None:
    env = {**os.environ, localray.MARKER_ENV: "test-marker-1"}
    # A child and its grandchild inherit the marker; a process without it is left alone.
    marked = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '300'])"], env=env
    )
    other = subprocess.Popen(["sleep", "300"])
    try:
        for _ in range(50):
            found = procs.with_environ(localray.MARKER_ENV, "test-marker-1")
            if len(found) == 2:
                break
            time.sleep(0.1)
        assert marked.pid in found and other.pid not in found and len(found) == 2
        procs.terminate(found, grace_s=2)
        assert marked.wait(timeout=10) is not None
        assert procs.with_environ(localray.MARKER_ENV, "test-marker-1") == []
        assert other.poll() is None
    finally:
        for p in (marked, other):
            p.kill()
            p.wait()


@pytest.mark.integration
def test_up_then_a_driver_joins_then_down(home: Path) -> None:
    done = llmray("up", "--num-cpus", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "llmray down" in done.stdout
    head = json.loads(localray.head_file().read_text())
    assert head["address"].startswith(localray.LOOPBACK + ":")
    assert head["env"]["RAY_AUTH_MODE"] == "token"

    again = llmray("up")
    assert again.returncode == 0
    assert f"already up at {head['address']}" in again.stdout

    joined = driver()
    assert joined == {"gcs": head["address"], "task": 42, "reaper": False}
    # The driver's exit leaves the head up (no reaper): a second one joins it too.
    assert localray.live_head() == head
    assert driver()["gcs"] == head["address"]
    # Another LLMRAY_HOME, no head recorded: an embedded Ray, not the machine's last `ray start`.
    other = driver(home / "other")
    assert other["gcs"] != head["address"] and other["reaper"]

    down = llmray("down")
    assert down.returncode == 0, down.stderr
    assert f"at {head['address']} stopped" in down.stdout
    assert not localray.head_file().exists()
    assert procs.with_environ(localray.MARKER_ENV, head["marker"]) == []
    assert localray.live_head() is None
    from ray._private.utils import read_ray_address

    assert read_ray_address() != head["address"]  # as `ray stop` removes it


@pytest.mark.integration
def test_a_stale_record_falls_back_to_an_embedded_ray(home: Path) -> None:
    stale = f"{localray.LOOPBACK}:{closed_port()}"
    localray.head_file().write_text(json.dumps({"address": stale, "marker": "gone"}))
    ran = driver()
    assert ran["task"] == 42
    assert ran["gcs"] != stale
    assert ran["reaper"]  # an embedded Ray, ended with its command
    assert not localray.head_file().exists()
