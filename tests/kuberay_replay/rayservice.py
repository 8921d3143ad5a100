"""KubeRay 1.7's RayService controller replayed on this machine.

    a pending RayCluster from rayClusterConfig (status.pendingServiceStatus.rayClusterName)
    serveConfigV2 (YAML) -> JSON -> PUT /api/serve/applications/ on its dashboard, with the
        token in x-ray-authorization, as KubeRay's dashboard client sends it
    GET /api/serve/applications/ until every application is RUNNING: the cluster becomes the
        active one, the Serve endpoint answers /-/healthz -> numServeEndpoints, and the
        conditions Ready=True (NonZeroServeEndpoints), UpgradeInProgress=False
        (NoPendingCluster), serviceStatus Running
    a serveConfigV2 change later: PUT again to the running cluster (KubeRay's in-place update)

Status is written as calculateStatus in rayservice_controller.go writes it, on every change.
One machine, not a cluster: Ray Serve's proxy runs on the head only and listens on a free port
of 127.0.0.1 (several raylets share one address here, so only one of them can own the serve
port; on Kubernetes every pod has its own port 8000 behind <name>-serve-svc). Those two
settings (`proxy_location: HeadOnly`, `http_options.host/port`) are added to what is PUT;
the applications are sent exactly as serveConfigV2 has them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.kuberay_replay.nodes import RayCluster, free_port
from tests.kuberay_replay.rayjob import new_token, random_suffix, utcnow

POLL_SECONDS = 1.0
StatusWriter = Callable[[dict[str, Any]], None]


class ServeDeployFailed(RuntimeError):
    """An application reached DEPLOY_FAILED (its message says why)."""


class RayServiceReplay:
    def __init__(
        self,
        ray_service: dict[str, Any],
        *,
        workdir: Path,
        secrets: dict[str, dict[str, str]] | None = None,
        config_maps: dict[str, dict[str, str]] | None = None,
        write_status: StatusWriter | None = None,
        now: Callable[[], str] = utcnow,
    ) -> None:
        self.ray_service = ray_service
        self.name = ray_service["metadata"]["name"]
        self.namespace = ray_service["metadata"].get("namespace") or "default"
        self.generation = ray_service["metadata"].get("generation", 1)
        self.workdir = workdir
        self.secrets = dict(secrets or {})
        self.config_maps = dict(config_maps or {})
        self.write_status = write_status or (lambda _: None)
        self.now = now
        self.serve_port = free_port()
        self.cluster: RayCluster | None = None
        self.status: dict[str, Any] = {}

    @property
    def endpoint(self) -> str:
        """What <name>-serve-svc:8000 is on a cluster."""
        return f"http://127.0.0.1:{self.serve_port}"

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 600) -> dict[str, Any]:
        """Bring the service up; return its status once Ready (raise if an app failed)."""
        deadline = time.monotonic() + timeout
        cluster_name = f"{self.name}-raycluster-{random_suffix()}"
        self._conditions(
            ("Ready", "False", "Initializing", "RayService is initializing"),
            ("UpgradeInProgress", "False", "Initializing", "RayService is initializing"),
        )
        self.status.update(
            observedGeneration=self.generation,
            pendingServiceStatus={"rayClusterName": cluster_name},
            activeServiceStatus={},
            serviceStatus="NotRunning",
            numServeEndpoints=0,
        )
        self._write()
        self.cluster = RayCluster(
            self.ray_service["spec"]["rayClusterConfig"],
            name=cluster_name,
            namespace=self.namespace,
            workdir=self.workdir / cluster_name,
            token=new_token(),
            secrets=self.secrets,
            config_maps=self.config_maps,
            service=True,
            pvc_dir=self.workdir / "pvc",
            # A stopping replica need not drain for 30 s: no load balancer to notice here.
            node_env={"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"},
        )
        self.cluster.start(timeout=max(30, deadline - time.monotonic()))
        self._put_config(self.ray_service)
        self._wait_running("pendingServiceStatus", deadline)
        # Traffic switched to the new cluster: it is the active one now.
        self.status["activeServiceStatus"] = {
            **self.status["pendingServiceStatus"],
            "rayClusterName": cluster_name,
        }
        self.status["pendingServiceStatus"] = {}
        while not self._serve_healthy():
            if time.monotonic() > deadline:
                raise TimeoutError(f"RayService {self.name}: {self.endpoint}/-/healthz never OK")
            time.sleep(POLL_SECONDS)
        self.status["numServeEndpoints"] = 1
        self._conditions(
            (
                "Ready",
                "True",
                "NonZeroServeEndpoints",
                "Number of serve endpoints is greater than 0",
            ),
            (
                "UpgradeInProgress",
                "False",
                "NoPendingCluster",
                "Active Ray cluster exists and no pending Ray cluster",
            ),
        )
        self.status["serviceStatus"] = "Running"
        self._write()
        return dict(self.status)

    def update(self, ray_service: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
        """A new serveConfigV2 (same rayClusterConfig): applied in place, as KubeRay does."""
        old = self.ray_service["spec"]["rayClusterConfig"]
        if ray_service["spec"]["rayClusterConfig"] != old:
            raise NotImplementedError("a rayClusterConfig change (a new cluster) is not replayed")
        self.ray_service = ray_service
        self.generation = ray_service["metadata"].get("generation", self.generation)
        self.status["observedGeneration"] = self.generation
        self._put_config(ray_service)
        self._wait_running("activeServiceStatus", time.monotonic() + timeout)
        return dict(self.status)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None

    def __enter__(self) -> RayServiceReplay:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- Serve's REST API ---------------------------------------------------------------

    def _put_config(self, ray_service: dict[str, Any]) -> None:
        config = yaml.safe_load(ray_service["spec"]["serveConfigV2"])
        config["proxy_location"] = "HeadOnly"
        config["http_options"] = {
            **(config.get("http_options") or {}),
            "host": "127.0.0.1",
            "port": self.serve_port,
        }
        assert self.cluster is not None
        response = self.cluster.put("/api/serve/applications/", config)
        if response.status_code != 200:
            raise RuntimeError(
                f"PUT /api/serve/applications/: {response.status_code} {response.text}"
            )

    def _wait_running(self, which: str, deadline: float) -> None:
        assert self.cluster is not None
        names = [
            app["name"]
            for app in yaml.safe_load(self.ray_service["spec"]["serveConfigV2"])["applications"]
        ]
        while True:
            apps = self._applications()
            if apps is not None:
                statuses = {name: _app_status(apps.get(name)) for name in names}
                if statuses != self.status[which].get("applicationStatuses"):
                    self.status[which]["applicationStatuses"] = statuses
                    self._write()
                failed = {n: s for n, s in statuses.items() if s["status"] == "DEPLOY_FAILED"}
                if failed:
                    raise ServeDeployFailed(
                        "; ".join(f"{n}: {s['message']}" for n, s in failed.items())
                    )
                if all(s["status"] == "RUNNING" for s in statuses.values()):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"RayService {self.name}: applications not RUNNING: {apps}")
            time.sleep(POLL_SECONDS)

    def _applications(self) -> dict[str, Any] | None:
        assert self.cluster is not None
        try:
            response = self.cluster.get("/api/serve/applications/")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return response.json().get("applications") or {}

    def _serve_healthy(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/-/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    # --- status -----------------------------------------------------------------------

    def _conditions(self, *wanted: tuple[str, str, str, str]) -> None:
        """meta.SetStatusCondition: lastTransitionTime moves only when the status does."""
        before = {c["type"]: c for c in self.status.get("conditions", [])}
        out = []
        for type_, status, reason, message in wanted:
            old = before.get(type_)
            moved = old is None or old["status"] != status
            out.append(
                {
                    "type": type_,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": self.now() if moved else old["lastTransitionTime"],
                    "observedGeneration": self.generation,
                }
            )
        self.status["conditions"] = out

    def _write(self) -> None:
        self.status["lastUpdateTime"] = self.now()
        self.write_status(dict(self.status))


def _app_status(app: dict[str, Any] | None) -> dict[str, Any]:
    """Serve's application status as KubeRay copies it into applicationStatuses."""
    if app is None:
        return {"status": "NOT_STARTED", "message": ""}
    return {
        "status": app.get("status", ""),
        "message": app.get("message", ""),
        "serveDeploymentStatuses": {
            name: {"status": dep.get("status", ""), "message": dep.get("message", "")}
            for name, dep in (app.get("deployments") or {}).items()
        },
    }
