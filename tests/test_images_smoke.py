"""The three CPU images, built here (`make images`), run as the operator's pods run them.

Each container gets the security context, volumes and environment of a pod template the
operator really builds (tests/images/podrun.py translates it for podman): uid 1000 / gid 100,
fsGroup 100, a read-only root file system writable only where the template mounts an
emptyDir, all capabilities dropped, no privilege escalation, seccomp RuntimeDefault.

- trainer: the FineTuneJob's head pod runs its RayJob entrypoint (`python -m llmray_trainer
  --config /etc/llmray/trainer.json`, the ConfigMap mounted) on a tiny model and data on a
  "PVC" (a host folder), ZeRO-2 with the optimizer offloaded (DeepSpeed's CPU Adam and SHM
  ops), and exports the model to the PVC. One container stands for the cluster: the driver
  starts a local Ray in it, where KubeRay would give it worker pods.
- DeepSpeed's CPU ops load from the image's prebuilt files, with nothing written to the
  JIT cache (~/.cache/torch_extensions stays empty).
- server: the RayService's head pod runs `ray start --head` (as KubeRay's head command), the
  test deploys the RayService's own serveConfigV2 through the dashboard's REST API (as KubeRay
  does) and the `openai` client on the host gets an answer through the published port. The
  head hosts the replica here (`--num-cpus`), where KubeRay would put it on a worker pod.
- operator: the chart's Deployment (its securityContext and args) runs against the Kubernetes
  API emulator and answers /healthz, and reconciles a FineTuneJob into a RayJob.

Marker `images` (`make test-images`); skipped without podman or the images.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmray.api import load_resource
from llmray.localray import free_port
from llmray.progress import parse_line
from llmray_operator import rayjob, rayservice
from llmray_operator.owner import Owner
from llmray_operator.settings import Images, Settings
from tests.images import build
from tests.images.podrun import run_options

pytestmark = [pytest.mark.images, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
OWNER = Owner(
    "llmray.io/v1alpha1", "FineTuneJob", "smoke", "ml", "6f1c1d8e-0000-4000-8000-00000000000a"
)
IMAGES = build.image_names()


def _require(image: str) -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (make podman-setup)")
    if not build.image_exists(image):
        pytest.skip(f"{image} is not built (make images)")


def _settings(**overrides: Any) -> Settings:
    images = {
        "trainer_images": Images(cpu=IMAGES["trainer"], nvidia="x", intel="x", xpu="x"),
        "server_images": Images(cpu=IMAGES["server"], nvidia="x", intel="x", xpu="x"),
    }
    return Settings(**images, image_pull_policy="Never", **overrides)


class Container:
    """A detached podman container, removed at the end."""

    def __init__(self, name: str) -> None:
        self.name = f"llmray-smoke-{name}-{uuid.uuid4().hex[:6]}"

    def run(self, image: str, options: list[str], command: list[str]) -> None:
        build.podman("run", "-d", "--name", self.name, *options, image, *command, capture=True)

    def wait(self, timeout: float) -> int:
        done = subprocess.run(
            [*build.PODMAN, "wait", self.name], capture_output=True, text=True, timeout=timeout
        )
        return int(done.stdout.strip().splitlines()[-1])

    def logs(self) -> str:
        done = build.podman("logs", self.name, check=False, capture=True)
        return done.stdout + done.stderr

    def remove(self) -> None:
        build.podman("rm", "-f", "-t", "5", self.name, check=False, capture=True)


def _head(obj: dict[str, Any], cluster_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    spec = obj["spec"][cluster_key]["headGroupSpec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


# --- trainer -----------------------------------------------------------------------------------


def _tiny_job(data: Path) -> dict[str, Any]:
    """A FineTuneJob on pvc://smoke: the tiny model, 32 examples, ZeRO-2 with the optimizer
    on the CPU (DeepSpeed's CPU Adam) and 2 workers (its SHM collective)."""
    from llmray_trainer.tiny_model import create_tiny_model

    create_tiny_model(data / "tiny")
    lines = (REPO / "examples" / "data" / "instruction.jsonl").read_text().splitlines()[:32]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "smoke", "namespace": "ml", "uid": OWNER.uid},
        "spec": {
            "baseModel": {"uri": "pvc://smoke/tiny"},
            "dataset": {"train": "pvc://smoke/train.jsonl", "maxSeqLength": 64},
            "method": "full",
            "hyperparameters": {
                "maxSteps": 4,
                "batchSizePerWorker": 4,
                "learningRate": 0.003,
                "precision": "fp32",
                "gradientCheckpointing": False,
            },
            "strategy": {"type": "deepspeed", "zeroStage": 2, "offloadOptimizer": True},
            "compute": {"workers": 2, "resourcesPerWorker": {"cpu": "1", "memory": "2Gi"}},
            "checkpointing": {"storageUri": "pvc://smoke/runs"},
            "output": {"uri": "pvc://smoke/out"},
        },
    }


