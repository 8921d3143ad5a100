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

from llmray import hardware
from llmray.api.finetunejob import FineTuneJob
from llmray.api.quantity import parse_quantity
from llmray.api.validation import FieldError, SpecError
from llmray.sizing import Plan
from llmray.trainer_config import TrainerConfig, default_rank0_label, resolve_trainer_config
from llmray_operator import pods, policy
from llmray_operator.names import (
    FINETUNEJOB_LABEL,
    config_map_name,
    labels,
    pod_labels,
    ray_name,
)
from llmray_operator.owner import Owner
from llmray_operator.resources import CONFIGMAPS, RAYJOBS
from llmray_operator.settings import Settings
from llmray_operator.sizing import job_plan, preemption_grace, rank0_memory

CONFIG_DIR = "/etc/llmray"
CONFIG_KEY = "trainer.json"
ENTRYPOINT = f"python -m llmray_trainer --config {CONFIG_DIR}/{CONFIG_KEY}"
CONFIG_VOLUME = "trainer-config"
# KubeRay's default submitter container (ray-operator/controllers/ray/common/job.go): its
# name and resources.
SUBMITTER_CONTAINER = "ray-job-submitter"
SUBMITTER_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "200Mi"},
    "limits": {"cpu": "1", "memory": "1Gi"},
}
COMPONENT = "finetune"
# `ray start` drains its node for this long on SIGTERM (Ray's default 30 s) before it stops
# Ray: the training pods' grace period, so that a drain reaching Ray Train's workers
# (llmray_trainer/preemption.py) leaves them the time to write their checkpoint.
RAY_DRAIN_TIMEOUT_ENV = "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"


def prestop(grace: int) -> dict[str, Any]:
    """The training containers' preStop hook: the Ray Train workers in the pod get SIGTERM,
    checkpoint at the next step boundary and stop, before the kubelet stops Ray
    (llmray_trainer/prestop.py)."""
    command = ["python", "-m", "llmray_trainer.prestop", "--timeout", str(grace)]
    return {"preStop": {"exec": {"command": command}}}


@dataclass(frozen=True)
class FineTuneChildren:
    trainer_config: TrainerConfig
    config_map: dict[str, Any]
    ray_job: dict[str, Any]
    plan: Plan | None  # the memory plan (None: spec.baseModel.parameters unset)


def cluster_errors(job: FineTuneJob, settings: Settings) -> list[FieldError]:
    """What the CRD schema cannot see: pods have no local files, and need shared storage; and
    what this operator's policy allows (`policy`)."""
    spec = job.spec
    errors = [
        *policy.image_errors(spec.image, settings),
        *policy.toleration_errors(spec.compute.tolerations, settings),
        *policy.env_errors(spec.env, pod_env(job)),
    ]
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


def pod_env(job: FineTuneJob) -> dict[str, str]:
    """The variables the operator sets in every pod of the job, e.g. {"DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "4", "PYTHONUNBUFFERED": "1"}: spec.env may not override them."""
    compute = job.spec.compute
    hw = hardware.profile(compute.accelerator, compute.ipex)
    threads = max(1, int(parse_quantity(compute.resourcesPerWorker.cpu)))
    return {
        **hw.pod_env(),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
        RAY_DRAIN_TIMEOUT_ENV: str(preemption_grace(job)),
    }


def trainer_config(job: FineTuneJob, settings: Settings, run_id: str = "") -> TrainerConfig:
    """The trainer's config for `job`; `run_id` (its uid) makes KubeRay's retries one run."""
    # The operator's default storage is shared by every namespace: runs (named after the
    # job, which resumes them) get a folder per namespace so same-named jobs never meet.
    namespace = job.metadata.namespace or "default"
    default = settings.default_storage_uri
    return resolve_trainer_config(
        job,
        base_dir="/",
        default_storage=f"{default.rstrip('/')}/{namespace}" if default else "",
        cache_dir=f"{pods.CACHE_DIR}/cache",
        cpus_per_worker=float(parse_quantity(job.spec.compute.resourcesPerWorker.cpu)),
        rank0_label=default_rank0_label(job),
        run_id=run_id,
    )


