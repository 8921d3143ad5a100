"""The training pods' preStop hook (llmray_trainer/prestop.py) on real processes: it sends
SIGTERM to the processes titled as Ray Train workers and waits while they checkpoint, up to
its timeout. The stand-in workers carry a title of their own, so no other Ray on this machine
is touched."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from llmray_trainer.prestop import stop_workers, train_workers

# A worker that takes SIGTERM as a request: it "checkpoints" for a second, then exits.
CHECKPOINTS = """
import signal, sys, time
def stop(*_):
    time.sleep(1.0)
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""
IGNORES = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


def worker(title: str, code: str, *args: str) -> subprocess.Popen:
    # exec -a: the process's command line starts with `title`, as Ray's process titles do.
    proc = subprocess.Popen(
        ["bash", "-c", f'exec -a "{title}" "{sys.executable}" -c "$0" "$@"', code, *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_prestop_waits_until_the_workers_checkpointed_and_exited(tmp_path: Path):
    title = f"ray::RayTrainWorker-test-{uuid.uuid4().hex}"
    saved = [tmp_path / f"saved-{i}" for i in range(2)]
    procs = [worker(f"{title}.run_train_fn", CHECKPOINTS, str(path)) for path in saved]
    try:
        assert sorted(train_workers(title)) == sorted(p.pid for p in procs)
        assert stop_workers(timeout=30, poll=0.1, title=title) == []
        assert [path.read_text() for path in saved] == ["saved", "saved"]
        assert [p.wait(5) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()


def test_prestop_gives_up_at_its_timeout(tmp_path: Path):
    title = f"ray::RayTrainWorker-test-{uuid.uuid4().hex}"
    proc = worker(title, IGNORES)
    try:
        assert stop_workers(timeout=0.5, poll=0.1, title=title) == [proc.pid]
        assert proc.poll() is None  # the kubelet's SIGKILL at the grace period's end does it
    finally:
        proc.kill()
        proc.wait()
