"""`llmray serve FILE.yaml`: the LLMDeployment on a local Ray Serve, until Ctrl-C.

It deploys what a RayService's serveConfigV2 holds (llmray.serve_args.serve_application)
through Serve's declarative API, as KubeRay does, and then watches FILE (and the status of
each FineTuneJob its adapters reference): when one changes on disk, or on SIGHUP, it reads
them again and deploys the result. When only the adapters changed, Serve sees the same code
version and hands the replicas the new user_config through `reconfigure`: no replica restarts
and requests in flight finish. Any other change restarts the replicas, as on Kubernetes. A
file that no longer validates is reported and the running deployment is left as it is.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmray import paths, procs
from llmray.adapters import evaluation_gate, referenced_jobs, resolve_adapters
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.loader import load_resource
from llmray.serve_args import (
    API_KEY_ENV,
    ServeArgs,
    ServeUserConfig,
    resolve_serve_args,
    serve_application,
)

log = logging.getLogger("llmray.serve")

POLL_S = 1.0  # how often FILE and the referenced jobs' status.json are looked at
READY_TIMEOUT_S = 600.0  # a cold start of a 135M model takes ~27 s on 2 cores


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


@dataclass(frozen=True)
class LocalDeployment:
    """FILE resolved on this machine: the application's args, its adapters (user_config),
    and the files whose change means reading it again."""

    args: ServeArgs
    user_config: ServeUserConfig
    watched: tuple[Path, ...]


def local_deployment(path: Path) -> LocalDeployment:
    dep = load_resource(path, kind="LLMDeployment")
    assert isinstance(dep, LLMDeployment)
    model_uri = local_model_uri(dep)
    base_dir = str(path.parent.resolve())
    args = resolve_serve_args(
        dep,
        model_uri=model_uri,
        base_dir=base_dir,
        cache_dir=str(paths.cache_dir()),
        num_cpus=0,
    )
    if args.api_key_env and not os.environ.get(API_KEY_ENV):
        raise ModelNotReady(
            f"spec.apiKeySecretRef: locally the key comes from ${API_KEY_ENV}; export it first"
        )
    jobs = referenced_jobs(dep)
    adapters = resolve_adapters(dep, {j: paths.job_status(j) for j in jobs}, model_uri, base_dir)
    # One machine: replicas take no CPU reservation (they share the cores with everything).
    args = args.model_copy(update={"min_replicas": 1, "max_replicas": 1})
    watched = (path, *(paths.job_dir(j) / "status.json" for j in jobs))
    return LocalDeployment(args, ServeUserConfig(adapters=adapters), watched)


def local_args(path: Path) -> ServeArgs:
    return local_deployment(path).args


def replica_env() -> dict[str, str]:
    """Local replicas reserve no CPU (num_cpus 0), and Ray then starts them with
    OMP_NUM_THREADS=1: torch would use one core of the machine. Give them all of them.
    The API key is not put here: a runtime_env is stored in Ray's GCS and shown by its
    dashboard and state API. The replicas inherit it from this process's environment (which
    local_deployment checked), as the Ray started here inherits it."""
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count() or 1)}


def serve_config(args: ServeArgs, user_config: ServeUserConfig | None = None) -> dict[str, Any]:
    """The Serve config `llmray serve` deploys: serveConfigV2's application, plus the local
    replicas' environment."""
    app = serve_application(args, user_config)
    app["runtime_env"] = {"env_vars": replica_env()}
    return {"applications": [app]}


def deploy(args: ServeArgs, user_config: ServeUserConfig | None = None) -> None:
    """Apply the config through Serve's declarative API (what the dashboard's PUT
    /api/serve/applications/, and so KubeRay, calls); `serve.run` would give the deployment a
    new random version each time, restarting its replicas even when only user_config changed."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(serve_config(args, user_config))
    _get_global_client().deploy_apps(config)


def wait_running(name: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until application `name` runs; its deploy error, if it failed."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise CannotServe(f"the deployment failed: {app.message}")
        time.sleep(0.2)
    raise CannotServe(f"the deployment was not running after {timeout_s:g} s")


def start(
    args: ServeArgs,
    port: int,
    host: str = "127.0.0.1",
    user_config: ServeUserConfig | None = None,
) -> str:
    """Deploy and return the OpenAI base URL once the replica answers."""
    from ray import serve

    from llmray.localray import ensure_ray

    check_port(host, port)
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    deploy(args, user_config)
    wait_running(args.name)
    return f"http://{host}:{port}/v1"


def fingerprint(files: tuple[Path, ...]) -> tuple[float | None, ...]:
    """The files' modification times (None: missing): a change means reading FILE again."""
    return tuple(f.stat().st_mtime_ns if f.exists() else None for f in files)


def reload(path: Path, running: LocalDeployment) -> LocalDeployment:
    """Read FILE again and deploy what changed; the running deployment when it cannot."""
    try:
        new = local_deployment(path)
    except (CannotServe, ValueError) as exc:  # SpecError is one: an edit half saved, a bad field
        print(f"{path} not applied, still serving the previous spec: {exc}", flush=True)
        return running
    if new.args == running.args and new.user_config == running.user_config:
        return new
    deploy(new.args, new.user_config)
    if new.args == running.args:  # adapters only: reconfigured in place
        ready = [a.name for a in new.user_config.adapters if a.ready]
        waiting = [f"{a.name} ({a.reason})" for a in new.user_config.adapters if not a.ready]
        print(
            f"adapters updated in place: ready {', '.join(ready) or 'none'}"
            + (f"; not ready {', '.join(waiting)}" if waiting else ""),
            flush=True,
        )
    else:
        print("the spec changed beyond its adapters: the replicas restart", flush=True)
        wait_running(new.args.name)
    return new


def serve_file(path: str | Path, port: int = 8000) -> None:
    from ray import serve

    path = Path(path)
    running = local_deployment(path)
    endpoint = start(running.args, port, user_config=running.user_config)
    # Ray's start replaces the SIGINT handler of this process (Ctrl-C was ignored): take it
    # back, and treat SIGTERM the same, so both shut the application down cleanly. SIGHUP
    # reads FILE again (as daemons do), whether or not it changed.
    stop, again = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: again.set())
    args = running.args
    print(
        f"serving {args.served_name!r} ({args.model_uri}) at {endpoint}  (Ctrl-C stops; "
        f"edits to {path.name} apply live)",
        flush=True,
    )
    seen = fingerprint(running.watched)
    while not stop.wait(POLL_S):
        now = fingerprint(running.watched)
        if again.is_set() or now != seen:
            again.clear()
            running = reload(path, running)
            seen = fingerprint(running.watched)
    print("shutting down", flush=True)
    serve.shutdown()
