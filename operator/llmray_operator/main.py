"""`llmray operator`: run the operator (in the operator image, or against any KUBECONFIG)."""

from __future__ import annotations

import logging
import threading


def run(
    namespaces: list[str],
    *,
    metrics_port: int = 8080,
    health_port: int = 8081,
    verbose: bool = False,
    quiet: bool = False,
    stop_flag: threading.Event | None = None,
) -> None:
    import kopf
    from prometheus_client import start_http_server

    import llmray_operator.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=verbose, quiet=quiet, log_prefix=True)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.getLogger("llmray").setLevel(level)
    if metrics_port:
        start_http_server(metrics_port)
    kopf.run(
        # One replica: no peering objects (the chart runs a single pod, Recreate strategy).
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=f"http://0.0.0.0:{health_port}/healthz" if health_port else None,
        stop_flag=stop_flag,
    )
