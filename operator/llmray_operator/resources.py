"""The API resources the operator reads and writes, each named once: group, version, plural,
kind. Pure (builders read `api_version` / `kind` from here, kopf and the API client the rest).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmray.api import finetunejob, llmdeployment
from llmray.api.common import GROUP, VERSION

# KubeRay's API, e.g. apiVersion: ray.io/v1 (KubeRay 1.7, third_party/kuberay-crds/).
KUBERAY_GROUP = "ray.io"
KUBERAY_VERSION = "v1"


@dataclass(frozen=True)
class Resource:
    group: str  # e.g. "ray.io"; "" for the core API
    version: str  # e.g. "v1"
    plural: str  # e.g. "rayjobs", as in the URL /apis/ray.io/v1/namespaces/ml/rayjobs
    kind: str  # e.g. "RayJob"

    @property
    def api_version(self) -> str:
        """e.g. "ray.io/v1", or "v1" for the core API."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def gvr(self) -> tuple[str, str, str]:
        """(group, version, plural), as kopf's handler decorators take it."""
        return (self.group, self.version, self.plural)


FINETUNEJOBS = Resource(GROUP, VERSION, finetunejob.PLURAL, finetunejob.KIND)
LLMDEPLOYMENTS = Resource(GROUP, VERSION, llmdeployment.PLURAL, llmdeployment.KIND)
RAYJOBS = Resource(KUBERAY_GROUP, KUBERAY_VERSION, "rayjobs", "RayJob")
RAYSERVICES = Resource(KUBERAY_GROUP, KUBERAY_VERSION, "rayservices", "RayService")
CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
PODS = Resource("", "v1", "pods", "Pod")
EVENTS = Resource("", "v1", "events", "Event")
# The children the operator creates, by the `kind` of a built object.
CHILDREN = {r.kind: r for r in (CONFIGMAPS, RAYJOBS, RAYSERVICES)}
