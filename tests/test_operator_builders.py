"""The operator's pure builders: FineTuneJob -> ConfigMap + RayJob, LLMDeployment -> RayService.

Golden YAML for the seed cases (UPDATE_GOLDEN=1 rewrites tests/golden/operator/), and every
built object validated against KubeRay v1.7.0's real CRDs with unknown fields as errors (the
API server would silently prune them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from llmray.api import load_resource
from llmray.api.validation import SpecError, parse_finetunejob, parse_llmdeployment
from llmray.serve_args import ServeArgs
from llmray.trainer_config import TrainerConfig
from llmray_operator import rayjob, rayservice
from llmray_operator.names import RAY_NAME_MAX, ray_name
from llmray_operator.owner import Owner
from llmray_operator.settings import Settings
from tests.kube.schema import CrdSchema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "kubernetes"
GOLDEN = Path(__file__).parent / "golden" / "operator"
KUBERAY = ROOT / "third_party" / "kuberay-crds"
SETTINGS = Settings(default_storage_uri="pvc://llmray-runs")
UID = "6f1c1d8e-0000-4000-8000-000000000001"

FINETUNE_CASES = {
    # seed case: Llama-2 7B, DeepSpeed ZeRO-3 + offload, 6 GPU workers, rank 0 on a big node
    "gpu-zero3-7b": "finetunejob-llama-zero3.yaml",
    # seed case: Llama-2 70B on 32 GPU workers, rank-0 memory estimated from the model size
    "gpu-zero3-70b": "finetunejob-llama-70b-zero3.yaml",
    # seed case: GPT-J 6B on 2 Intel GPU workers with IPEX
    "intel-gpu-ipex-gptj": "finetunejob-gptj-intel-gpu.yaml",
    "cpu-lora-pvc": "finetunejob-cpu-lora.yaml",
    "cpu-xeon-ipex-zero2": "finetunejob-xeon-ipex.yaml",
}
CPU_DDP = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "tiny-ddp", "namespace": "team-a"},
    "spec": {
        "baseModel": {"uri": "s3://models/tiny-llama"},
        "dataset": {"train": "s3://data/train.jsonl", "format": "text"},
        "compute": {"workers": 2, "resourcesPerWorker": {"cpu": "2", "memory": "4Gi"}},
    },
}
SERVE_CASES = {
    "serve-cpu": ("llmdeployment-cpu.yaml", None),
    "serve-gpu-vllm": ("llmdeployment-vllm.yaml", None),
    "serve-from-job": ("llmdeployment-from-job.yaml", "pvc://llm-models/smollm2-support"),
}


@pytest.fixture(scope="module")
def kuberay() -> dict[str, CrdSchema]:
    return {
        kind: CrdSchema.from_file(KUBERAY / f"ray.io_{plural}.yaml")
        for kind, plural in (("RayJob", "rayjobs"), ("RayService", "rayservices"))
    }


def _owner(resource) -> Owner:
    return Owner(
        "llmray.io/v1alpha1",
        resource.kind,
        resource.metadata.name,
        resource.metadata.namespace or "default",
        UID,
    )


def _with_namespace(resource):
    if resource.metadata.namespace:
        return resource
    return resource.model_copy(
        update={"metadata": resource.metadata.model_copy(update={"namespace": "default"})}
    )


class _GoldenDumper(yaml.SafeDumper):
    """Readable goldens: multi-line strings (trainer.json, serveConfigV2) as blocks."""

    def ignore_aliases(self, data):
        return True


def _str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_GoldenDumper.add_representer(str, _str)


def _check_golden(name: str, docs: list[dict]) -> None:
    path = GOLDEN / f"{name}.yaml"
    text = yaml.dump_all(docs, Dumper=_GoldenDumper, sort_keys=False, width=100)
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} missing: run UPDATE_GOLDEN=1 pytest {__file__}"
    assert yaml.safe_load_all(path.read_text()) is not None
    assert list(yaml.safe_load_all(path.read_text())) == docs, (
        f"{name} differs from {path} (UPDATE_GOLDEN=1 to accept)"
    )


def _finetune(case: str):
    source = FINETUNE_CASES.get(case)
    job = load_resource(EXAMPLES / source) if source else parse_finetunejob(CPU_DDP)
    job = _with_namespace(job)
    return job, rayjob.build(job, _owner(job), SETTINGS)


@pytest.mark.parametrize("case", [*FINETUNE_CASES, "cpu-ddp"])
def test_finetune_children_match_golden_and_kuberay_schema(case, kuberay):
    _, children = _finetune(case)
    errors = kuberay["RayJob"].validate(children.ray_job)
    assert errors == [], "\n".join(errors)
    _check_golden(case, [children.config_map, children.ray_job])
    # The ConfigMap is exactly what the entrypoint reads.
    cfg = TrainerConfig.model_validate(json.loads(children.config_map["data"]["trainer.json"]))
    assert cfg == children.trainer_config
    assert children.ray_job["spec"]["entrypoint"].endswith("--config /etc/llmray/trainer.json")


@pytest.mark.parametrize("case", SERVE_CASES)
def test_rayservice_matches_golden_and_kuberay_schema(case, kuberay):
    source, job_model = SERVE_CASES[case]
    dep = _with_namespace(load_resource(EXAMPLES / source))
    model_uri = job_model or dep.spec.model.uri
    service = rayservice.build(dep, _owner(dep), model_uri, SETTINGS)
    errors = kuberay["RayService"].validate(service)
    assert errors == [], "\n".join(errors)
    _check_golden(case, [service])


def test_rank0_group_pins_world_rank_0_to_a_large_memory_node():
    _, children = _finetune("gpu-zero3-7b")
    spec = children.ray_job["spec"]
    groups = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"rank0", "workers"}
    rank0 = groups["rank0"]
    assert rank0["replicas"] == rank0["minReplicas"] == rank0["maxReplicas"] == 1
    assert groups["workers"]["replicas"] == 5  # 6 workers in all
    assert rank0["labels"] == {"llmray.io/rank0": "true"}
    assert children.trainer_config.rank0_label == {"llmray.io/rank0": "true"}
    pod = rank0["template"]["spec"]
    assert pod["nodeSelector"] == {"llmray.io/memory-class": "large"}
    res = pod["containers"][0]["resources"]
    assert res["requests"]["memory"] == "280Gi"
    assert res["limits"]["nvidia.com/gpu"] == 1
    assert "nodeSelector" not in groups["workers"]["template"]["spec"]
    # The head does no training work and declares the dashboard port.
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    ports = {
        p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["dashboard"] == 8265
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] == 86400


def test_rank0_memory_is_estimated_from_the_model_size_when_unset():
    _, children = _finetune("gpu-zero3-70b")
    groups = {
        g["groupName"]: g for g in children.ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    }
    # 70e9 parameters x 2 bytes (bf16) x 4 = 522 GiB; workers keep their own 160Gi.
    assert (
        groups["rank0"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        == "522Gi"
    )
    assert groups["workers"]["replicas"] == 31
    worker = groups["workers"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["memory"] == "160Gi"
    assert worker["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_intel_gpu_gets_the_xpu_image_device_resource_and_oneccl_env():
    _, children = _finetune("intel-gpu-ipex-gptj")
    cluster = children.ray_job["spec"]["rayClusterSpec"]
    group = cluster["workerGroupSpecs"][0]
    container = group["template"]["spec"]["containers"][0]
    # The XPU build (torch / IPEX XPU wheels, Intel's GPU runtime), not the IPEX CPU image.
    assert container["image"] == SETTINGS.trainer_images.xpu
    assert container["image"].endswith("-xpu")
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == (
        SETTINGS.trainer_images.xpu
    )
    assert container["resources"]["limits"]["gpu.intel.com/i915"] == 1
    assert group["rayStartParams"] == {"num-gpus": "1"}  # KubeRay only detects nvidia.com/gpu
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DS_ACCELERATOR"] == "xpu"
    assert env["CCL_ZE_IPC_EXCHANGE"] == "sockets"


def test_ipex_on_xeons_gets_the_intel_cpu_image_and_no_devices():
    _, children = _finetune("cpu-xeon-ipex-zero2")
    cluster = children.ray_job["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] == SETTINGS.trainer_images.intel
        assert not any("gpu" in k for k in container["resources"].get("limits", {}))
        assert "num-gpus" not in group["rayStartParams"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DS_ACCELERATOR"] == "cpu"


def test_serving_on_intel_gpus_gets_the_xpu_server_image_and_num_gpus():
    dep = parse_llmdeployment(
        {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": "gptj", "namespace": "ml"},
            "spec": {
                "model": {"uri": "s3://my-bucket/models/gptj"},
                "engine": "transformers",
                "compute": {
                    "accelerator": "intel-gpu",
                    "resourcesPerReplica": {"cpu": "8", "memory": "64Gi", "gpu": 1},
                },
            },
        }
    )
    service = rayservice.build(dep, _owner(dep), dep.spec.model.uri, SETTINGS)
    cluster = service["spec"]["rayClusterConfig"]
    (replicas,) = cluster["workerGroupSpecs"]
    container = replicas["template"]["spec"]["containers"][0]
    assert container["image"] == SETTINGS.server_images.xpu
    assert container["resources"]["limits"]["gpu.intel.com/i915"] == 1
    assert replicas["rayStartParams"] == {"num-gpus": "1"}
    head = cluster["headGroupSpec"]
    assert head["template"]["spec"]["containers"][0]["image"] == SETTINGS.server_images.xpu


def test_secrets_travel_by_reference_only():
    _, children = _finetune("gpu-zero3-7b")
    container = children.ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"
    ][0]
    assert {"secretRef": {"name": "hf-token"}} in container["envFrom"]
    by_name = {e["name"]: e for e in container["env"]}
    assert by_name["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "s3-creds", "key": "secret-access-key"}
    }
    assert "value" not in by_name["AWS_SECRET_ACCESS_KEY"]


def test_pvc_uris_become_volumes_mounted_where_the_trainer_looks():
    _, children = _finetune("cpu-lora-pvc")
    pod = children.ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["name"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert set(claims) == {"llm-models", "llm-data", "llm-runs"}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts[claims["llm-data"]] == "/mnt/llmray/pvc/llm-data"


def test_serve_config_names_the_builder_with_resolved_args():
    dep = _with_namespace(load_resource(EXAMPLES / "llmdeployment-vllm.yaml"))
    service = rayservice.build(dep, _owner(dep), dep.spec.model.uri, SETTINGS)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "llmray_serve.app:build_app"
    args = ServeArgs.model_validate(app["args"])
    assert args.model_uri == "s3://my-bucket/models/gsm8k-7b"
    assert (args.min_replicas, args.max_replicas, args.max_ongoing_requests) == (1, 4, 32)
    assert args.api_key_env == "LLMRAY_API_KEY"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    worker = cluster["workerGroupSpecs"][0]
    assert (worker["minReplicas"], worker["maxReplicas"]) == (1, 4)
    env = {e["name"]: e for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert env["LLMRAY_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-api-key",
        "key": "key",
    }
    ports = {
        p["name"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert {"serve", "dashboard"} <= ports
    assert rayservice.endpoint("gsm8k-7b", "ml", SETTINGS) == (
        "http://gsm8k-7b-serve-svc.ml.svc.cluster.local:8000/v1"
    )


def test_long_names_get_a_stable_short_hash():
    long = "a-very-long-fine-tune-job-name-for-the-support-team-2026-11"
    short = ray_name(long)
    assert len(short) <= RAY_NAME_MAX
    assert short == ray_name(long)
    assert short != ray_name(long + "x")
    assert ray_name("gsm8k-7b") == "gsm8k-7b"
    body = json.loads(json.dumps(CPU_DDP))
    body["metadata"]["name"] = long
    job = parse_finetunejob(body)
    children = rayjob.build(job, _owner(job), SETTINGS)
    assert children.ray_job["metadata"]["name"] == short
    assert children.ray_job["metadata"]["labels"]["llmray.io/finetunejob"] == long


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("dataset.train", "data/train.jsonl", "spec.dataset.train"),
        ("baseModel.uri", "file:///models/x", "spec.baseModel.uri"),
        ("output.uri", "hf://org/x", "spec.output.uri"),
    ],
)
def test_specs_a_cluster_cannot_run_name_the_field(field, value, named):
    body = json.loads(json.dumps(CPU_DDP))
    section, key = field.split(".")
    body["spec"].setdefault(section, {})[key] = value
    job = parse_finetunejob(body)
    with pytest.raises(SpecError) as err:
        rayjob.build(job, _owner(job), SETTINGS)
    assert named in str(err.value)


def test_no_storage_anywhere_is_an_error_naming_storage_uri():
    job = parse_finetunejob(CPU_DDP)
    with pytest.raises(SpecError, match=r"spec.checkpointing.storageUri: required on a cluster"):
        rayjob.build(job, _owner(job), Settings())


def test_ray_pods_get_the_service_account_and_pull_secrets_of_the_settings():
    settings = SETTINGS.model_copy(
        update={"ray_service_account": "ml-jobs", "ray_image_pull_secrets": ("regcred",)}
    )
    job = parse_finetunejob(CPU_DDP)
    cluster = rayjob.build(job, _owner(job), settings).ray_job["spec"]["rayClusterSpec"]
    dep = _with_namespace(load_resource(EXAMPLES / "llmdeployment-cpu.yaml"))
    service = rayservice.build(dep, _owner(dep), dep.spec.model.uri, settings)
    for spec in (cluster, service["spec"]["rayClusterConfig"]):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert pod["serviceAccountName"] == "ml-jobs"
            assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_serving_pods_use_haproxy_ingress_unless_the_operator_is_set_to_rays_proxy():
    """Every pod of the cluster (head and replicas) gets the same ingress setting: HAProxy on
    port 8000 by default, Ray's Python proxy with `serveIngress: proxy`."""
    dep = _with_namespace(load_resource(EXAMPLES / "llmdeployment-vllm.yaml"))

    def pod_envs(settings: Settings) -> list[dict]:
        cluster = rayservice.build(dep, _owner(dep), dep.spec.model.uri, settings)["spec"][
            "rayClusterConfig"
        ]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [
            {e["name"]: e.get("value") for e in g["template"]["spec"]["containers"][0]["env"]}
            for g in groups
        ]

    for env in pod_envs(SETTINGS):
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    proxy = SETTINGS.model_copy(update={"serve_ingress": "proxy"})
    for env in pod_envs(proxy):
        assert "RAY_SERVE_ENABLE_HA_PROXY" not in env
        assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
