"""The promotion gate (issue 17) in the real operator, against the Kubernetes API emulator: a
FineTuneJob's driver prints its evaluation scores; the operator mirrors them into
status.evaluation; an LLMDeployment whose spec.model.minEvaluation the job does not reach is
not served (Failed, BelowMinEvaluation, naming metric, score and threshold) and is served once
the threshold is one the job reaches. KubeRay's part is played as in test_operator_integration."""

from __future__ import annotations

import copy

import pytest

from llmray.progress import format_line
from tests.test_operator_integration import (  # noqa: F401  (cluster: a fixture)
    DEPLOYMENT,
    FTJ,
    JOB,
    LLMD,
    NS,
    RAYJOBS,
    RAYSERVICES,
    cluster,
    eventually,
    operator,
    phase,
    play_kuberay_rayjob,
    status_of,
    submitter_pod,
)

pytestmark = pytest.mark.timeout(120)

SCORES = {"exactMatch": 0.25, "baseline": {"exactMatch": 0.0}}


def gated(threshold: float) -> dict:
    dep = copy.deepcopy(DEPLOYMENT)
    dep["spec"]["model"]["minEvaluation"] = {"exactMatch": threshold}
    return dep


def condition(kube, type_: str) -> dict:
    return next(c for c in status_of(kube, LLMD)["conditions"] if c["type"] == type_)


async def test_a_job_below_min_evaluation_is_not_served_one_above_is(cluster):  # noqa: F811
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await kube.apply_object(submitter_pod("support-bot"))
        # The driver's last lines: exported, then the scores.
        lines = [
            {"event": "exported", "step": 12, "model": "s3://models/support-bot"},
            {"event": "evaluated", "step": 12, "evaluation": SCORES},
            {"event": "done", "step": 12},
        ]
        kube.set_pod_log(NS, "support-bot-abcde", "".join(format_line(r) + "\n" for r in lines))
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Succeeded", what="Succeeded")
        assert status_of(kube, FTJ)["evaluation"] == SCORES

        await kube.apply_object(gated(0.5))
        await eventually(lambda: phase(kube, LLMD, "support-bot") == "Failed", what="Failed")
        failed = condition(kube, "Failed")
        assert failed["reason"] == "BelowMinEvaluation"
        assert failed["message"] == (
            "FineTuneJob support-bot scored exactMatch 0.25, below minEvaluation exactMatch >= 0.5"
        )
        assert condition(kube, "ModelAvailable")["status"] == "False"
        assert kube.get_object(RAYSERVICES, NS, "support-bot") is None

        # A threshold the job reaches: served.
        dep = kube.get_object(LLMD, NS, "support-bot")
        dep["spec"]["model"]["minEvaluation"] = {"exactMatch": 0.2}
        await kube.apply_object(dep)
        service = await eventually(
            lambda: kube.get_object(RAYSERVICES, NS, "support-bot"), what="RayService"
        )
        assert service["metadata"]["name"] == "support-bot"
        await eventually(lambda: phase(kube, LLMD, "support-bot") == "Deploying", what="Deploying")
