"""spec.adapters resolved for a run: where each adapter is, or why it is not served yet (pure).

The operator resolves a `fineTuneJobRef` from the FineTuneJob's status on the cluster,
`llmray serve` from the status.json `llmray finetune` wrote; both with this function, so an
adapter is ready (or not, for the same reason) in both places:

    support-v3   fineTuneJobRef support-v3, Succeeded, an adapter of this model  -> ready
    legal        uri s3://bucket/adapters/legal                                  -> ready
    next-week    fineTuneJobRef next-week, Running                               -> not ready:
                 FineTuneJobRunning "FineTuneJob next-week is Running: ..."

A ready adapter's base is checked where it can be known: the job's status.model.baseModel
against the deployment's model. (An adapter given by `uri` is checked by the replica that
loads it: its weights must fit the model.)
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Mapping
from typing import Any

from llmray.api.finetunejob import FineTuneJobStatus
from llmray.api.llmdeployment import AdapterSpec, LLMDeployment
from llmray.serve_args import AdapterArgs

# Reasons an adapter is not served (AdapterArgs.reason, status.adapters[].reason).
NOT_FOUND = "FineTuneJobNotFound"
FAILED = "FineTuneJobFailed"
NOT_AN_ADAPTER = "NotAnAdapter"
BASE_MISMATCH = "AdapterBaseMismatch"
NO_SCORE = "EvaluationMissing"
BELOW_MIN = "BelowMinEvaluation"


def resolve_adapters(
    dep: LLMDeployment,
    jobs: Mapping[str, dict[str, Any] | None],
    model_uri: str,
    base_dir: str = "/",
) -> list[AdapterArgs]:
    """Every adapter of `dep` in spec order. `jobs`: the status (as stored) of each FineTuneJob
    an adapter references, None when there is no such job; `model_uri`: the deployment's model
    (relative paths are relative to `base_dir`, as in ServeArgs), "" while it is not known."""
    return [_resolve(a, jobs, model_uri, base_dir) for a in dep.spec.adapters]


def _resolve(
    adapter: AdapterSpec,
    jobs: Mapping[str, dict[str, Any] | None],
    model_uri: str,
    base_dir: str,
) -> AdapterArgs:
    name = adapter.name
    if adapter.uri is not None:
        return AdapterArgs(name=name, uri=adapter.uri)
    assert adapter.fineTuneJobRef is not None  # exactly one of the two (validation)
    job = adapter.fineTuneJobRef.name
    raw = jobs.get(job)

    def waiting(reason: str, message: str) -> AdapterArgs:
        return AdapterArgs(name=name, reason=reason, message=message)

    if raw is None:
        return waiting(NOT_FOUND, f"FineTuneJob {job} does not exist")
    status = FineTuneJobStatus.model_validate(raw)
    if status.phase == "Failed":
        failed = next((c for c in status.conditions if c.type == "Failed"), None)
        why = f": {failed.reason}: {failed.message}" if failed else ""
        return waiting(FAILED, f"FineTuneJob {job} failed{why}")
    if status.phase != "Succeeded" or not status.model.uri:
        return waiting(
            f"FineTuneJob{status.phase}",
            f"FineTuneJob {job} is {status.phase}: the adapter is served once it succeeded",
        )
    if not status.model.adapter:
        return waiting(
            NOT_AN_ADAPTER,
            f"FineTuneJob {job} produced a whole model ({status.model.uri}), not an adapter: "
            "method lora or qlora with output.mergeLora false makes one; serve a whole model "
            "as spec.model",
        )
    base = status.model.baseModel
    if base and model_uri and not same_location(base, model_uri, base_dir):
        return waiting(
            BASE_MISMATCH,
            f"FineTuneJob {job} trained this adapter on {base}, but this deployment serves "
            f"{model_uri}",
        )
    if adapter.minEvaluation:
        gate = evaluation_gate(job, adapter.minEvaluation, raw.get("evaluation"))
        if gate is not None:
            return waiting(*gate)
    return AdapterArgs(name=name, uri=status.model.uri)


def evaluation_gate(
    job: str, minimum: Mapping[str, float] | None, scores: Any
) -> tuple[str, str] | None:
    """The promotion gate: None when each metric of minEvaluation is reached in the job's
    status.evaluation (`scores`), else (reason, message naming metric, score and threshold).
    Used for adapters here and for spec.model by the operator and `llmray serve`."""
    if not minimum:
        return None
    scores = scores if isinstance(scores, dict) else {}
    for metric, threshold in minimum.items():
        score = scores.get(metric)
        if not isinstance(score, int | float) or isinstance(score, bool) or math.isnan(score):
            return NO_SCORE, (
                f"FineTuneJob {job} has no evaluation score {metric!r} "
                f"(minEvaluation: {metric} >= {threshold:g})"
            )
        if score < threshold:
            return BELOW_MIN, (
                f"FineTuneJob {job} scored {metric} {score:g}, below minEvaluation "
                f"{metric} >= {threshold:g}"
            )
    return None


def same_location(a: str, b: str, base_dir: str = "/") -> bool:
    """Two model locations name the same model: equal URIs, or paths equal once made absolute
    (file:// or relative to `base_dir`) and normalised; a trailing slash does not count."""
    return _normal(a, base_dir) == _normal(b, base_dir)


def _normal(uri: str, base_dir: str) -> str:
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        return uri.rstrip("/")
    return posixpath.normpath(posixpath.join(base_dir, uri))


def referenced_jobs(dep: LLMDeployment) -> list[str]:
    """The FineTuneJobs the adapters reference, each once, in spec order."""
    refs = [a.fineTuneJobRef.name for a in dep.spec.adapters if a.fineTuneJobRef is not None]
    return list(dict.fromkeys(refs))
