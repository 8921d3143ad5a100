"""The operator's pure builders: FineTuneJob -> ConfigMap + RayJob, LLMDeployment -> RayService.

Golden YAML for the seed cases (UPDATE_GOLDEN=1 rewrites tests/golden/operator/), and every
built object validated against KubeRay v1.7.0's real CRDs with unknown fields as errors (the
API server would silently prune them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.adapters import resolve_adapters
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
    "serve-adapters": ("llmdeployment-adapters.yaml", None),
}
# The adapter job of examples/kubernetes/finetunejob-cpu-lora-adapter.yaml, succeeded.
ADAPTER_JOBS = {
    "support-v3": {
        "phase": "Succeeded",
        "model": {
            "uri": "pvc://llm-models/adapters/support-v3",
            "adapter": True,
            "baseModel": "pvc://llm-models/smollm2-135m-instruct",
        },
    }
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
    adapters = resolve_adapters(dep, ADAPTER_JOBS, model_uri)
    service = rayservice.build(dep, _owner(dep), model_uri, SETTINGS, adapters)
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


def _groups(children) -> dict[str, Any]:
    specs = children.ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return {g["groupName"]: g for g in specs}


def _memory(group: dict[str, Any]) -> str:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]


def test_rank0_memory_is_the_plans_rank0_peak_when_unset():
    from llmray.sizing import gib_quantity

    job, children = _finetune("gpu-zero3-70b")
    # The plan's rank-0 peak (reading the 138 GB bf16 checkpoint for everyone, at load) is
    # below a worker's 160Gi here: rank 0 keeps the workers' memory.
    assert children.plan is not None
    assert children.plan.rank0.peak_host < 160 * 2**30
    assert _memory(_groups(children)["rank0"]) == "160Gi"
    # With small workers, rank 0 gets the plan's peak, in whole Gi.
    compute = job.spec.compute.model_copy(
        update={"resourcesPerWorker": job.spec.compute.resourcesPerWorker.model_copy(
            update={"memory": "64Gi"}
        )}
    )  # fmt: skip
    small = job.model_copy(update={"spec": job.spec.model_copy(update={"compute": compute})})
    children = rayjob.build(small, _owner(small), SETTINGS)
    groups = _groups(children)
    assert _memory(groups["rank0"]) == gib_quantity(children.plan.rank0.peak_host) == "149Gi"
    assert groups["workers"]["replicas"] == 31
    assert _memory(groups["workers"]) == "64Gi"
    assert groups["workers"]["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_no_plan_without_the_parameter_hint_rank0_gets_a_workers_memory():
    from llmray_operator.sizing import job_plan, rank0_memory

    job, _ = _finetune("gpu-zero3-70b")
    base = job.spec.baseModel.model_copy(update={"parameters": None})
    job = job.model_copy(update={"spec": job.spec.model_copy(update={"baseModel": base})})
    assert job_plan(job) is None  # the operator reads no model files; no name guessing
    assert rank0_memory(job, None) == "160Gi"


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


def _adapters_service(adapters: list[dict], jobs: dict | None = None) -> dict:
    dep = _with_namespace(load_resource(EXAMPLES / "llmdeployment-adapters.yaml"))
    dep = dep.model_copy(
        update={"spec": dep.spec.model_copy(update={"adapters": _adapter_specs(adapters)})}
    )
    resolved = resolve_adapters(dep, ADAPTER_JOBS if jobs is None else jobs, dep.spec.model.uri)
    return rayservice.build(dep, _owner(dep), dep.spec.model.uri, SETTINGS, resolved)


def _adapter_specs(adapters: list[dict]):
    from llmray.api.llmdeployment import AdapterSpec

    return [AdapterSpec.model_validate(a) for a in adapters]


def _app(service: dict) -> dict:
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app


def test_adapter_changes_touch_the_serve_config_only():
    """Adding, removing or readying an adapter changes serveConfigV2's user_config alone: the
    rayClusterConfig stays byte-identical (KubeRay updates Serve in place, no new cluster) and
    so do the application args (Serve reconfigures the replicas, no restart)."""
    legal = {"name": "legal", "uri": "pvc://llm-models/adapters/legal"}
    support = {"name": "support", "fineTuneJobRef": {"name": "support-v3"}}
    running = {"support-v3": {"phase": "Running"}}
    variants = {
        "one": _adapters_service([legal]),
        "two": _adapters_service([legal, support]),
        "waiting": _adapters_service([legal, support], running),
        "removed": _adapters_service([support]),
    }
    clusters = {
        json.dumps(v["spec"]["rayClusterConfig"], sort_keys=True) for v in variants.values()
    }
    assert len(clusters) == 1
    assert len({json.dumps(_app(v)["args"], sort_keys=True) for v in variants.values()}) == 1
    configs = {k: _app(v)["deployments"] for k, v in variants.items()}
    assert configs["two"] == [
        {
            "name": "llm",
            "user_config": {
                "adapters": [
                    {"name": "legal", "uri": legal["uri"], "reason": "", "message": ""},
                    {
                        "name": "support",
                        "uri": "pvc://llm-models/adapters/support-v3",
                        "reason": "",
                        "message": "",
                    },
                ]
            },
        }
    ]
    (_, waiting) = configs["waiting"][0]["user_config"]["adapters"]
    assert waiting == {
        "name": "support",
        "uri": "",
        "reason": "FineTuneJobRunning",
        "message": "FineTuneJob support-v3 is Running: the adapter is served once it succeeded",
    }
    hashes = {v["metadata"]["annotations"][rayservice.SPEC_HASH] for v in variants.values()}
    assert len(hashes) == 4  # each is a change the operator applies


def test_adapter_claims_and_the_default_storage_are_mounted_read_only():
    service = _adapters_service([{"name": "a", "uri": "pvc://adapters/a"}])
    pod = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["name"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    # The model's, the adapter's, and the operator's default storage (where jobs write theirs).
    assert set(claims) == {"llm-models", "adapters", "llmray-runs"}
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert all(mounts[name].get("readOnly") for name in claims.values())


def test_an_adapter_pods_cannot_read_is_an_invalid_spec_naming_it():
    with pytest.raises(SpecError) as info:
        _adapters_service([{"name": "a", "uri": "s3://b/a"}, {"name": "b", "uri": "adapters/b"}])
    assert [e.path for e in info.value.errors] == ["spec.adapters[1].uri"]
    local_job = {"support-v3": ADAPTER_JOBS["support-v3"] | {"model": {"uri": "/tmp/a"}}}
    local_job["support-v3"]["model"] |= {"adapter": True}
    with pytest.raises(SpecError) as info:
        _adapters_service([{"name": "s", "fineTuneJobRef": {"name": "support-v3"}}], local_job)
    assert [e.path for e in info.value.errors] == ["spec.adapters[0].fineTuneJobRef"]


def test_without_adapters_the_serve_config_has_no_user_config():
    dep = _with_namespace(load_resource(EXAMPLES / "llmdeployment-cpu.yaml"))
    app = _app(rayservice.build(dep, _owner(dep), dep.spec.model.uri, SETTINGS))
    assert "deployments" not in app and app["args"]["max_loaded_adapters"] == 0
    # maxLoadedAdapters alone keeps adapter support on with an empty list.
    spec = dep.spec.model_copy(update={"maxLoadedAdapters": 2})
    app = _app(
        rayservice.build(
            dep.model_copy(update={"spec": spec}), _owner(dep), dep.spec.model.uri, SETTINGS
        )
    )
    assert app["deployments"] == [{"name": "llm", "user_config": {"adapters": []}}]
    assert app["args"]["max_loaded_adapters"] == 2


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
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "LLMRAY_API_KEY" not in {e["name"] for e in head["env"]}  # no replica runs there
    ports = {p["name"] for p in head["ports"]}
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


def _grace(group: dict[str, Any]) -> tuple[int, list[str], str]:
    """(terminationGracePeriodSeconds, preStop command, Ray's drain timeout) of a group."""
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    return pod["terminationGracePeriodSeconds"], command, env[rayjob.RAY_DRAIN_TIMEOUT_ENV]


def test_training_pods_get_a_grace_period_for_a_checkpoint_from_the_model_size():
    from llmray.sizing import checkpoint_rank_bytes, preemption_grace_seconds

    job, children = _finetune("gpu-zero3-7b")
    plan = children.plan
    assert plan is not None
    # 7B under ZeRO-3 bf16 on 6 workers: each writes its 1/6 of the weights and states.
    assert plan.checkpoint_bytes == checkpoint_rank_bytes(job.spec, plan.shape)
    assert plan.checkpoint_bytes == (2 + 12) * 6_738_415_616 // 6
    grace = preemption_grace_seconds(job.spec, plan.checkpoint_bytes)
    assert grace == 60 + -(-plan.checkpoint_bytes // (100 * 2**20))
    for group in _groups(children).values():
        seconds, command, drain = _grace(group)
        assert seconds == grace and drain == str(grace)
        assert command[:3] == ["python", "-m", "llmray_trainer.prestop"]
        assert command[-1] == str(grace)
    # The head runs no training: Kubernetes' default.
    head = children.ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "terminationGracePeriodSeconds" not in head


def test_preemption_grace_period_is_overridable_and_has_a_default_without_a_size():
    from llmray.sizing import DEFAULT_PREEMPTION_GRACE_SECONDS

    job, _ = _finetune("gpu-zero3-70b")
    checkpointing = job.spec.checkpointing.model_copy(update={"preemptionGracePeriodSeconds": 45})
    set_ = job.model_copy(
        update={"spec": job.spec.model_copy(update={"checkpointing": checkpointing})}
    )
    for group in _groups(rayjob.build(set_, _owner(set_), SETTINGS)).values():
        assert _grace(group)[0] == 45
    base = job.spec.baseModel.model_copy(update={"parameters": None})
    unknown = job.model_copy(update={"spec": job.spec.model_copy(update={"baseModel": base})})
    for group in _groups(rayjob.build(unknown, _owner(unknown), SETTINGS)).values():
        assert _grace(group)[0] == DEFAULT_PREEMPTION_GRACE_SECONDS


def test_spec_env_cannot_shorten_rays_drain_on_sigterm():
    job = parse_finetunejob(
        {**CPU_DDP, "spec": {**CPU_DDP["spec"], "env": [
            {"name": rayjob.RAY_DRAIN_TIMEOUT_ENV, "value": "1"}
        ]}}
    )  # fmt: skip
    errors = rayjob.cluster_errors(job, SETTINGS)
    assert any(rayjob.RAY_DRAIN_TIMEOUT_ENV in str(e) for e in errors), errors
