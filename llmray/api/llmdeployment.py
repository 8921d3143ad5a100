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

KIND = "LLMDeployment"
PLURAL = "llmdeployments"  # e.g. kubectl get llmdeployments
SHORT_NAME = "llmd"

Engine = Literal["auto", "transformers", "vllm"]
Phase = Literal["Pending", "WaitingForModel", "Deploying", "Ready", "Failed"]


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
    servedName: str | None = Field(
        default=None,
        max_length=NAME_MAX_LENGTH,
        description="Model id in /v1/models and requests; default metadata.name.",
    )
    secretRef: SecretRef | None = Field(
        default=None, description="Secret with credentials for the model source."
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
        default=256, ge=1, description="Default and upper bound of max_tokens per request."
    )
    maxPromptTokens: int = Field(
        default=2048, ge=1, description="Longer prompts are rejected with HTTP 400."
    )
    temperature: float = Field(default=0.7, ge=0, le=2, description="Default temperature.")
    topP: float = Field(default=0.95, gt=0, le=1, description="Default nucleus sampling top_p.")


class LLMDeploymentSpec(Model):
    """What to serve, on what, how many replicas."""

    model: ModelSpec = Field(description="The model served.")
    engine: Engine = Field(
        default="auto",
        description="auto (vllm on nvidia-gpu when installed, else transformers), "
        "transformers or vllm.",
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
    apiKeySecretRef: SecretKeyRef | None = Field(
        default=None, description="Require this bearer token (a Secret key) on every request."
    )
    image: str = Field(
        default="",
        max_length=IMAGE_MAX_LENGTH,
        description="Server image override; empty: the default.",
    )


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


class LLMDeployment(Model):
    """A served model: `kubectl apply` it, or `llmray serve FILE.yaml` locally."""

    apiVersion: Literal["llmray.io/v1alpha1"] = API_VERSION
    kind: Literal["LLMDeployment"] = KIND
    metadata: ObjectMeta
    spec: LLMDeploymentSpec
    status: LLMDeploymentStatus | None = None
