"""`llmray serve FILE.yaml`: the LLMDeployment on a local Ray Serve, until Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from llmray import paths
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.loader import load_resource
from llmray.serve_args import API_KEY_ENV, ServeArgs, resolve_serve_args

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


def start(args: ServeArgs, port: int, host: str = "127.0.0.1") -> str:
    """Deploy and return the OpenAI base URL once the replica answers."""
    from ray import serve

    from llmray.localray import ensure_ray
    from llmray_serve.app import build_app

    ensure_ray()
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
