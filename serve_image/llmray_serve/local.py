"""`llmray serve FILE.yaml`: the LLMDeployment on a local Ray Serve, until Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

from llmray import paths, procs
from llmray.adapters import evaluation_gate
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.loader import load_resource
from llmray.serve_args import API_KEY_ENV, ServeArgs, resolve_serve_args

log = logging.getLogger("llmray.serve")


class CannotServe(RuntimeError):
    """Something the user fixes before `llmray serve` can start (printed without traceback)."""


class ModelNotReady(CannotServe):
    """model.fineTuneJobRef names a job that has not (successfully) run here."""


class PortBusy(CannotServe):
    """Another process listens on the port."""


def check_port(host: str, port: int) -> None:
    """Fail now, naming the port and its holder, rather than after Ray started (HAProxy's
    "Some protocols failed to start" and a reload traceback)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            s.bind((host, port))
        except OSError as exc:
            holders = ", ".join(f"{name} (pid {pid})" for pid, name in procs.listeners(port))
            raise PortBusy(
                f"port {port} on {host} is in use by {holders or 'another process'} "
                f"({exc.strerror}): stop it or choose another --port"
            ) from exc


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
    gate = evaluation_gate(ref.name, dep.spec.model.minEvaluation, status.get("evaluation"))
    if gate is not None:
        raise ModelNotReady(f"spec.model.minEvaluation: {gate[0]}: {gate[1]}")
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


def start(args: ServeArgs, port: int, host: str = "127.0.0.1") -> str:
    """Deploy and return the OpenAI base URL once the replica answers."""
    from ray import serve

    from llmray.localray import ensure_ray
    from llmray_serve.app import application

    check_port(host, port)
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    # Local replicas reserve no CPU (num_cpus 0), and Ray then starts them with
    # OMP_NUM_THREADS=1: torch would use one core of the machine. Give them all of them.
    # The API key is not put here: a runtime_env is stored in Ray's GCS and shown by its
    # dashboard and state API. The replicas inherit it from this process's environment (which
    # local_args checked), as the Ray started here inherits it.
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)}
    serve.run(application(args, env), name=args.name, route_prefix="/", blocking=False)
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
