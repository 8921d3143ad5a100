"""LLMDeployment (short name `llmd`): serve a model over an OpenAI-compatible API."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from llmray.api.common import (
    API_VERSION,
    CONDITIONS_LIST_MAP,
    IMAGE_MAX_LENGTH,
    NAME_MAX_LENGTH,
    TOLERATIONS_MAX_ITEMS,
    Accelerator,
    Condition,
    Model,
    NodeSelector,
    ObjectMeta,
    Resources,
    SecretKeyRef,
    SecretRef,
    Toleration,
    Uri,
)
from llmray.precision import DTYPE_DEFAULT, Dtype

KIND = "LLMDeployment"
PLURAL = "llmdeployments"  # e.g. kubectl get llmdeployments
SHORT_NAME = "llmd"

Engine = Literal["auto", "transformers", "vllm"]

# Generation defaults: spec.generation's, and those of the server's arguments and of the OpenAI
# ingress (llmray/serve_args.py, serve_image/llmray_serve/ingress.py), which read them here.
MAX_NEW_TOKENS = 256  # generation: {maxNewTokens: 256}: default and upper bound of max_tokens
MAX_PROMPT_TOKENS = 2048  # generation: {maxPromptTokens: 2048}: longer prompts get a 400
TEMPERATURE = 0.7  # generation: {temperature: 0.7}: when a request sends none
TOP_P = 0.95  # generation: {topP: 0.95}: when a request sends none
Phase = Literal["Pending", "WaitingForModel", "Deploying", "Ready", "Failed"]

# Adapters (spec.adapters): names are model ids in requests, e.g. "support-v3".
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$"
ADAPTER_NAME_MAX_LENGTH = 128
ADAPTERS_MAX_ITEMS = 128
MAX_LOADED_ADAPTERS = 8  # maxLoadedAdapters: 8, when the spec has adapters and sets none
# vLLM's max_lora_rank takes these values only (vllm.config.lora.MaxLoRARanks).
ADAPTER_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_ADAPTER_RANK = 16  # maxAdapterRank: 16, vLLM's default


class FineTuneJobRef(Model):
    """A FineTuneJob in the same namespace."""

    name: str = Field(
        description="Name of the FineTuneJob whose model is served.",
        min_length=1,
        max_length=NAME_MAX_LENGTH,
    )


class ModelSpec(Model):
    """What is served: exactly one of uri and fineTuneJobRef."""

    uri: Uri | None = Field(
        default=None,
        description="Model in Hugging Face format: hf://, s3://, gs://, pvc://, file:// or a path.",
    )
    fineTuneJobRef: FineTuneJobRef | None = Field(
        default=None,
        description="Serve what this FineTuneJob produced (its status.model.uri) once it "
        "Succeeded; until then the phase is WaitingForModel.",
    )
    minEvaluation: dict[str, float] | None = Field(
        default=None,
        max_length=16,
        description="Serve the job's model only if its status.evaluation scores reach these "
        "values, e.g. {exactMatch: 0.4} (fineTuneJobRef only); below: phase Failed, reason "
        "BelowMinEvaluation.",
    )
    servedName: str | None = Field(
        default=None,
        max_length=NAME_MAX_LENGTH,
        description="Model id in /v1/models and requests; default metadata.name.",
    )
    secretRef: SecretRef | None = Field(
        default=None, description="Secret with credentials for the model source."
    )


class AdapterSpec(Model):
    """A LoRA adapter served on the deployment's model: exactly one of uri and fineTuneJobRef."""

    name: str = Field(
        description="Model id of the adapter in /v1/models and requests, e.g. support-v3.",
        min_length=1,
        max_length=ADAPTER_NAME_MAX_LENGTH,
        pattern=ADAPTER_NAME_PATTERN,
    )
    uri: Uri | None = Field(
        default=None,
        description="The adapter in PEFT format (adapter_config.json, adapter_model.safetensors): "
        "hf://, s3://, gs://, pvc://, file:// or a path. Read with spec.model.secretRef.",
    )
    fineTuneJobRef: FineTuneJobRef | None = Field(
        default=None,
        description="Serve the adapter this FineTuneJob produced (method lora or qlora, "
        "output.mergeLora false) once it Succeeded; until then the adapter is not listed and "
        "requests for it get 404 saying why.",
    )
    minEvaluation: dict[str, float] | None = Field(
        default=None,
        max_length=16,
        description="Serve the job's adapter only if its status.evaluation scores reach these "
        "values, e.g. {answer: 0.3} (fineTuneJobRef only).",
    )


class ComputeSpec(Model):
    """Hardware of each server replica."""

    accelerator: Accelerator = Field(default="cpu", description="cpu, nvidia-gpu or intel-gpu.")
    ipex: bool = Field(
        default=False, description="Use Intel Extension for PyTorch (cpu or intel-gpu)."
    )
    resourcesPerReplica: Resources = Field(
        default_factory=Resources, description="Resources of each replica."
    )
    nodeSelector: NodeSelector = Field(
        default_factory=dict, description="Node labels the replica pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=TOLERATIONS_MAX_ITEMS,
        description="Tolerations of the replica pods.",
    )


