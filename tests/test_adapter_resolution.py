"""spec.adapters resolved against the FineTuneJobs they reference (llmray.adapters), and the
LLMDeployment status that reports them (status.adapters, the AdaptersReady condition)."""

from __future__ import annotations

from typing import Any

import pytest

from llmray.adapters import referenced_jobs, resolve_adapters, same_location
from llmray.api.validation import parse_llmdeployment
from llmray_operator.status import Verdict, llmdeployment_status

BASE = "s3://models/base"


def deployment(*adapters: dict[str, Any]):
    return parse_llmdeployment(
        {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "LLMDeployment",
            "metadata": {"name": "base"},
            "spec": {"model": {"uri": BASE}, "adapters": list(adapters)},
        }
    )


def succeeded(uri: str = "s3://adapters/a", base: str = BASE, **status: Any) -> dict[str, Any]:
    return {
        "phase": "Succeeded",
        "model": {"uri": uri, "adapter": True, "baseModel": base},
    } | status


def ref(name: str, job: str = "job", **more: Any) -> dict[str, Any]:
    return {"name": name, "fineTuneJobRef": {"name": job}, **more}


def one(adapter: dict[str, Any], job: dict[str, Any] | None, model_uri: str = BASE):
    (resolved,) = resolve_adapters(deployment(adapter), {"job": job}, model_uri)
    return resolved


def test_a_uri_adapter_is_ready_as_given():
    (a,) = resolve_adapters(deployment({"name": "legal", "uri": "s3://adapters/legal"}), {}, BASE)
    assert (a.name, a.uri, a.ready) == ("legal", "s3://adapters/legal", True)


def test_a_succeeded_adapter_job_is_served_from_its_model_uri():
    a = one(ref("support"), succeeded("s3://adapters/support"))
    assert a.ready and a.uri == "s3://adapters/support" and not a.reason


@pytest.mark.parametrize(
    ("job", "reason", "says"),
    [
        (None, "FineTuneJobNotFound", "FineTuneJob job does not exist"),
        ({}, "FineTuneJobPending", "FineTuneJob job is Pending: the adapter is served once"),
        ({"phase": "Running"}, "FineTuneJobRunning", "FineTuneJob job is Running"),
        (
            {
                "phase": "Failed",
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "OOM", "message": "killed"}
                ],
            },
            "FineTuneJobFailed",
            "FineTuneJob job failed: OOM: killed",
        ),
        (
            {"phase": "Succeeded", "model": {"uri": "s3://models/merged"}},
            "NotAnAdapter",
            "produced a whole model (s3://models/merged), not an adapter",
        ),
        (
            succeeded(base="hf://org/other"),
            "AdapterBaseMismatch",
            f"trained this adapter on hf://org/other, but this deployment serves {BASE}",
        ),
    ],
)
def test_an_adapter_not_served_says_why(job, reason, says):
    a = one(ref("support"), job)
    assert not a.ready and a.uri == "" and a.reason == reason
    assert says in a.message, a.message


def test_the_base_is_not_judged_while_the_model_is_unknown():
    assert one(ref("support"), succeeded(base="hf://org/other"), model_uri="").ready


def test_min_evaluation_gates_on_the_jobs_scores():
    gated = ref("support", minEvaluation={"answer": 0.3, "exactMatch": 0.1})
    ok = one(gated, succeeded(evaluation={"answer": 0.37, "exactMatch": 0.41}))
    assert ok.ready
    low = one(gated, succeeded(evaluation={"answer": 0.21, "exactMatch": 0.41}))
    assert (low.reason, low.message) == (
        "BelowMinEvaluation",
        "FineTuneJob job scored answer 0.21, below minEvaluation answer >= 0.3",
    )
    unscored = one(gated, succeeded(evaluation={"answer": 0.5}))
    assert unscored.reason == "EvaluationMissing" and "'exactMatch'" in unscored.message
    assert one(gated, succeeded()).reason == "EvaluationMissing"


def test_locations_compare_as_the_same_model():
    assert same_location("s3://m/base/", "s3://m/base")
    assert same_location("file:///models/tiny", "/models/tiny")
    assert same_location("../models/tiny", "/models/tiny", base_dir="/jobs")
    assert not same_location("s3://m/base", "s3://m/base2")
    assert not same_location("models/tiny", "/models/tiny", base_dir="/jobs")


def test_each_referenced_job_once_in_spec_order():
    dep = deployment(ref("a", "j2"), {"name": "u", "uri": "s3://x"}, ref("b", "j1"), ref("c", "j2"))
    assert referenced_jobs(dep) == ["j2", "j1"]


def _status(adapters):
    return llmdeployment_status(
        previous={}, generation=1, now="t", verdict=Verdict("Ready", "Ready"), adapters=adapters
    )


def test_the_status_lists_the_adapters_and_names_the_most_pressing_reason():
    dep = deployment(
        {"name": "legal", "uri": "s3://adapters/legal"}, ref("next", "running"), ref("bad", "other")
    )
    adapters = resolve_adapters(
        dep, {"running": {"phase": "Running"}, "other": succeeded(base="hf://org/x")}, BASE
    )
    status = _status(adapters)
    assert status["phase"] == "Ready"  # the base model and the ready adapters serve on
    assert [(a["name"], a["ready"], a["reason"]) for a in status["adapters"]] == [
        ("legal", True, ""),
        ("next", False, "FineTuneJobRunning"),
        ("bad", False, "AdapterBaseMismatch"),
    ]
    cond = next(c for c in status["conditions"] if c["type"] == "AdaptersReady")
    assert cond["status"] == "False" and cond["reason"] == "AdapterBaseMismatch"
    assert cond["message"].startswith("next: FineTuneJob running is Running")
    assert "; bad: FineTuneJob other trained this adapter on hf://org/x" in cond["message"]


def test_all_adapters_ready_and_none_at_all():
    ready = _status(resolve_adapters(deployment({"name": "a", "uri": "s3://a"}), {}, BASE))
    cond = next(c for c in ready["conditions"] if c["type"] == "AdaptersReady")
    assert (cond["status"], cond["reason"]) == ("True", "AdaptersReady")
    plain = _status([])
    assert "adapters" not in plain
    assert all(c["type"] != "AdaptersReady" for c in plain["conditions"])
