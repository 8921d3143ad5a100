"""Building blocks shared by both custom resources.

Every model here is the single source of truth for the CRD schema (see `llmray.crdgen`):
field descriptions become `kubectl explain` text, defaults become CRD defaults. Import
nothing heavy (no kopf, kubernetes, torch, ray): the operator, trainer and server all read
these models.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from llmray.api.quantity import PATTERN as QUANTITY_PATTERN
from llmray.api.quantity import parse_quantity

GROUP = "llmray.io"  # e.g. apiVersion: llmray.io/v1alpha1
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# hf://ORG/NAME, s3://BUCKET/KEY, gs://BUCKET/KEY, pvc://CLAIM/PATH, file:///PATH, or a plain
# path (absolute, or relative to the YAML file's folder when run locally).
URI_SCHEMES = ("hf", "s3", "gs", "pvc", "file")
URI_PATTERN = r"^((hf|s3|gs|pvc)://[^/\s]+(/\S*)?|file:///\S*|[^:\s]+)$"
_URI_RE = re.compile(URI_PATTERN)

# Upper bounds on strings, lists and maps. Besides catching mistakes early, they let the
# apiserver estimate the cost of CEL rules: an unbounded string or list is priced as if it
# filled a whole 3 MB request, and a CRD whose rules exceed the cost budget is rejected.
NAME_MAX_LENGTH = 253  # a DNS subdomain, e.g. a Secret name
URI_MAX_LENGTH = 2048
LABEL_VALUE_MAX_LENGTH = 63
SELECTOR_MAX_LABELS = 64  # entries of a nodeSelector
TOLERATIONS_MAX_ITEMS = 64
ENV_MAX_ITEMS = 256
ENV_VALUE_MAX_LENGTH = 32768
IMAGE_MAX_LENGTH = 1024
# status.conditions is keyed by type, as metav1.Condition (+listType=map +listMapKey=type).
CONDITIONS_LIST_MAP: dict[str, Any] = {
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
}


def _check_uri(value: str) -> str:
    if not _URI_RE.match(value):
        raise ValueError(
            "must be a path or a URI with one of the schemes "
            + ", ".join(f"{s}://" for s in URI_SCHEMES)
        )
    return value


def _check_quantity(value: int | str) -> int | str:
    try:
        parse_quantity(value)
    except ValueError:
        raise ValueError('must be a Kubernetes quantity such as "8", "500m" or "48Gi"') from None
    return value


Uri = Annotated[
    str,
    AfterValidator(_check_uri),
    Field(max_length=URI_MAX_LENGTH, json_schema_extra={"pattern": URI_PATTERN}),
]
Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
# Node labels to match, e.g. {"llmray.io/memory-class": "large"}.
NodeSelector = Annotated[
    dict[str, Annotated[str, Field(max_length=LABEL_VALUE_MAX_LENGTH)]],
    Field(max_length=SELECTOR_MAX_LABELS),
]
Accelerator = Literal["cpu", "nvidia-gpu", "intel-gpu"]


class Model(BaseModel):
    """Base for every spec model: camelCase names in YAML, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SecretRef(Model):
    """A Secret in the same namespace; its keys become environment variables of the pods."""

    name: str = Field(
        description="Name of a Secret in the resource's namespace.",
        min_length=1,
        max_length=NAME_MAX_LENGTH,
    )


class SecretKeyRef(Model):
    """One key of a Secret in the same namespace."""

    name: str = Field(
        description="Name of a Secret in the resource's namespace.",
        min_length=1,
        max_length=NAME_MAX_LENGTH,
    )
    key: str = Field(
        default="key",
        max_length=NAME_MAX_LENGTH,
        description="Key inside the Secret holding the value.",
    )


class Resources(Model):
    """Resources requested for each Ray worker pod (or server replica)."""

    cpu: Quantity = Field(default=1, description='CPU cores, a quantity such as 8 or "500m".')
    memory: Quantity | None = Field(
        default=None, description='Memory, a quantity such as "48Gi". Unset: no memory request.'
    )
    gpu: int = Field(
        default=0,
        ge=0,
        description="Accelerators per pod (nvidia.com/gpu or gpu.intel.com/i915, from the "
        "accelerator).",
    )


class Toleration(Model):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(
        # A qualified name: a 253-character DNS prefix, "/", a 63-character name.
        default=None,
        max_length=317,
        description="Taint key the toleration applies to.",
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None,
        description="Exists or Equal (default Equal). Exists without a key tolerates every taint.",
    )
    value: str | None = Field(
        default=None, max_length=LABEL_VALUE_MAX_LENGTH, description="Taint value to match."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all."
    )
    tolerationSeconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


class _KeySelector(Model):
    name: str = Field(min_length=1, max_length=NAME_MAX_LENGTH, description="Its name.")
    key: str = Field(min_length=1, max_length=NAME_MAX_LENGTH, description="The key to read.")
    optional: bool | None = Field(
        default=None, description="Start the pod even when it (or the key) does not exist."
    )


class SecretKeySelector(_KeySelector):
    """One key of a Secret in the resource's namespace (core/v1 SecretKeySelector)."""


class ConfigMapKeySelector(_KeySelector):
    """One key of a ConfigMap in the resource's namespace (core/v1 ConfigMapKeySelector)."""


class ObjectFieldSelector(Model):
    """A field of the pod itself (core/v1 ObjectFieldSelector)."""

    fieldPath: str = Field(
        max_length=256,
        description="e.g. metadata.name, metadata.namespace, status.podIP, spec.nodeName.",
    )
    apiVersion: str | None = Field(
        default=None, max_length=64, description="Version of fieldPath's schema; default v1."
    )


class ResourceFieldSelector(Model):
    """A resource limit or request of a container (core/v1 ResourceFieldSelector)."""

    resource: str = Field(
        max_length=64, description="e.g. limits.cpu, requests.memory, limits.ephemeral-storage."
    )
    containerName: str | None = Field(
        default=None, max_length=63, description="The container; default this one."
    )
    divisor: Quantity | None = Field(
        default=None, description='Unit of the value, e.g. "1Mi" for memory in MiB; default 1.'
    )


ENV_SOURCES = ("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef")


class EnvVarSource(Model):
    """Where a variable's value comes from: exactly one of the four (core/v1 EnvVarSource)."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        # The apiserver's form of "exactly one": nulls are pruned before this is checked.
        json_schema_extra={"minProperties": 1, "maxProperties": 1},
    )

    secretKeyRef: SecretKeySelector | None = Field(
        default=None, description="A key of a Secret in the same namespace."
    )
    configMapKeyRef: ConfigMapKeySelector | None = Field(
        default=None, description="A key of a ConfigMap in the same namespace."
    )
    fieldRef: ObjectFieldSelector | None = Field(
        default=None, description="A field of the pod (its name, namespace, IP, node)."
    )
    resourceFieldRef: ResourceFieldSelector | None = Field(
        default=None, description="A resource limit or request of the container."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        if sum(getattr(self, name) is not None for name in ENV_SOURCES) != 1:
            raise ValueError("set exactly one of " + ", ".join(ENV_SOURCES))
        return self


class EnvVar(Model):
    """An environment variable (core/v1 EnvVar): a literal value, or valueFrom a Secret, a
    ConfigMap, the pod's own fields or the container's resources; not both."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        # name + value or name + valueFrom: with three fields, "not both" is at most two.
        json_schema_extra={"maxProperties": 2},
    )

    name: str = Field(description="Variable name.", min_length=1, max_length=NAME_MAX_LENGTH)
    value: str | None = Field(
        default=None, max_length=ENV_VALUE_MAX_LENGTH, description="Literal value."
    )
    valueFrom: EnvVarSource | None = Field(
        default=None, description="Where the value comes from, instead of value."
    )

    @model_validator(mode="after")
    def _value_or_value_from(self) -> EnvVar:
        if self.value is not None and self.valueFrom is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


class Condition(Model):
    """A status condition in the metav1.Condition shape."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    type: str = Field(description="Condition type, e.g. Ready, Succeeded, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason, e.g. InvalidSpec.")
    message: str = Field(default="", description="Human-readable detail.")
    lastTransitionTime: str = Field(default="", description="RFC 3339 time of the last change.")
    observedGeneration: int = Field(default=0, description="metadata.generation it reflects.")


def condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of `type_` in a status's conditions, if there is one."""
    return next((c for c in conditions if c.type == type_), None)


class ObjectMeta(BaseModel):
    """The part of metadata the CLI and the validators read; the rest passes through."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=63,
        description="DNS-1123 label: lowercase letters, digits and '-'.",
    )
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
