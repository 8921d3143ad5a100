"""llmray.procs on real processes: descendants, port holders, the reaper (Linux /proc)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmray import procs

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")

# A command that starts the reaper, then a grandchild (as Ray starts HAProxy from a worker),
# prints the grandchild's pid and waits to be killed.
COMMAND = """
import subprocess, sys, time
from llmray import procs
procs.start_reaper()
child = subprocess.Popen([sys.executable, "-c",
    "import subprocess, time; p = subprocess.Popen(['sleep', '300']); "
    "print(p.pid, flush=True); time.sleep(300)"],
    stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(300)
"""


def test_the_reaper_kills_what_a_killed_command_started() -> None:
    command = subprocess.Popen([sys.executable, "-c", COMMAND], stdout=subprocess.PIPE, text=True)
    grandchild = int(command.stdout.readline())
    assert grandchild in procs.descendants(command.pid)
    assert procs.name(grandchild) == "sleep"
    started = procs.start_time(grandchild)
    time.sleep(1.5)  # the reaper's next look at the tree (every SNAPSHOT_EVERY_S)
    command.send_signal(signal.SIGKILL)  # nothing of the command's own code runs any more
    command.wait()
    while procs.start_time(grandchild) == started:  # orphaned, until the reaper comes
        time.sleep(0.1)


def test_listeners_names_the_process_on_a_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert (os.getpid(), procs.name(os.getpid())) in procs.listeners(port)
    assert procs.listeners(port) == []
