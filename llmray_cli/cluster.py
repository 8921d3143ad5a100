"""`llmray operator`: the Kubernetes operator (the operator image's entrypoint)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="run the Kubernetes operator (KUBECONFIG or in-cluster)")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: all namespaces",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics (0: off)")
    p.add_argument("--health-port", type=int, default=8081, help="liveness /healthz (0: off)")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning"], default="info", help="default info"
    )
    p.set_defaults(func=run_operator)


def run_operator(args: argparse.Namespace) -> int:
    from llmray_operator.main import run

    run(
        args.namespace,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        verbose=args.verbose or args.log_level == "debug",
        quiet=args.log_level == "warning",
    )
    return 0
