"""What an operator test's emulated cluster serves: our CRDs and KubeRay's, and the resource
paths the emulator's helpers take (``kube.get_object(RAYJOBS, ns, name)``)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CRDS = [
    REPO / "crds" / "llmray.io_finetunejobs.yaml",
    REPO / "crds" / "llmray.io_llmdeployments.yaml",
    REPO / "third_party" / "kuberay-crds" / "ray.io_rayjobs.yaml",
    REPO / "third_party" / "kuberay-crds" / "ray.io_rayservices.yaml",
]
FTJ = "llmray.io/v1alpha1/finetunejobs"
LLMD = "llmray.io/v1alpha1/llmdeployments"
RAYJOBS = "ray.io/v1/rayjobs"
RAYSERVICES = "ray.io/v1/rayservices"
CONFIGMAPS = "v1/configmaps"
EVENTS = "v1/events"
