"""The Ray that local commands (`llmray finetune`, `llmray serve`) run on."""

from __future__ import annotations

import logging
import os


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of a RayJob (RAY_ADDRESS) or start an embedded local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    # Ray's ports listen on this machine's address, not only loopback: keep Ray 2.60's token
    # authentication (its default; one warning at start) so other hosts cannot submit work.
    # The dashboard stays on loopback; Ray Train's placement-group cleaner needs its state API
    # (without it, it warns every few seconds) and users get a local view of the run.
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )
