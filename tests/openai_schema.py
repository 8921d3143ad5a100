"""OpenAI's published OpenAPI description as JSON Schema validators, for tests.

Read from the shared reference folder beside the checkout (`../shared/openai-openapi/`, as
CI's clone has it; LLMRAY_OPENAI_OPENAPI names another file), never copied into the project.
Its schemas are OpenAPI 3.1 with OpenAPI 3.0's `nullable: true` still in 111 places: that
becomes "or null".
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

SPEC = Path(
    os.environ.get("LLMRAY_OPENAI_OPENAPI")
    or Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.yaml"
)


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        return {"anyOf": [node, {"type": "null"}]}
    return node


@functools.cache
def _components() -> dict[str, Any]:
    if not SPEC.is_file():
        pytest.skip(
            f"OpenAI's OpenAPI description is not at {SPEC} (the shared reference folder beside "
            "the checkout; set LLMRAY_OPENAI_OPENAPI to its openapi.yaml)"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open() as f:
        spec = yaml.load(f, Loader=loader)
    return {"components": {"schemas": _nullable(spec["components"]["schemas"])}}


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless `instance` is a valid OpenAI `schema_name`."""
    import jsonschema

    root = _components()
    schema = {**root, "$ref": f"#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema).validate(instance)
