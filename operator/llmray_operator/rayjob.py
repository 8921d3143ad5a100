"""FineTuneJob -> a ConfigMap with the resolved trainer config + a KubeRay RayJob (pure).

head         0 CPUs for Ray work: runs the driver (`python -m llmray_trainer`) only
rank0        1 pod, on rank0.nodeSelector with the rank-0 memory and the Ray node label
             llmray.io/rank0=true, so Ray Train puts world rank 0 (placement bundle 0) there
workers      the other N-1 (or N) training workers
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from llmray.api.common import cpu_cores
from llmray.api.finetunejob import FineTuneJob
from llmray.api.validation import FieldError, SpecError
from llmray.trainer_config import TrainerConfig, default_rank0_label, resolve_trainer_config
from llmray_operator import hardware, pods
from llmray_operator.names import (
    FINETUNEJOB_LABEL,
    config_map_name,
    labels,
    pod_labels,
    ray_name,
)
from llmray_operator.owner import Owner
from llmray_operator.settings import Settings
from llmray_operator.sizing import rank0_memory

CONFIG_DIR = "/etc/llmray"
CONFIG_KEY = "trainer.json"
ENTRYPOINT = f"python -m llmray_trainer --config {CONFIG_DIR}/{CONFIG_KEY}"
CONFIG_VOLUME = "trainer-config"
COMPONENT = "finetune"


@dataclass(frozen=True)
class FineTuneChildren:
    trainer_config: TrainerConfig
    config_map: dict[str, Any]
    ray_job: dict[str, Any]


def cluster_errors(job: FineTuneJob, settings: Settings) -> list[FieldError]:
    """What the CRD schema cannot see: pods have no local files, and need shared storage."""
    spec = job.spec
    errors = []
    local = "a local path: pods cannot read it; use s3://, gs://, hf:// or pvc://CLAIM/PATH"
    for path, value in (
        ("spec.baseModel.uri", spec.baseModel.uri),
        ("spec.dataset.train", spec.dataset.train),
        ("spec.dataset.eval", spec.dataset.eval),
        ("spec.checkpointing.storageUri", spec.checkpointing.storageUri),
        ("spec.output.uri", spec.output.uri),
    ):
        if (value and "://" not in value) or (value or "").startswith("file://"):
            errors.append(FieldError(path, f"{value} is {local}"))
    if not spec.checkpointing.storageUri and not settings.default_storage_uri:
        errors.append(
            FieldError(
                "spec.checkpointing.storageUri",
                "required on a cluster (checkpoints and the model need storage every pod "
                "shares), or install the operator with a default storage URI",
            )
        )
    for path, value in (
        ("spec.checkpointing.storageUri", spec.checkpointing.storageUri),
        ("spec.output.uri", spec.output.uri),
    ):
        if value and value.startswith("hf://"):
            errors.append(FieldError(path, "hf:// is read-only here; use s3://, gs:// or pvc://"))
    return errors


def trainer_config(job: FineTuneJob, settings: Settings) -> TrainerConfig:
    # The operator's default storage is shared by every namespace: runs (named after the
    # job, which resumes them) get a folder per namespace so same-named jobs never meet.
    namespace = job.metadata.namespace or "default"
    default = settings.default_storage_uri
    return resolve_trainer_config(
        job,
        base_dir="/",
        default_storage=f"{default.rstrip('/')}/{namespace}" if default else "",
        cache_dir=f"{pods.CACHE_DIR}/cache",
        cpus_per_worker=cpu_cores(job.spec.compute.resourcesPerWorker.cpu),
        rank0_label=default_rank0_label(job),
    )


def build(job: FineTuneJob, owner: Owner, settings: Settings) -> FineTuneChildren:
    """The desired children of `job`; raises SpecError for specs a cluster cannot run."""
    errors = cluster_errors(job, settings)
    if errors:
        raise SpecError(errors)
    cfg = trainer_config(job, settings)
    name = ray_name(job.metadata.name)
    child_labels = labels(FINETUNEJOB_LABEL, job.metadata.name, COMPONENT)
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(config_map_name(job.metadata.name), child_labels),
        "data": {CONFIG_KEY: json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True)},
    }
    ray_job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": owner.metadata(name, child_labels),
        "spec": _rayjob_spec(
            job, cfg, pod_labels(FINETUNEJOB_LABEL, job.metadata.name, COMPONENT), settings
        ),
    }
    # No object shared between pod templates: callers may edit one group safely.
    return FineTuneChildren(cfg, copy.deepcopy(config_map), copy.deepcopy(ray_job))


def _rayjob_spec(
    job: FineTuneJob, cfg: TrainerConfig, pod_labels: dict[str, str], settings: Settings
) -> dict[str, Any]:
    spec = job.spec
    compute = spec.compute
    hw = hardware.profile(compute.accelerator, compute.ipex)
    image = spec.image or hw.image(settings.trainer_images)
    claims = pods.pvc_claims(
        [
            spec.baseModel.uri,
            spec.dataset.train,
            spec.dataset.eval,
            cfg.storage_path,
            cfg.output_uri,
        ]
    )
    pvc_volumes, pvc_mounts = pods.pvc_volumes(claims)
    threads = max(1, int(cfg.cpus_per_worker))
    env = pods.env_list(
        {**hw.env, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}, spec.env
    )
    env_from = pods.env_from([spec.baseModel.secretRef])
    volumes = [pods.SHM_VOLUME, pods.CACHE_VOLUME, *pvc_volumes]
    mounts = [pods.SHM_MOUNT, pods.CACHE_MOUNT, *pvc_mounts]

    def container(name: str, resources: dict[str, Any], extra_mounts=(), ports=None):
        return pods.container(
            name,
            image=image,
            pull_policy=settings.image_pull_policy,
            env=env,
            env_from=env_from,
            resources=resources,
            mounts=[*mounts, *extra_mounts],
            ports=ports,
        )

    # The driver runs on the head: the ConfigMap is mounted there.
    config_volume = {
        "name": CONFIG_VOLUME,
        "configMap": {"name": config_map_name(job.metadata.name)},
    }
    head = {
        "rayStartParams": {"num-cpus": "0"},
        "template": pods.pod_template(
            container=container(
                "ray-head",
                pods.container_resources(settings.head_cpu, settings.head_memory),
                [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}],
                pods.HEAD_PORTS,
            ),
            volumes=[*volumes, config_volume],
            labels=pod_labels,
        ),
    }
    tolerations = pods.tolerations(compute.tolerations)
    worker_res = pods.worker_resources(compute.resourcesPerWorker, hw.device_resource)
    groups = []
    others = compute.workers
    if compute.rank0 is not None:
        others -= 1
        rank0_res = pods.worker_resources(compute.resourcesPerWorker, hw.device_resource)
        memory = rank0_memory(job)
        if memory is not None:
            rank0_res["requests"]["memory"] = memory
            rank0_res["limits"]["memory"] = memory
        groups.append(
            _group(
                "rank0",
                1,
                container("ray-worker", rank0_res),
                volumes,
                {**compute.nodeSelector, **compute.rank0.nodeSelector},
                tolerations,
                pod_labels,
                ray_labels=dict(cfg.rank0_label),
                start_params=hw.ray_start_params(compute.resourcesPerWorker.gpu),
            )
        )
    if others:
        groups.append(
            _group(
                "workers",
                others,
                container("ray-worker", worker_res),
                volumes,
                compute.nodeSelector,
                tolerations,
                pod_labels,
                start_params=hw.ray_start_params(compute.resourcesPerWorker.gpu),
            )
        )
    cluster: dict[str, Any] = {
        "rayVersion": settings.ray_version,
        "headGroupSpec": head,
        "workerGroupSpecs": groups,
    }
    if settings.ray_auth_mode != "disabled":
        cluster["authOptions"] = {"mode": settings.ray_auth_mode}
    pods.apply_pod_settings(cluster, settings.ray_service_account, settings.ray_image_pull_secrets)
    out: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
        # Worker failures are retried inside the cluster by Ray Train (FailureConfig); a lost
        # cluster (head evicted, node gone) by KubeRay with a new one. Both resume from the
        # latest checkpoint, because the run name and storage stay the same.
        "backoffLimit": spec.maxRetries,
        "rayClusterSpec": cluster,
    }
    if spec.activeDeadlineSeconds is not None:
        out["activeDeadlineSeconds"] = spec.activeDeadlineSeconds
    return out


def _group(
    name: str,
    replicas: int,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    node_selector: dict[str, str],
    tolerations: list[dict[str, Any]],
    pod_labels: dict[str, str],
    *,
    ray_labels: dict[str, str] | None = None,
    start_params: dict[str, str] | None = None,
) -> dict[str, Any]:
    group: dict[str, Any] = {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": replicas,
        "maxReplicas": replicas,
        "rayStartParams": dict(start_params or {}),
        "template": pods.pod_template(
            container=container,
            volumes=volumes,
            node_selector=node_selector,
            tolerations_=tolerations,
            labels=pod_labels,
        ),
    }
    if ray_labels:
        group["labels"] = ray_labels
    return group
