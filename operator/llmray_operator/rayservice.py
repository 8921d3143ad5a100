"""LLMDeployment -> a KubeRay RayService running the serve app of `serve_image/` (pure).

serveConfigV2    one application: import_path llmray_serve.app:build_app, args = ServeArgs;
                 with adapters, the deployment's user_config = the resolved spec.adapters
head             0 CPUs for Ray work: Serve controller and an HTTP proxy (pods.SERVE_PORT)
replicas         one worker pod per model replica, autoscaled by Ray between
                 scaling.minReplicas and scaling.maxReplicas

Adapters live in serveConfigV2 only, in the user_config: KubeRay applies a change there to the
running cluster through Serve's REST API, and Serve hands it to the running replicas'
`reconfigure()`; a change to rayClusterConfig would bring up a new cluster. So nothing about an
adapter reaches the pod templates, save the claims of pvc:// adapters known when they are
built (the operator's default storage claim, where jobs write their adapters, is mounted
whenever the deployment serves adapters).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import yaml

from llmray import hardware
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.validation import FieldError, SpecError
from llmray.serve_args import (
    API_KEY_ENV,
    AdapterArgs,
    ServeArgs,
    ServeUserConfig,
    ray_serve_env,
    resolve_serve_args,
    serve_application,
)
from llmray_operator import pods, policy, security
from llmray_operator.names import LLMDEPLOYMENT_LABEL, PREFIX, labels, pod_labels, ray_name
from llmray_operator.owner import Owner
from llmray_operator.resources import RAYSERVICES
from llmray_operator.settings import Settings

# sha256 of the spec the operator last wrote: a spec edit (a field removed included) changes
# it, while defaults the API server fills in do not.
SPEC_HASH = f"{PREFIX}/spec-hash"
COMPONENT = "serve"


def endpoint(name: str, namespace: str, settings: Settings) -> str:
    """The OpenAI base URL inside the cluster: KubeRay's <rayservice>-serve-svc, e.g.
    http://gsm8k-7b-serve-svc.ml.svc.cluster.local:8000/v1."""
    host = f"{ray_name(name)}-serve-svc.{namespace}.svc.{settings.cluster_domain}"
    return f"http://{host}:{pods.SERVE_PORT}/v1"


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


def serve_config(args: ServeArgs, user_config: ServeUserConfig | None = None) -> str:
    """serveConfigV2 is a YAML string in the RayService spec."""
    app = serve_application(args, user_config)
    return yaml.safe_dump({"applications": [app]}, sort_keys=False)


def adapter_errors(dep: LLMDeployment, adapters: Sequence[AdapterArgs]) -> list[FieldError]:
    """Ready adapters the pods could not read (a local path), named by their spec field."""
    errors = []
    for i, (spec, args) in enumerate(zip(dep.spec.adapters, adapters, strict=True)):
        if args.ready:
            field = "uri" if spec.uri is not None else "fineTuneJobRef"
            errors += model_errors(args.uri, f"spec.adapters[{i}].{field}")
    return errors


def build(
    dep: LLMDeployment,
    owner: Owner,
    model_uri: str,
    settings: Settings,
    adapters: Sequence[AdapterArgs] = (),
) -> dict[str, Any]:
    """The desired RayService; `model_uri` is spec.model.uri or the referenced job's model;
    `adapters`: spec.adapters resolved (`llmray.adapters.resolve_adapters`), in spec order."""
    field = "spec.model.uri" if dep.spec.model.uri else "spec.model.fineTuneJobRef"
    errors = [
        *model_errors(model_uri, field),
        *adapter_errors(dep, adapters),
        *policy.image_errors(dep.spec.image, settings),
        *policy.toleration_errors(dep.spec.compute.tolerations, settings),
    ]
    if errors:
        raise SpecError(errors)
    spec = dep.spec
    compute = spec.compute
    args = serve_args(dep, model_uri)
    hw = hardware.profile(compute.accelerator, compute.ipex)
    image = spec.image or settings.server_images.of(hw)
    # Serving only reads: the model's claim, and with adapters every claim they are known to
    # be on plus the default storage's, where FineTuneJobs write theirs.
    reads = [model_uri]
    if args.max_loaded_adapters:
        reads += [a.uri for a in adapters if a.ready] + [settings.default_storage_uri]
    pvc_volumes, pvc_mounts = pods.pvc_volumes(inputs=reads)
    threads = max(1, int(args.num_cpus))
    fixed = {
        **hw.pod_env(),
        **ray_serve_env(haproxy=settings.serve_ingress == "haproxy"),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }
    env = pods.env_list(fixed)
    replica_env = list(env)
    if spec.apiKeySecretRef is not None:
        # The key reaches the replicas by reference; ServeArgs only names the variable. Only
        # the replica group gets it: the head (num-cpus 0) runs no replica, and whoever can
        # exec into it or read its environment should not learn the key.
        ref = spec.apiKeySecretRef
        replica_env.append(
            {
                "name": API_KEY_ENV,
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    env_from = pods.env_from([spec.model.secretRef])
    volumes = [pods.CACHE_VOLUME, *pvc_volumes]
    mounts = [pods.CACHE_MOUNT, *pvc_mounts]
    template_labels = pod_labels(LLMDEPLOYMENT_LABEL, dep.metadata.name, COMPONENT)

    def container(
        name: str,
        resources: dict[str, Any],
        ports: list[dict[str, Any]],
        env: list[dict[str, Any]] = env,
    ):
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
                [*pods.HEAD_PORTS, pods.SERVE_CONTAINER_PORT],
            ),
            volumes=volumes,
            settings=settings,
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
                [pods.SERVE_CONTAINER_PORT],
                replica_env,
            ),
            volumes=volumes,
            settings=settings,
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
        # KubeRay adds the autoscaler as a second container of the head pod, with the
        # securityContext and extra mounts given here (PodSecurity "restricted" checks it
        # too); it scales worker pods through the Kubernetes API, with the token of the
        # ServiceAccount KubeRay gives the head pod.
        cluster["autoscalerOptions"] = security.autoscaler_options(
            settings.ray_fixed_user, settings.ray_read_only_root_filesystem
        )
        head["template"]["spec"]["automountServiceAccountToken"] = True
    if settings.ray_auth_mode != "disabled":
        cluster["authOptions"] = {"mode": settings.ray_auth_mode}
    user_config = ServeUserConfig(adapters=list(adapters))
    spec = {"serveConfigV2": serve_config(args, user_config), "rayClusterConfig": cluster}
    metadata = owner.metadata(
        ray_name(dep.metadata.name), labels(LLMDEPLOYMENT_LABEL, dep.metadata.name, COMPONENT)
    )
    metadata["annotations"] = {SPEC_HASH: spec_hash(spec)}
    # No object shared between pod templates: callers may edit one group safely.
    return copy.deepcopy(
        {
            "apiVersion": RAYSERVICES.api_version,
            "kind": RAYSERVICES.kind,
            "metadata": metadata,
            "spec": spec,
        }
    )


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
