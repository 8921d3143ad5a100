"""A RayCluster's pods as Ray nodes on this machine: one `ray start --block` process per pod,
as Ray's own multi-node tests run several raylets on one host.

Each pod gets:
- its `ray start` parameters as KubeRay completes them (pods.py), with every listening port
  replaced by a free one (pods have a network namespace each; here they share one), the
  node bound to 127.0.0.1, and an object store sized as Ray sizes it in a pod (30% of the
  container's memory limit, which Ray reads from the cgroup there);
- its container environment, KubeRay's additions and the token of `authOptions`;
- its volumes under a root of its own ($LLMRAY_POD_ROOT, see llmray.paths.pod_path):
  ConfigMap and Secret files, a fresh emptyDir, a PersistentVolumeClaim as a link to one
  folder per claim that every pod shares (ReadWriteMany). The `/dev/shm` emptyDir is this
  machine's /dev/shm.

Processes are stopped by their ids (SIGTERM to `ray start`, which stops its node, then
SIGKILL to whatever of that node is left), never by name: other Rays may run here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from llmray.localray import LOOPBACK, free_port
from tests.kuberay_replay.pods import (
    MissingReference,
    Pod,
    auth_env,
    cluster_pods,
    container_env,
    kuberay_env,
    quantity_value,
    ray_start_args,
)

# What the image gives every process besides the pod's env: this checkout's Python and code.
IMAGE_ENV_KEYS = ("PATH", "PYTHONPATH", "VIRTUAL_ENV", "HOME", "LANG", "LC_ALL", "USER", "TMPDIR")


def image_env() -> dict[str, str]:
    """The image's environment: IMAGE_ENV_KEYS as this process has them, with this Python's
    bin folder first on PATH (an image has `ray` and `python` on PATH; a test run started as
    `.venv/bin/pytest`, without the venv activated, would not)."""
    env = {k: os.environ[k] for k in IMAGE_ENV_KEYS if k in os.environ}
    env["PATH"] = os.pathsep.join(
        [os.path.dirname(sys.executable), *filter(None, [env.get("PATH")])]
    )
    return env


# Settings of the test environment, not of a pod: no model hub, no usage reports home.
TEST_ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}
# Per-node listeners Ray Serve opens on fixed default ports (one pod, one port space there).
SERVE_PORT_ENV = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)
OBJECT_STORE_SHARE = 0.3  # Ray's DEFAULT_OBJECT_STORE_MEMORY_PROPORTION
OBJECT_STORE_MIN = 80 * 2**20  # above Ray's 75 MiB floor
OBJECT_STORE_NO_LIMIT = 256 * 2**20  # a pod without a memory limit: keep this machine's RAM


@dataclass
class Node:
    pod: Pod
    root: Path  # the pod's filesystem root ($LLMRAY_POD_ROOT)
    env: dict[str, str]
    args: list[str]
    log: Path
    process: subprocess.Popen | None = None
    family: list[psutil.Process] = field(default_factory=list)

    @property
    def agent_url(self) -> str:
        flag = "--dashboard-agent-listen-port="
        (port,) = [a.removeprefix(flag) for a in self.args if a.startswith(flag)]
        return f"http://{LOOPBACK}:{port}"


class StartupError(RuntimeError):
    """A pod whose Ray node did not come up (its `ray start` log is in the message)."""


class RayCluster:
    """The pods of one RayCluster spec, started and stopped together."""

    def __init__(
        self,
        spec: dict[str, Any],
        *,
        name: str,
        namespace: str,
        workdir: Path,
        token: str,
        secrets: dict[str, dict[str, str]] | None = None,
        config_maps: dict[str, dict[str, str]] | None = None,
        service: bool = False,
        node_env: dict[str, str] | None = None,
        pvc_dir: Path | None = None,
    ) -> None:
        self.spec = spec
        self.name = name
        self.namespace = namespace
        self.workdir = workdir
        self.token = token
        self.secrets = dict(secrets or {})
        self.config_maps = dict(config_maps or {})
        self.service = service
        self.node_env = dict(node_env or {})
        # PersistentVolumeClaims outlive the cluster: one folder per claim, shared by pods.
        self.pvc_dir = pvc_dir or workdir / "pvc"
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.nodes: list[Node] = []
        self.node_table: list[dict[str, Any]] = []

    # --- addresses -------------------------------------------------------------------

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        # KubeRay's dashboard client sends the token in x-ray-authorization.
        return {"x-ray-authorization": f"Bearer {self.token}"} if self.auth else {}

    @property
    def auth(self) -> dict[str, str]:
        return auth_env(self.spec, self.token)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    # --- lifecycle -------------------------------------------------------------------

    def start(self, timeout: float = 180) -> None:
        """Head first (workers wait for its GCS, as KubeRay's wait-gcs-ready does), then every
        worker at once; returns when every pod's node is ALIVE."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.secrets.setdefault(self.name, {"auth_token": self.token})
        self.nodes = [
            self._plan(i, pod) for i, pod in enumerate(cluster_pods(self.spec, self.name))
        ]
        deadline = time.monotonic() + timeout
        self._launch(self.head)
        self._wait(lambda: self._healthy(), deadline, "the head's dashboard and GCS")
        for node in self.nodes[1:]:
            self._launch(node)
        self._wait(lambda: len(self.alive_nodes()) == len(self.nodes), deadline, "every node")
        # KubeRay submits only to a ready cluster: every pod's readiness probe asks its own
        # dashboard agent for the raylet's health (without it, `ray job submit` can reach
        # a head whose job agent is not up yet and fail the submitter pod).
        for node in self.nodes:
            self._wait(lambda n=node: self._raylet_healthy(n), deadline, f"{node.pod.name} ready")
        # The Ray nodes as they joined (node_id, labels, resources_total): what tests check
        # placement against after the cluster is gone.
        self.node_table = self.alive_nodes()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            if node.process is not None and node.process.poll() is None:
                node.family = _family(node.process.pid)
                node.process.terminate()
        for node in reversed(self.nodes):
            if node.process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=10)
            for proc in node.family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
            if node.process.poll() is None:
                node.process.kill()
                node.process.wait()
        for index in range(len(self.nodes)):
            shutil.rmtree(self._temp_dir(index), ignore_errors=True)

    def __enter__(self) -> RayCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the dashboard ---------------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.dashboard_url + path, headers=self.auth_headers, timeout=30, **kwargs)

    def put(self, path: str, body: Any) -> httpx.Response:
        return httpx.put(
            self.dashboard_url + path, headers=self.auth_headers, json=body, timeout=60
        )

    def alive_nodes(self) -> list[dict[str, Any]]:
        try:
            response = self.get("/api/v0/nodes", params={"limit": 1000})
        except httpx.HTTPError:
            return []
        if response.status_code != 200:
            return []
        rows = response.json()["data"]["result"]["result"]
        return [row for row in rows if row.get("state") == "ALIVE"]

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.dashboard_url + "/api/gcs_healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def _raylet_healthy(self, node: Node) -> bool:
        try:
            response = httpx.get(
                node.agent_url + "/api/local_raylet_healthz", headers=self.auth_headers, timeout=5
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and "success" in response.text

    def _wait(self, check, deadline: float, what: str) -> None:
        while not check():
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise StartupError(f"pod {node.pod.name} exited:\n{_tail(node.log)}")
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n.pod.name}\n{_tail(n.log)}" for n in self.nodes)
                raise StartupError(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.5)

    # --- one pod ---------------------------------------------------------------------

    def _plan(self, index: int, pod: Pod) -> Node:
        root = self.workdir / "pods" / pod.name
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        self._mount_volumes(pod, root)
        env = image_env()
        env.update(TEST_ENV)
        try:
            env.update(
                container_env(
                    pod,
                    namespace=self.namespace,
                    secrets=self.secrets,
                    config_maps=self.config_maps,
                )
            )
        except MissingReference as exc:
            raise StartupError(f"pod {pod.name}: CreateContainerConfigError: {exc}") from exc
        for key, value in {
            **kuberay_env(
                pod,
                cluster_name=self.name,
                namespace=self.namespace,
                gcs_address=self.gcs_address,
                service=self.service,
            ),
            **self.auth,
        }.items():
            env.setdefault(key, value)
        env["LLMRAY_POD_ROOT"] = str(root)
        for key in SERVE_PORT_ENV:
            env[key] = str(free_port())
        env.update(self.node_env)
        return Node(pod, root, env, self._args(index, pod), self.workdir / f"{pod.name}.log")

    def _args(self, index: int, pod: Pod) -> list[str]:
        params = dict(pod.start_params)
        # Pod-local ports: free ones here. The node's address: loopback.
        for key in (
            "metrics-export-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
        ):
            params[key] = str(free_port())
        params["node-ip-address"] = LOOPBACK  # 127.0.0.1 Ray would swap for eth0's address
        # A short folder: Ray's socket paths must stay under 108 characters.
        temp = self._temp_dir(index)
        shutil.rmtree(temp, ignore_errors=True)
        params["temp-dir"] = str(temp)
        memory = (pod.container.get("resources") or {}).get("limits", {}).get("memory")
        store = (
            max(OBJECT_STORE_MIN, int(quantity_value(memory) * OBJECT_STORE_SHARE))
            if memory is not None
            else OBJECT_STORE_NO_LIMIT
        )
        params.setdefault("object-store-memory", str(store))
        params["disable-usage-stats"] = "true"
        if pod.head:
            params.update(
                {
                    "port": str(self.gcs_port),
                    "dashboard-port": str(self.dashboard_port),
                    "dashboard-host": "127.0.0.1",
                    "ray-client-server-port": str(free_port()),
                }
            )
            head = ["--head"]
        else:
            params["address"] = self.gcs_address
            head = []
        ray = str(Path(sys.executable).with_name("ray"))
        return [ray, "start", *head, *ray_start_args(params)]

    def _temp_dir(self, index: int) -> Path:
        return Path(f"/tmp/krr-{os.getpid()}-{self.gcs_port}-{index}")

    def _mount_volumes(self, pod: Pod, root: Path) -> None:
        volumes = {v["name"]: v for v in pod.volumes}
        for mount in pod.container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                raise StartupError(f"pod {pod.name}: volumeMount {mount['name']} has no volume")
            path = mount["mountPath"]
            if path == "/dev/shm":
                continue  # this machine's shared memory is the pod's
            target = root / path.lstrip("/")
            if "persistentVolumeClaim" in volume:
                claim = self.pvc_dir / volume["persistentVolumeClaim"]["claimName"]
                claim.mkdir(parents=True, exist_ok=True)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(claim, target_is_directory=True)
            elif "emptyDir" in volume:
                target.mkdir(parents=True, exist_ok=True)
            elif "configMap" in volume or "secret" in volume:
                kind = "configMap" if "configMap" in volume else "secret"
                ref = volume[kind]
                name = ref.get("name") or ref.get("secretName")
                store = self.config_maps if kind == "configMap" else self.secrets
                if name not in store:
                    raise StartupError(f"pod {pod.name}: {kind} {name} not found")
                target.mkdir(parents=True, exist_ok=True)
                items = ref.get("items") or [{"key": k, "path": k} for k in store[name]]
                for item in items:
                    (target / item["path"]).write_text(store[name][item["key"]])
            else:
                raise StartupError(f"pod {pod.name}: volume {mount['name']}: type not replayed")

    def _launch(self, node: Node) -> None:
        log = node.log.open("w")
        node.process = subprocess.Popen(
            node.args,
            env=node.env,
            cwd=node.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the pod's own process group
        )
        log.close()


def _family(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"
