"""Read FineTuneJob / LLMDeployment YAML files, as `kubectl apply -f` would take them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llmray.api.finetunejob import FineTuneJob
from llmray.api.llmdeployment import LLMDeployment
from llmray.api.validation import FieldError, SpecError, parse_finetunejob, parse_llmdeployment

Resource = FineTuneJob | LLMDeployment


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError([FieldError("(file)", f"cannot read: {exc.strerror}")], str(path)) from exc
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError([FieldError("(file)", f"not valid YAML: {exc}")], str(path)) from exc
    return docs


def parse_resource(obj: Any, source: str = "") -> Resource:
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind == "FineTuneJob":
        return parse_finetunejob(obj, source)
    if kind == "LLMDeployment":
        return parse_llmdeployment(obj, source)
    raise SpecError([FieldError("kind", "must be one of FineTuneJob, LLMDeployment")], source)


def load_resource(path: str | Path, kind: str | None = None) -> Resource:
    """The one resource in `path` (of `kind`, when the file holds several documents)."""
    docs = load_documents(path)
    if kind is not None:
        docs = [d for d in docs if isinstance(d, dict) and d.get("kind") == kind]
    if len(docs) != 1:
        what = kind or "resource"
        raise SpecError(
            [FieldError("(file)", f"expected exactly one {what}, found {len(docs)}")], str(path)
        )
    return parse_resource(docs[0], str(path))
