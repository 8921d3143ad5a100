"""LLMDeployment -> a KubeRay RayService running the serve app of `serve_image/` (pure).

serveConfigV2    one application: import_path llmray_serve.app:build_app, args = ServeArgs
head             0 CPUs for Ray work: Serve controller and an HTTP proxy (port 8000)
replicas         one worker pod per model replica, autoscaled by Ray between
                 scaling.minReplicas and scaling.maxReplicas
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import yaml

from llmray.api.llmdeployment import LLMDeployment
from llmray.api.validation import FieldError, SpecError
from llmray.serve_args import API_KEY_ENV, ServeArgs, ray_serve_env, resolve_serve_args
from llmray_operator import hardware, pods
from llmray_operator.names import LLMDEPLOYMENT_LABEL, labels, pod_labels, ray_name
from llmray_operator.owner import Owner
from llmray_operator.settings import Settings

IMPORT_PATH = "llmray_serve.app:build_app"
# sha256 of the spec the operator last wrote: a spec edit (a field removed included) changes
# it, while defaults the API server fills in do not.
SPEC_HASH = "llmray.io/spec-hash"
SERVE_PORT = 8000
COMPONENT = "serve"


def endpoint(name: str, namespace: str, settings: Settings) -> str:
    """The OpenAI base URL inside the cluster: KubeRay's <rayservice>-serve-svc on 8000."""
    return f"http://{ray_name(name)}-serve-svc.{namespace}.svc.{settings.cluster_domain}:8000/v1"


def model_errors(model_uri: str, field: str) -> list[FieldError]:
    if "://" not in model_uri or model_uri.startswith("file://"):
        return [
            FieldError(
                field,
                f"{model_uri} is a local path: pods cannot read it; use s3://, gs://, hf:// "
                "or pvc://CLAIM/PATH",
            )
        ]
    return []


def serve_args(dep: LLMDeployment, model_uri: str) -> ServeArgs:
    return resolve_serve_args(dep, model_uri=model_uri, cache_dir=f"{pods.CACHE_DIR}/cache")


def serve_config(args: ServeArgs) -> str:
    """serveConfigV2 is a YAML string in the RayService spec."""
    app = {
        "name": args.name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json"),
    }
    return yaml.safe_dump({"applications": [app]}, sort_keys=False)


def build(dep: LLMDeployment, owner: Owner, model_uri: str, settings: Settings) -> dict[str, Any]:
    """The desired RayService; `model_uri` is spec.model.uri or the referenced job's model."""
    field = "spec.model.uri" if dep.spec.model.uri else "spec.model.fineTuneJobRef"
    errors = model_errors(model_uri, field)
    if errors:
        raise SpecError(errors)
    spec = dep.spec
    compute = spec.compute
    args = serve_args(dep, model_uri)
    hw = hardware.profile(compute.accelerator, compute.ipex)
    image = spec.image or hw.image(settings.server_images)
    claims = pods.pvc_claims([model_uri])
    pvc_volumes, pvc_mounts = pods.pvc_volumes(claims)
    threads = max(1, int(args.num_cpus))
    fixed = {
        **hw.env,
        **ray_serve_env(haproxy=settings.serve_ingress == "haproxy"),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }
    env = pods.env_list(fixed)
    if spec.apiKeySecretRef is not None:
        # The key reaches the replicas by reference; ServeArgs only names the variable.
        ref = spec.apiKeySecretRef
        env.append(
            {
                "name": API_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    env_from = pods.env_from([spec.model.secretRef])
    volumes = [pods.SHM_VOLUME, pods.CACHE_VOLUME, *pvc_volumes]
    mounts = [pods.SHM_MOUNT, pods.CACHE_MOUNT, *pvc_mounts]
    template_labels = pod_labels(LLMDEPLOYMENT_LABEL, dep.metadata.name, COMPONENT)

    def container(name: str, resources: dict[str, Any], ports: list[dict[str, Any]]):
        return pods.container(
            name,
            image=image,
            pull_policy=settings.image_pull_policy,
            env=env,
            env_from=env_from,
            resources=resources,
            mounts=mounts,
            ports=ports,
        )

    head = {
        "rayStartParams": {"num-cpus": "0"},
        "template": pods.pod_template(
            container=container(
                "ray-head",
                pods.container_resources(settings.head_cpu, settings.head_memory),
                [*pods.HEAD_PORTS, pods.SERVE_PORT],
            ),
            volumes=volumes,
            labels=template_labels,
        ),
    }
    scaling = spec.scaling
    replicas = {
        "groupName": "replicas",
        "replicas": max(scaling.minReplicas, 1)
        if scaling.maxReplicas == scaling.minReplicas
        else scaling.minReplicas,
        "minReplicas": scaling.minReplicas,
        "maxReplicas": scaling.maxReplicas,
        "rayStartParams": hw.ray_start_params(compute.resourcesPerReplica.gpu),
        "template": pods.pod_template(
            container=container(
                "ray-worker",
                pods.worker_resources(compute.resourcesPerReplica, hw.device_resource),
                [pods.SERVE_PORT],
            ),
            volumes=volumes,
            node_selector=compute.nodeSelector,
            tolerations_=pods.tolerations(compute.tolerations),
            labels=template_labels,
        ),
    }
    cluster: dict[str, Any] = {
        "rayVersion": settings.ray_version,
        "headGroupSpec": head,
        "workerGroupSpecs": [replicas],
    }
    if scaling.maxReplicas > scaling.minReplicas:
        # Ray Serve asks for replicas, the Ray autoscaler turns that into worker pods.
        cluster["enableInTreeAutoscaling"] = True
    if settings.ray_auth_mode != "disabled":
        cluster["authOptions"] = {"mode": settings.ray_auth_mode}
    pods.apply_pod_settings(cluster, settings.ray_service_account, settings.ray_image_pull_secrets)
    spec = {"serveConfigV2": serve_config(args), "rayClusterConfig": cluster}
    metadata = owner.metadata(
        ray_name(dep.metadata.name), labels(LLMDEPLOYMENT_LABEL, dep.metadata.name, COMPONENT)
    )
    metadata["annotations"] = {SPEC_HASH: spec_hash(spec)}
    # No object shared between pod templates: callers may edit one group safely.
    return copy.deepcopy(
        {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": metadata, "spec": spec}
    )


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
