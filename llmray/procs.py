"""The processes of a local command, from Linux's /proc: who listens on a port, and a reaper
that ends every process a command started once the command is gone, however it ended.

A local Ray is a tree of processes (GCS, raylet, workers, agents, and the HAProxy that Ray
Serve's HAProxyManager actor starts). A `llmray serve` stopped with SIGKILL cannot stop them:
its GCS and raylet share its fate, but HAProxy (a child of a worker) and Ray's dashboard and
runtime-env agents were left running, reparented to init, HAProxy still listening on the
serve port. So `ensure_ray` starts a reaper beside the command:

    python -m llmray.procs PID     (stdin: a pipe from the command; its own session)

It notes the command's descendants every second and, when the pipe closes (the command
exited or was killed), kills those still running. Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

PROC = Path("/proc")
SNAPSHOT_EVERY_S = 1.0  # a scan of /proc: a few ms of one core


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a process, or None if it is gone."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), int(fields[19])


def is_running(pid: int, started: int | None) -> bool:
    """Whether the process that started at `started` still runs (not gone, not a zombie
    waiting for its parent, not a new process under a reused pid)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] != "Z" and int(fields[19]) == started


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), None if it is gone."""
    stat = _stat(pid)
    return None if stat is None else stat[1]


def name(pid: int) -> str | None:
    try:
        return (PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return None


def with_command_prefix(prefix: str) -> list[int]:
    """The processes whose command line starts with `prefix` (e.g. Ray's process titles such
    as "ray::RayTrainWorker.run_train_fn"), this one excepted."""
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not ours to read
            continue
        if command.startswith(prefix):
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> dict[int, int]:
    """Every process below `pid`: {pid: start time} (the start time tells a reused pid)."""
    children: dict[int, list[int]] = {}
    started: dict[int, int] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
            started[int(entry.name)] = stat[1]
    found: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child not in found and child in started:
            found[child] = started[child]
            todo.extend(children.get(child, []))
    return found


def listeners(port: int) -> list[tuple[int, str]]:
    """The processes with a TCP socket listening on `port`: [(pid, command name)] (those of
    this user, or all as root; empty where /proc cannot tell)."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address HEX_IP:HEX_PORT, state 0A = LISTEN, inode
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                inodes.add(f"socket:[{fields[9]}]")
    owners = []
    for entry in PROC.iterdir() if inodes else ():
        if not entry.name.isdigit():
            continue
        try:
            fds = list((entry / "fd").iterdir())
            name = (entry / "comm").read_text().strip()
        except OSError:  # gone, or not ours to read
            continue
        if any(_link(fd) in inodes for fd in fds):
            owners.append((int(entry.name), name))
    return owners


def with_environ(name: str, value: str) -> list[int]:
    """The processes whose environment holds NAME=VALUE, this one excepted (those of this
    user, or all as root): what a process started with it and every descendant inherited."""
    wanted = f"{name}={value}".encode()
    found = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        if wanted in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def terminate(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what still runs after `grace_s` (measured: a head's raylet takes
    ~10 s to go on SIGTERM, its GCS and autoscaler monitor never do; zombies count as gone)."""
    started = {pid: start_time(pid) for pid in pids}
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (alive := [p for p in pids if is_running(p, started[p])]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # closed since listed
        return None


def start_reaper() -> None:
    """Start the reaper of this process's descendants (Linux; once per process)."""
    global _reaper
    if _reaper is not None or not PROC.joinpath("self", "stat").exists():
        return
    # Its own session: a Ctrl-C in the terminal reaches the command, not the reaper. Its stdin
    # is the pipe whose end tells it that this process is gone.
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "llmray.procs", str(os.getpid())],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )


_reaper: subprocess.Popen | None = None


def reap(parent: int) -> None:
    """The reaper's loop: note `parent`'s descendants until stdin closes, then kill them."""
    import select

    seen: dict[int, int] = {}
    while not select.select([sys.stdin], [], [], SNAPSHOT_EVERY_S)[0]:
        seen.update(descendants(parent))
    seen.update(descendants(parent))  # an exit ends the pipe before its children go
    for pid, started in seen.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started and pid != os.getpid():
            with contextlib.suppress(OSError):  # gone since
                os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    reap(int(sys.argv[1]))
