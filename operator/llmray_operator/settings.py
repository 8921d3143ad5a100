"""Operator settings, read once from the environment (the Helm chart sets them).

Builders take a `Settings` argument instead of reading the environment, so they stay pure.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmray import __version__
from llmray.hardware import Profile

# Default images: <repo>/<component>:<version><suffix>, e.g. ghcr.io/llmray/trainer:0.1.0-gpu
# (the tags `make images` builds; the chart's image values override them).
DEFAULT_IMAGE_REPO = "ghcr.io/llmray"
DEFAULT_TAG = __version__
# Tag suffix of each hardware variant (an `Images` field), e.g. nvidia -> trainer:0.1.0-gpu.
VARIANT_SUFFIX = {"cpu": "", "nvidia": "-gpu", "intel": "-intel", "xpu": "-xpu"}


# Setting -> its variable (the chart's Deployment sets them; `llmray render --setting` too).
SCALAR_ENV = {
    "image_pull_policy": "LLMRAY_IMAGE_PULL_POLICY",
    "ray_version": "LLMRAY_RAY_VERSION",
    "default_storage_uri": "LLMRAY_DEFAULT_STORAGE_URI",
    "head_cpu": "LLMRAY_HEAD_CPU",
    "head_memory": "LLMRAY_HEAD_MEMORY",
    "ttl_seconds_after_finished": "LLMRAY_TTL_SECONDS_AFTER_FINISHED",
    "ray_auth_mode": "LLMRAY_RAY_AUTH_MODE",
    "cluster_domain": "LLMRAY_CLUSTER_DOMAIN",
    "serve_ingress": "LLMRAY_SERVE_INGRESS",
    "resync_seconds": "LLMRAY_RESYNC_SECONDS",
    "progress_seconds": "LLMRAY_PROGRESS_SECONDS",
    "ray_service_account": "LLMRAY_RAY_SERVICE_ACCOUNT",
    "ray_fixed_user": "LLMRAY_RAY_FIXED_USER",
    "ray_read_only_root_filesystem": "LLMRAY_RAY_READ_ONLY_ROOT_FILESYSTEM",
    "allow_tolerations": "LLMRAY_ALLOW_TOLERATIONS",
}
# Settings given as comma-separated lists.
LIST_ENV = {
    "ray_image_pull_secrets": "LLMRAY_RAY_IMAGE_PULL_SECRETS",
    "allowed_image_prefixes": "LLMRAY_ALLOWED_IMAGE_PREFIXES",
}
IMAGE_ENV = tuple(
    f"LLMRAY_{kind}_IMAGE{suffix}"
    for kind in ("TRAINER", "SERVER")
    for suffix in ("", "_NVIDIA", "_INTEL", "_XPU")
)
ENV_NAMES = (*IMAGE_ENV, *SCALAR_ENV.values(), *LIST_ENV.values())


class Images(BaseModel):
    """One image per hardware variant: CPU, NVIDIA (CUDA), Intel on Xeons (IPEX CPU build) and
    Intel GPUs (XPU build with Intel's GPU runtime)."""

    model_config = ConfigDict(frozen=True)

    cpu: str
    nvidia: str
    intel: str
    xpu: str

    @classmethod
    def default(cls, component: str) -> Images:
        """The images of `component` (trainer, server) at this version, one per variant."""
        base = f"{DEFAULT_IMAGE_REPO}/{component}:{DEFAULT_TAG}"
        return cls(**{variant: base + suffix for variant, suffix in VARIANT_SUFFIX.items()})

    def of(self, hw: Profile) -> str:
        """The image of an accelerator profile's variant (llmray.hardware)."""
        return str(getattr(self, hw.variant))


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    trainer_images: Images = Images.default("trainer")
    server_images: Images = Images.default("server")
    image_pull_policy: str = "IfNotPresent"
    ray_version: str = "2.60.0"
    # Checkpoints and the final model of jobs that set neither checkpointing.storageUri nor
    # output.uri: pods need shared storage (s3://, gs:// or pvc://). Empty: such jobs fail
    # with InvalidSpec naming spec.checkpointing.storageUri.
    default_storage_uri: str = ""
    # The head runs the driver (data checks, progress) and Ray's control plane, no training.
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    # How long a finished job's Ray cluster stays up (logs, dashboard) before KubeRay deletes it.
    ttl_seconds_after_finished: int = Field(default=600, ge=0)
    # Ray token authentication on every cluster (dashboard, GCS, job submission): KubeRay
    # generates the token Secret; the operator never needs it (progress comes from pod logs).
    ray_auth_mode: str = "token"
    cluster_domain: str = "cluster.local"
    # Every Ray pod's ServiceAccount (e.g. with workload identity for S3 / GCS); empty: the
    # namespace's default.
    ray_service_account: str = ""
    # Secrets (in each job's namespace) for pulling the trainer and server images.
    ray_image_pull_secrets: tuple[str, ...] = ()
    # Ray pods run as the Ray images' user (uid 1000, gid 100, fsGroup 100); False leaves
    # runAsUser / runAsGroup / fsGroup to the cluster (OpenShift's restricted-v2 assigns them).
    ray_fixed_user: bool = True
    # Ray pods' root file system read-only (they write to emptyDirs: /tmp, ~/.cache, /dev/shm);
    # False for an image (spec.image) that writes elsewhere.
    ray_read_only_root_filesystem: bool = True
    # Image prefixes a FineTuneJob's / LLMDeployment's spec.image must start with, e.g.
    # ("registry.example.com/ml/",); empty: any image. End each with "/" (a bare
    # "registry.example.com/ml" would also allow "registry.example.com/ml-other/...").
    allowed_image_prefixes: tuple[str, ...] = ()
    # spec.compute.tolerations allowed (they let pods onto tainted, e.g. reserved, nodes).
    allow_tolerations: bool = True
    # What listens on port 8000 of a serving cluster's pods: Ray's HAProxy ingress, which
    # forwards a request straight to a replica's own HTTP server (Ray's high-throughput mode),
    # or Ray's Python proxy (the path before Ray 2.55; no HAProxy binary needed in the image).
    serve_ingress: Literal["haproxy", "proxy"] = "haproxy"
    # Level-based safety net: every object is reconciled at least this often.
    resync_seconds: float = Field(default=60, gt=0)
    # How often a running job's trainer progress is read from its submitter pod's log.
    progress_seconds: float = Field(default=15, gt=0)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """LLMRAY_* variables; unset or empty ones keep the defaults above."""

        def get(name: str) -> str | None:
            return env.get(name) or None

        base = cls()
        images = {}
        for kind, prefix in (("trainer_images", "TRAINER"), ("server_images", "SERVER")):
            default: Images = getattr(base, kind)
            images[kind] = Images(
                cpu=get(f"LLMRAY_{prefix}_IMAGE") or default.cpu,
                nvidia=get(f"LLMRAY_{prefix}_IMAGE_NVIDIA") or default.nvidia,
                intel=get(f"LLMRAY_{prefix}_IMAGE_INTEL") or default.intel,
                xpu=get(f"LLMRAY_{prefix}_IMAGE_XPU") or default.xpu,
            )
        scalars = SCALAR_ENV
        values: dict = {key: get(var) for key, var in scalars.items()}
        for key, var in LIST_ENV.items():
            listed = get(var)  # comma-separated
            if listed:
                values[key] = tuple(item.strip() for item in listed.split(",") if item.strip())
        return cls(**images, **{k: v for k, v in values.items() if v is not None})
