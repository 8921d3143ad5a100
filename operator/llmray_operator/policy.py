"""What a CR author may ask of the pods the operator creates, as the operator's settings
bound it (pure). Creating a FineTuneJob or LLMDeployment is creating pods in that namespace
by another route (docs/operator.md says what that allows); these checks narrow it:

    spec.image                 only under LLMRAY_ALLOWED_IMAGE_PREFIXES, when set
    spec.compute.tolerations   only with LLMRAY_ALLOW_TOLERATIONS (default true)
    spec.env                   never one of the variables the operator sets itself
"""

from __future__ import annotations

from collections.abc import Iterable

from llmray.api.common import EnvVar, Toleration
from llmray.api.validation import FieldError
from llmray_operator.settings import Settings


def image_errors(image: str, settings: Settings) -> list[FieldError]:
    """A spec.image outside the allowed prefixes (the operator's own defaults are trusted)."""
    allowed = settings.allowed_image_prefixes
    if not image or not allowed or image.startswith(allowed):
        return []
    return [
        FieldError(
            "spec.image",
            f"{image} is not allowed by this operator: images must start with "
            + " or ".join(allowed),
        )
    ]


def toleration_errors(tolerations: list[Toleration], settings: Settings) -> list[FieldError]:
    if not tolerations or settings.allow_tolerations:
        return []
    return [
        FieldError(
            "spec.compute.tolerations",
            "not allowed by this operator (installed with policy.allowTolerations false)",
        )
    ]


def env_errors(env: list[EnvVar], reserved: Iterable[str]) -> list[FieldError]:
    """spec.env entries that would override a variable the operator sets in the pods."""
    own = set(reserved)
    return [
        FieldError(
            f"spec.env[{i}].name",
            f"{var.name} is set by the operator (its own variables: {', '.join(sorted(own))})",
        )
        for i, var in enumerate(env)
        if var.name in own
    ]