class Scaling(Model):
    """Ray Serve autoscaling of the model replicas."""

    minReplicas: int = Field(default=1, ge=0, description="Fewest replicas.")
    maxReplicas: int = Field(default=1, ge=1, description="Most replicas.")
    targetOngoingRequests: float = Field(
        default=2, gt=0, description="Ongoing requests per replica the autoscaler aims at."
    )


class Generation(Model):
    """Defaults and limits for generation requests."""

    maxNewTokens: int = Field(
        default=MAX_NEW_TOKENS,
        ge=1,
        description="Default and upper bound of max_tokens per request.",
    )
    maxPromptTokens: int = Field(
        default=MAX_PROMPT_TOKENS, ge=1, description="Longer prompts are rejected with HTTP 400."
    )
    temperature: float = Field(default=TEMPERATURE, ge=0, le=2, description="Default temperature.")
    topP: float = Field(default=TOP_P, gt=0, le=1, description="Default nucleus sampling top_p.")


class LLMDeploymentSpec(Model):
    """What to serve, on what, how many replicas."""

    model: ModelSpec = Field(description="The model served.")
    engine: Engine = Field(
        default="auto",
        description="auto (vllm on nvidia-gpu when installed, else transformers), "
        "transformers or vllm.",
    )
    dtype: Dtype = Field(
        default=DTYPE_DEFAULT,
        description="Precision of the served weights and activations: auto, float32, "
        "bfloat16 or float16. auto: bfloat16 on GPUs and on CPUs with native bf16 (AMX or "
        "AVX-512 BF16, detected on the replica's node), else float32 (bf16 is emulated, "
        "10-20x slower, there). /v1/models and the server's log say which one runs.",
    )
    compileDecode: bool = Field(
        default=False,
        description="transformers engine on CPU, float32: run a one-request decode step as "
        "one torch.compile graph (inductor's C++ matrix kernels), ~1.4x the single-stream "
        "tokens/s on SmolLM2-135M. A replica starts about 40 s later (it compiles before it "
        "is ready) and holds a second, packed copy of the linear weights. Llama-family "
        "models without sliding-window attention and without adapters; others, and a "
        "replica without a C++ compiler, run eagerly, with a warning in the log. "
        "vllm: ignored.",
    )
    compute: ComputeSpec = Field(default_factory=ComputeSpec, description="Replica hardware.")
    scaling: Scaling = Field(default_factory=Scaling, description="Replica autoscaling.")
    maxOngoingRequests: int = Field(
        default=16,
        ge=1,
        description="Requests one replica holds at once (decoding together, or waiting for a "
        "place in the batch); the next one gets 503 at once, with Retry-After.",
    )
    generation: Generation = Field(
        default_factory=Generation, description="Generation defaults and limits."
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=ADAPTERS_MAX_ITEMS,
        description="LoRA adapters served on spec.model, each under its own name. Adding, "
        "removing or changing one updates the running replicas in place (no restart).",
    )
    maxLoadedAdapters: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Adapters held in memory per replica (least recently used ones are "
        f"unloaded); default {MAX_LOADED_ADAPTERS} when spec.adapters is set. Setting it keeps "
        "adapter support on while the list is empty (adding the first adapter to a deployment "
        "without either restarts its replicas once). vLLM: max_loras.",
    )
    maxAdapterRank: Literal[ADAPTER_RANKS] = Field(  # type: ignore[valid-type]
        default=MAX_ADAPTER_RANK,
        description="Highest LoRA rank (r) of an adapter served; vLLM reserves memory for it "
        "(max_lora_rank: 1, 8, 16, 32, 64, 128, 256, 320 or 512). An adapter of a higher rank "
        "is refused.",
    )
    apiKeySecretRef: SecretKeyRef | None = Field(
        default=None, description="Require this bearer token (a Secret key) on every request."
    )
    image: str = Field(
        default="",
        max_length=IMAGE_MAX_LENGTH,
        description="Server image override; empty: the default.",
    )


class AdapterStatus(Model):
    """One adapter of spec.adapters as the operator last saw it."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    name: str = Field(description="The adapter's name.")
    ready: bool = Field(default=False, description="Listed and served.")
    uri: str = Field(default="", description="Where the replicas read it from.")
    reason: str = Field(default="", description="CamelCase reason when not ready.")
    message: str = Field(default="", description="Why it is not ready.")


class LLMDeploymentStatus(Model):
    """Observed state, written by the operator."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    phase: Phase = Field(
        default="Pending", description="Pending, WaitingForModel, Deploying, Ready or Failed."
    )
    conditions: list[Condition] = Field(
        default_factory=list, description="Conditions.", json_schema_extra=CONDITIONS_LIST_MAP
    )
    observedGeneration: int = Field(default=0, description="Generation last reconciled.")
    rayServiceName: str = Field(default="", description="The RayService serving the model.")
    modelUri: str = Field(default="", description="The model URI being served.")
    endpoint: str = Field(default="", description="OpenAI-compatible base URL (…/v1).")
    adapters: list[AdapterStatus] = Field(
        default_factory=list, description="The adapters of spec.adapters, ready or why not."
    )


class LLMDeployment(Model):
    """A served model: `kubectl apply` it, or `llmray serve FILE.yaml` locally."""

    apiVersion: Literal["llmray.io/v1alpha1"] = API_VERSION
    kind: Literal["LLMDeployment"] = KIND
    metadata: ObjectMeta
    spec: LLMDeploymentSpec
    status: LLMDeploymentStatus | None = None
