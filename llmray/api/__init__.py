"""The llmray.io/v1alpha1 API: spec and status models, validation, YAML loading.

Importable without kopf, kubernetes, torch or ray.
"""

from llmray.api.common import API_VERSION, GROUP, VERSION
from llmray.api.finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from llmray.api.llmdeployment import LLMDeployment, LLMDeploymentSpec, LLMDeploymentStatus
from llmray.api.loader import load_resource, parse_resource
from llmray.api.validation import FieldError, SpecError, parse_finetunejob, parse_llmdeployment

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "FieldError",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "LLMDeployment",
    "LLMDeploymentSpec",
    "LLMDeploymentStatus",
    "SpecError",
    "load_resource",
    "parse_finetunejob",
    "parse_llmdeployment",
    "parse_resource",
]