def test_trainer_image_runs_a_finetunejob_as_its_head_pod(tmp_path: Path) -> None:
    _require(IMAGES["trainer"])
    data = tmp_path / "pvc-smoke"
    data.mkdir()
    job = load_resource_dict(_tiny_job(data), tmp_path)
    children = rayjob.build(job, OWNER, _settings())
    spec, container = _head(children.ray_job, "rayClusterSpec")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    config_map = children.config_map
    options = run_options(
        spec,
        container,
        work=tmp_path,
        claims={"smoke": data},
        config_maps={config_map["metadata"]["name"]: config_map["data"]},
        # What KubeRay adds for authOptions.mode token (the RayJob has it): the mode and the
        # token from its Secret. Without the token, Ray would write a new one to ~/.ray, on
        # the read-only root.
        extra_env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex},
    )
    assert children.ray_job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    entrypoint = children.ray_job["spec"]["entrypoint"].split()
    head = Container("trainer")
    try:
        head.run(container["image"], ["--network", "none", *options], entrypoint)
        code = head.wait(timeout=900)
        logs = head.logs()
        assert code == 0, logs[-6000:]
    finally:
        head.remove()
    assert "llmray: model exported to pvc://smoke/out" in logs, logs[-3000:]
    out = data / "out"
    assert (out / "config.json").exists() and list(out.glob("*.safetensors")), sorted(out.iterdir())
    assert {p.stat().st_uid for p in out.iterdir()} == {1000}  # written as the Ray user
    progress = [r for r in map(parse_line, logs.splitlines()) if r is not None]
    assert progress and max(r.get("step", 0) for r in progress) == 4, progress[-3:]
    # Nothing was compiled at run time: DeepSpeed's ops came prebuilt with the image.
    cache = tmp_path / "volumes" / "home-cache"
    assert not (cache / "torch_extensions").exists(), sorted(cache.rglob("*"))[:20]


def load_resource_dict(obj: dict[str, Any], tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(obj))
    return load_resource(path, kind=obj["kind"])


def test_trainer_image_loads_deepspeeds_prebuilt_cpu_ops_without_a_jit_build(
    tmp_path: Path,
) -> None:
    _require(IMAGES["trainer"])
    data = tmp_path / "pvc-smoke"
    data.mkdir()
    job = load_resource_dict(_tiny_job(data), tmp_path)
    children = rayjob.build(job, OWNER, _settings())
    spec, container = _head(children.ray_job, "rayClusterSpec")
    options = run_options(
        spec,
        container,
        work=tmp_path,
        claims={"smoke": data},
        config_maps={children.config_map["metadata"]["name"]: children.config_map["data"]},
    )
    # The builders DeepSpeed's CPU accelerator hands out (DS_ACCELERATOR=cpu, from the pod's
    # environment): load() imports the prebuilt module when the wheel has it, else JIT-builds
    # into ~/.cache/torch_extensions.
    script = (
        "import json, time\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "out = {}\n"
        "for name in ('CPUAdamBuilder', 'ShareMemCommBuilder'):\n"
        "    builder = get_accelerator().create_op_builder(name)\n"
        "    start = time.monotonic()\n"
        "    op = builder.load(verbose=True)\n"
        "    out[builder.name] = [op.__file__, time.monotonic() - start]\n"
        "import errno, os\n"
        "def refused(path):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "    except OSError as exc:\n"
        "        return exc.errno == errno.EROFS\n"
        "    return False\n"
        "pod = {'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),\n"
        "       'root_refused': [refused(p) for p in ('/home/ray/x', '/etc/x', '/x')],\n"
        "       'tmp_writable': not refused('/tmp/x')}\n"
        "print('OPS ' + json.dumps(out))\n"
        "print('POD ' + json.dumps(pod))\n"
    )
    done = build.podman(
        "run",
        "--rm",
        "--network",
        "none",
        *options,
        container["image"],
        "python",
        "-c",
        script,
        check=False,
        capture=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("OPS ")]
    ops = json.loads(line[4:])
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("POD ")]
    pod = json.loads(line[4:])
    # The pod's user and groups; the root file system refuses writes (EROFS), /tmp takes them.
    assert (pod["uid"], pod["gid"]) == (1000, 100) and 100 in pod["groups"], pod
    assert pod["root_refused"] == [True, True, True] and pod["tmp_writable"], pod
    assert set(ops) == {"cpu_adam", "deepspeed_shm_comm"}, ops
    for name, (path, seconds) in ops.items():
        assert "/site-packages/deepspeed/ops/" in path, (name, path)  # the wheel's .so
        assert "torch_extensions" not in path
        assert seconds < 30, (name, seconds)  # a JIT build takes 50-170 s here
    assert not list((tmp_path / "volumes" / "home-cache").rglob("*"))  # no JIT build cache


# --- server ------------------------------------------------------------------------------------


