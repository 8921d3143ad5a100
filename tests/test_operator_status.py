"""Status mapping, a pure function: every KubeRay status value has a defined phase.

Values from KubeRay v1.7.0 (third_party/kuberay-crds/README.md): RayJob jobDeploymentStatus x
jobStatus, RayService conditions and Serve application statuses.
"""

from __future__ import annotations

import itertools

import pytest

from llmray_operator.status import (
    Verdict,
    conditions,
    finetunejob_status,
    llmdeployment_status,
    rayjob_verdict,
    rayservice_verdict,
)

DEPLOYMENT = [
    "",
    "Initializing",
    "Running",
    "Complete",
    "Failed",
    "ValidationFailed",
    "Suspending",
    "Suspended",
    "Retrying",
    "Waiting",
]
JOB = ["", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED"]


def expected_phase(deployment: str, job: str) -> str:
    if deployment in ("Failed", "ValidationFailed"):
        return "Failed"
    if job == "SUCCEEDED":
        return "Succeeded"
    if deployment == "Complete":
        return "Failed" if job in ("FAILED", "STOPPED") else "Running"
    if deployment == "Retrying":
        return "Running"
    if deployment == "Running":
        return "Pending" if job in ("", "PENDING") else "Running"
    return "Pending"  # "", Initializing, Waiting, Suspending, Suspended


@pytest.mark.parametrize(("deployment", "job"), list(itertools.product(DEPLOYMENT, JOB)))
def test_every_rayjob_status_combination_has_a_phase(deployment, job):
    verdict = rayjob_verdict({"jobDeploymentStatus": deployment, "jobStatus": job})
    assert verdict.phase == expected_phase(deployment, job)
    assert verdict.reason  # never an empty reason


def test_a_failed_rayjob_carries_its_reason_and_message():
    verdict = rayjob_verdict(
        {
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": "DeadlineExceeded",
            "message": "The RayJob has passed the activeDeadlineSeconds.",
        }
    )
    assert verdict == Verdict(
        "Failed", "DeadlineExceeded", "The RayJob has passed the activeDeadlineSeconds."
    )


def test_an_unknown_future_status_is_pending_with_its_name():
    assert rayjob_verdict({"jobDeploymentStatus": "Teleporting"}) == Verdict(
        "Pending", "Teleporting", ""
    )


def _ftj(previous, ray_status, now="2026-11-23T10:00:00Z", **kw):
    return finetunejob_status(
        previous=previous,
        generation=1,
        now=now,
        ray_job_name="job",
        ray_status=ray_status,
        model_uri="s3://b/models/job",
        **kw,
    )


def test_finetunejob_status_lifecycle_keeps_times_and_never_regresses():
    pending = _ftj({}, None)
    assert pending["phase"] == "Pending" and pending["startTime"] == ""
    running = _ftj(
        pending,
        {
            "jobDeploymentStatus": "Running",
            "jobStatus": "RUNNING",
            "startTime": "2026-11-23T10:00:05Z",
            "dashboardURL": "job-raycluster-head-svc.ml.svc.cluster.local:8265",
        },
        progress={"step": 12, "totalSteps": 50, "trainLoss": 2.5, "checkpoint": "s3://b/ck/12"},
    )
    assert running["phase"] == "Running"
    assert running["startTime"] == "2026-11-23T10:00:05Z"
    assert running["progress"] == {"step": 12, "totalSteps": 50, "trainLoss": 2.5}
    assert running["latestCheckpoint"] == "s3://b/ck/12"
    assert running["dashboardURL"].endswith(":8265")
    assert running["model"] == {"uri": ""}
    done = _ftj(
        running,
        {
            "jobDeploymentStatus": "Complete",
            "jobStatus": "SUCCEEDED",
            "endTime": "2026-11-23T11:00:00Z",
        },
        now="2026-11-23T11:00:01Z",
    )
    assert done["phase"] == "Succeeded"
    assert done["completionTime"] == "2026-11-23T11:00:00Z"
    assert done["model"] == {"uri": "s3://b/models/job"}
    assert done["progress"]["step"] == 12  # kept without a new record
    # The RayJob is gone (or reports something else): a finished job stays finished.
    later = _ftj(done, None, now="2026-11-23T12:00:00Z")
    assert later["phase"] == "Succeeded"
    assert later["completionTime"] == done["completionTime"]
    assert later["conditions"] == done["conditions"]


def test_conditions_move_their_transition_time_only_on_a_status_change():
    first = conditions([], [("Ready", False, "Initializing", "")], now="t1", generation=1)
    same = conditions(first, [("Ready", False, "ZeroServeEndpoints", "")], now="t2", generation=1)
    assert same[0].lastTransitionTime == "t1" and same[0].reason == "ZeroServeEndpoints"
    flipped = conditions(
        same, [("Ready", True, "NonZeroServeEndpoints", "")], now="t3", generation=2
    )
    assert flipped[0].model_dump() == {
        "type": "Ready",
        "status": "True",
        "reason": "NonZeroServeEndpoints",
        "message": "",
        "lastTransitionTime": "t3",
        "observedGeneration": 2,
    }


def test_invalid_spec_fails_with_reason_invalid_spec():
    status = _ftj({}, None, invalid="spec.dataset.train: data/x.jsonl is a local path")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert "spec.dataset.train" in failed["message"]


def test_a_finished_job_is_never_rejudged():
    """Neither a spec check nor another model URI (settings changed since) touches the status
    of a Succeeded or Failed job."""
    done = _ftj({}, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})
    failed = _ftj({}, {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"})
    for finished in (done, failed):
        later = finetunejob_status(
            previous=finished,
            generation=1,
            now="2026-11-24T00:00:00Z",
            ray_job_name="job",
            ray_status={"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
            model_uri="s3://elsewhere/models/job",
            invalid="spec.checkpointing.storageUri: required on a cluster",
        )
        assert later == finished
    assert done["model"] == {"uri": "s3://b/models/job"}


def _cond(type_, status, reason="", message=""):
    return {"type": type_, "status": status, "reason": reason, "message": message}


def _apps(status, message=""):
    return {
        "activeServiceStatus": {
            "applicationStatuses": {"llm": {"status": status, "message": message}}
        }
    }


RAYSERVICE_CASES = [
    # (status, phase, reason)
    (None, "Deploying", "Initializing"),
    ({}, "Deploying", "Initializing"),
    ({"conditions": [_cond("Ready", "False", "Initializing")]}, "Deploying", "Initializing"),
    (
        {"conditions": [_cond("Ready", "True", "NonZeroServeEndpoints")]},
        "Ready",
        "NonZeroServeEndpoints",
    ),
    (
        {"conditions": [_cond("Ready", "False", "ZeroServeEndpoints")]},
        "Deploying",
        "ZeroServeEndpoints",
    ),
    (
        {"conditions": [_cond("Ready", "False", "InitializingTimeout", "took too long")]},
        "Failed",
        "InitializingTimeout",
    ),
    (
        {"conditions": [_cond("Ready", "False", "ValidationFailed", "bad spec")]},
        "Failed",
        "ValidationFailed",
    ),
    (
        {
            "conditions": [
                _cond("Ready", "True", "NonZeroServeEndpoints"),
                _cond("UpgradeInProgress", "True", "BothActivePendingClustersExist"),
            ]
        },
        "Ready",
        "NonZeroServeEndpoints",
    ),
    (
        {
            "conditions": [
                _cond("Ready", "True", "NonZeroServeEndpoints"),
                _cond("RollbackInProgress", "True", "DesiredClusterSpecChanged"),
            ]
        },
        "Ready",
        "NonZeroServeEndpoints",
    ),
    ({"conditions": [_cond("Suspending", "True", "SuspendInProgress")]}, "Pending", "Suspending"),
    ({"conditions": [_cond("Suspended", "True", "SuspendComplete")]}, "Pending", "Suspended"),
    ({**_apps("DEPLOY_FAILED", "ImportError: no module x")}, "Failed", "DeployFailed"),
    (
        {
            **_apps("UNHEALTHY", "replica died"),
            "conditions": [_cond("Ready", "False", "ZeroServeEndpoints")],
        },
        "Deploying",
        "Unhealthy",
    ),
    (
        {**_apps("RUNNING"), "conditions": [_cond("Ready", "True", "NonZeroServeEndpoints")]},
        "Ready",
        "NonZeroServeEndpoints",
    ),
    ({**_apps("DEPLOYING")}, "Deploying", "Initializing"),
    ({**_apps("NOT_STARTED")}, "Deploying", "Initializing"),
    ({**_apps("DELETING")}, "Deploying", "Initializing"),
    # KubeRay before conditions existed: serviceStatus only.
    ({"serviceStatus": "Running"}, "Ready", "Ready"),
]


@pytest.mark.parametrize(("rs_status", "phase", "reason"), RAYSERVICE_CASES)
def test_every_rayservice_status_has_a_phase(rs_status, phase, reason):
    verdict = rayservice_verdict(rs_status)
    assert (verdict.phase, verdict.reason) == (phase, reason)


def test_a_failed_serve_application_carries_its_message():
    verdict = rayservice_verdict(_apps("DEPLOY_FAILED", "ImportError: no module x"))
    assert "ImportError: no module x" in verdict.message


def test_endpoint_is_published_once_ready_and_kept_during_an_upgrade():
    endpoint = "http://llm-serve-svc.ml.svc.cluster.local:8000/v1"
    args = {"generation": 1, "now": "t", "ray_service_name": "llm", "endpoint": endpoint}
    deploying = llmdeployment_status(
        previous={}, verdict=Verdict("Deploying", "Initializing"), **args
    )
    assert deploying["endpoint"] == ""
    ready = llmdeployment_status(
        previous=deploying, verdict=Verdict("Ready", "NonZeroServeEndpoints"), **args
    )
    assert ready["endpoint"] == endpoint
    upgrading = llmdeployment_status(
        previous=ready,
        verdict=Verdict("Deploying", "ZeroServeEndpoints"),
        rs_status={"conditions": [_cond("UpgradeInProgress", "True")]},
        **args,
    )
    assert upgrading["endpoint"] == endpoint
    assert {c["type"]: c["status"] for c in upgrading["conditions"]}["Upgrading"] == "True"


def test_waiting_for_model_reports_model_not_available():
    status = llmdeployment_status(
        previous={},
        generation=1,
        now="t",
        verdict=Verdict("WaitingForModel", "FineTuneJobRunning", "waiting for FineTuneJob x"),
    )
    cond = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "WaitingForModel"
    assert cond["ModelAvailable"]["status"] == "False"
    assert cond["ModelAvailable"]["reason"] == "FineTuneJobRunning"
    assert status["endpoint"] == ""


def test_a_failed_training_carries_the_trainers_own_words():
    """KubeRay copies Ray's message, the driver's last 10 log lines after "Job entrypoint
    command failed ..."; the trainer ends them with a `failed` record (found by the replay)."""
    from llmray.progress import format_line

    tail = "\n".join(
        [
            "Job entrypoint command failed with exit code 1, last available logs "
            "(truncated to 20,000 chars):",
            '  File "launcher.py", line 120, in run',
            "llmray_trainer.placement.PlacementError: rank 0 needs a Ray node ...",
            format_line({"event": "failed", "message": "rank 0 needs a Ray node ..."}),
        ]
    )
    verdict = rayjob_verdict(
        {
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": "AppFailed",
            "message": tail,
        }
    )
    assert verdict == Verdict("Failed", "AppFailed", "rank 0 needs a Ray node ...")
    # A message without such a record (Ray's, KubeRay's) is kept as it is.
    plain = {"jobDeploymentStatus": "Failed", "reason": "SubmissionFailed", "message": "gone"}
    assert rayjob_verdict(plain).message == "gone"


def test_a_failed_deployment_says_why_its_replica_failed():
    """Serve's application message names no reason; its deployment's ends with the replica's
    exception (what the replay saw for a model the replicas could not fetch)."""
    status = _apps("DEPLOY_FAILED", "Failed to update the deployments ['llm'].")
    app = status["activeServiceStatus"]["applicationStatuses"]["llm"]
    app["serveDeploymentStatuses"] = {
        "llm": {
            "status": "DEPLOY_FAILED",
            "message": "The deployment failed to start 3 times in a row.\nTraceback ...\n"
            "\x1b[36mray::ServeReplica\x1b[39m\nllmray.uris.UriError: spec.model.uri: "
            "s3://b/m: cannot list it\n",
        }
    }
    assert rayservice_verdict(status).message == (
        "application llm: Failed to update the deployments ['llm']. "
        "deployment llm: llmray.uris.UriError: spec.model.uri: s3://b/m: cannot list it"
    )


def test_an_adapter_only_job_reports_its_base_model():
    done = _ftj(
        {},
        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
        adapter_base="hf://meta-llama/Llama-2-7b-hf",
    )
    assert done["model"] == {
        "uri": "s3://b/models/job",
        "adapter": True,
        "baseModel": "hf://meta-llama/Llama-2-7b-hf",
    }


def test_wontfit_is_kept_as_judged_before_the_rayjob():
    judged = _ftj({}, None, wont_fit=(True, "a worker needs 70.0Gi, limit 8.0Gi"))
    wont = next(c for c in judged["conditions"] if c["type"] == "WontFit")
    assert (wont["status"], wont["reason"]) == ("True", "WontFit")
    later = _ftj(judged, {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"})
    kept = next(c for c in later["conditions"] if c["type"] == "WontFit")
    assert kept == wont and later["phase"] == "Running"