def build(job: FineTuneJob, owner: Owner, settings: Settings) -> FineTuneChildren:
    """The desired children of `job`; raises SpecError for specs a cluster cannot run."""
    errors = cluster_errors(job, settings)
    if errors:
        raise SpecError(errors)
    cfg = trainer_config(job, settings, run_id=owner.uid)
    memory_plan = job_plan(job)
    name = ray_name(job.metadata.name)
    child_labels = labels(FINETUNEJOB_LABEL, job.metadata.name, COMPONENT)
    config_map = {
        "apiVersion": CONFIGMAPS.api_version,
        "kind": CONFIGMAPS.kind,
        "metadata": owner.metadata(config_map_name(job.metadata.name), child_labels),
        "data": {CONFIG_KEY: json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True)},
    }
    ray_job = {
        "apiVersion": RAYJOBS.api_version,
        "kind": RAYJOBS.kind,
        "metadata": owner.metadata(name, child_labels),
        "spec": _rayjob_spec(
            job,
            cfg,
            pod_labels(FINETUNEJOB_LABEL, job.metadata.name, COMPONENT),
            settings,
            rank0_memory(job, memory_plan),
        ),
    }
    # No object shared between pod templates: callers may edit one group safely.
    return FineTuneChildren(cfg, copy.deepcopy(config_map), copy.deepcopy(ray_job), memory_plan)


def _rayjob_spec(
    job: FineTuneJob,
    cfg: TrainerConfig,
    pod_labels: dict[str, str],
    settings: Settings,
    rank0_memory: str | None,
) -> dict[str, Any]:
    spec = job.spec
    compute = spec.compute
    hw = hardware.profile(compute.accelerator, compute.ipex)
    image = spec.image or settings.trainer_images.of(hw)
    pvc_volumes, pvc_mounts = pods.pvc_volumes(
        inputs=[spec.baseModel.uri, spec.dataset.train, spec.dataset.eval],
        outputs=[cfg.storage_path, cfg.output_uri],
    )
    env = pods.env_list(pod_env(job), spec.env)
    env_from = pods.env_from([spec.baseModel.secretRef])
    volumes = [pods.CACHE_VOLUME, *pvc_volumes]
    mounts = [pods.CACHE_MOUNT, *pvc_mounts]

    def container(
        name: str, resources: dict[str, Any], extra_mounts=(), ports=None, lifecycle=None
    ):
        return pods.container(
            name,
            image=image,
            pull_policy=settings.image_pull_policy,
            env=env,
            env_from=env_from,
            resources=resources,
            mounts=[*mounts, *extra_mounts],
            ports=ports,
            lifecycle=lifecycle,
        )

    # Training pods: a SIGTERM (eviction, a draining node) is answered by a checkpoint at the
    # next step boundary; the grace period leaves the time to write it.
    grace = preemption_grace(job)

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
            settings=settings,
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
        if rank0_memory is not None:
            rank0_res["requests"]["memory"] = rank0_memory
            rank0_res["limits"]["memory"] = rank0_memory
        groups.append(
            _group(
                "rank0",
                1,
                container("ray-worker", rank0_res, lifecycle=prestop(grace)),
                volumes,
                {**compute.nodeSelector, **compute.rank0.nodeSelector},
                tolerations,
                pod_labels,
                settings,
                ray_labels=dict(cfg.rank0_label),
                start_params=hw.ray_start_params(compute.resourcesPerWorker.gpu),
                termination_grace_seconds=grace,
            )
        )
    if others:
        groups.append(
            _group(
                "workers",
                others,
                container("ray-worker", worker_res, lifecycle=prestop(grace)),
                volumes,
                compute.nodeSelector,
                tolerations,
                pod_labels,
                settings,
                start_params=hw.ray_start_params(compute.resourcesPerWorker.gpu),
                termination_grace_seconds=grace,
            )
        )
    cluster: dict[str, Any] = {
        "rayVersion": settings.ray_version,
        "headGroupSpec": head,
        "workerGroupSpecs": groups,
    }
    if settings.ray_auth_mode != "disabled":
        cluster["authOptions"] = {"mode": settings.ray_auth_mode}
    out: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        # KubeRay's own submitter pod has no security context (PodSecurity "restricted"
        # rejects it) and no image pull secrets; this one is KubeRay's default (head image,
        # its resources) hardened like every Ray pod. KubeRay fills in the `ray job submit`
        # command and its variables (an empty command asks for that).
        "submitterPodTemplate": pods.pod_template(
            container=pods.container(
                SUBMITTER_CONTAINER,
                image=image,
                pull_policy=settings.image_pull_policy,
                env=[],
                env_from=[],
                resources=SUBMITTER_RESOURCES,
                mounts=[],
            ),
            volumes=[],
            settings=settings,
            labels=pod_labels,
            restart_policy="Never",
        ),
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
    settings: Settings,
    *,
    ray_labels: dict[str, str] | None = None,
    start_params: dict[str, str] | None = None,
    termination_grace_seconds: int | None = None,
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
            settings=settings,
            node_selector=node_selector,
            tolerations_=tolerations,
            labels=pod_labels,
            termination_grace_seconds=termination_grace_seconds,
        ),
    }
    if ray_labels:
        group["labels"] = ray_labels
    return group