def test_server_image_serves_the_rayservice_config_to_the_openai_client(tmp_path: Path) -> None:
    _require(IMAGES["server"])
    from llmray_trainer.tiny_model import create_tiny_model

    models = tmp_path / "pvc-models"
    create_tiny_model(models / "tiny")
    dep_obj = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": "smoke", "namespace": "ml", "uid": OWNER.uid},
        "spec": {
            "model": {"uri": "pvc://models/tiny", "servedName": "tiny"},
            "engine": "transformers",
            "compute": {"resourcesPerReplica": {"cpu": "1", "memory": "2Gi"}},
            "scaling": {"minReplicas": 1, "maxReplicas": 1},
            "generation": {"maxNewTokens": 8},
        },
    }
    dep = load_resource_dict(dep_obj, tmp_path)
    service = rayservice.build(dep, OWNER, "pvc://models/tiny", _settings(ray_auth_mode="disabled"))
    spec, container = _head(service, "rayClusterConfig")
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    options = run_options(
        spec,
        container,
        work=tmp_path,
        claims={"models": models},
        # KubeRay with authOptions off: no Ray token (Ray 2.60 would otherwise make one).
        extra_env={"RAY_AUTH_MODE": "disabled"},
    )
    dashboard, serve = free_port(), free_port()
    publish = ["-p", f"127.0.0.1:{dashboard}:8265", "-p", f"127.0.0.1:{serve}:8000"]
    head = Container("server")
    try:
        # KubeRay's head command; the replica runs here too (2 CPUs instead of the head's 0).
        head.run(
            container["image"],
            [*publish, *options],
            ["ray", "start", "--head", "--dashboard-host=0.0.0.0", "--num-cpus=2", "--block"],
        )
        with httpx.Client(base_url=f"http://127.0.0.1:{dashboard}", timeout=30) as http:
            _eventually(lambda: http.get("/api/version").status_code == 200, 120, head)
            config = yaml.safe_load(service["spec"]["serveConfigV2"])
            put = http.put("/api/serve/applications/", json=config)
            assert put.status_code == 200, put.text
            _eventually(lambda: _app_status(http) == "RUNNING", 300, head)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{serve}/v1", api_key="none", max_retries=5)
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4
        )
        assert answer.choices[0].message.content is not None
        assert answer.usage.completion_tokens >= 1
        # Nothing was written outside the pod's volumes (the root is read-only): the head's
        # session logs are in its /tmp emptyDir.
        assert list((tmp_path / "volumes" / "tmp" / "ray").glob("session_*"))
    except BaseException:
        print(head.logs()[-6000:])
        raise
    finally:
        head.remove()


def _app_status(http: httpx.Client) -> str | None:
    apps = http.get("/api/serve/applications/").json().get("applications", {})
    status = {name: app.get("status") for name, app in apps.items()}
    failed = {n: a.get("message") for n, a in apps.items() if a.get("status") == "DEPLOY_FAILED"}
    assert not failed, failed
    return next(iter(status.values()), None)


def _eventually(check, timeout: float, container: Container) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"not within {timeout} s:\n{container.logs()[-4000:]}")


# --- operator ----------------------------------------------------------------------------------


def _chart_deployment(tmp_path: Path) -> dict[str, Any]:
    from tests.test_helm import by_kind, render

    (deployment,) = by_kind(render({}, tmp_path), "Deployment")
    return deployment


async def test_operator_image_serves_healthz_and_reconciles(tmp_path: Path) -> None:
    _require(IMAGES["operator"])
    from tests.kube.emulator import emulated_cluster
    from tests.test_operator_integration import CRDS, FTJ, JOB, NS, RAYJOBS

    pod = _chart_deployment(tmp_path)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    health, metrics = free_port(), free_port()
    async with emulated_cluster(tmp_path, CRDS) as (kube, kubeconfig):
        (tmp_path / "kube").mkdir()
        shutil.copy(kubeconfig, tmp_path / "kube" / "config")
        (tmp_path / "kube" / "config").chmod(0o644)
        options = run_options(
            pod,
            container,
            work=tmp_path,
            extra_env={"KUBECONFIG": "/etc/kube/config", "LLMRAY_DEFAULT_STORAGE_URI": "s3://r"},
        )
        args = [
            a for a in container["args"] if not a.startswith(("--health-port", "--metrics-port"))
        ]
        operator = Container("operator")
        try:
            # Host network: the emulator listens on this machine's loopback.
            # The image built here stands in for the chart's (ghcr.io/llmray/operator).
            operator.run(
                IMAGES["operator"],
                [
                    "--network",
                    "host",
                    "--mount",
                    f"type=bind,source={tmp_path / 'kube'},destination=/etc/kube,ro",
                    *options,
                ],
                [*args, f"--health-port={health}", f"--metrics-port={metrics}"],
            )
            async with httpx.AsyncClient(timeout=5) as http:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if (
                            await http.get(f"http://127.0.0.1:{health}/healthz")
                        ).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    assert time.monotonic() < deadline, operator.logs()[-4000:]
                    await asyncio.sleep(1)
            await kube.apply_object(dict(JOB))
            deadline = time.monotonic() + 120
            while kube.get_object(RAYJOBS, NS, JOB["metadata"]["name"]) is None:
                assert time.monotonic() < deadline, operator.logs()[-4000:]
                await asyncio.sleep(1)
            assert kube.get_object(FTJ, NS, JOB["metadata"]["name"]) is not None
        finally:
            logs = operator.logs()
            operator.remove()
    assert "Traceback" not in logs, logs[-4000:]
