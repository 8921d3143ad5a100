"""The real operator (kopf's KopfRunner, the `llmray_operator.handlers` module as deployed)
against an in-process Kubernetes API emulator (tests/kube/emulator.py, see DEVELOPERS.md).

KubeRay does not run here: the tests play its part by writing RayJob / RayService status
the way KubeRay v1.7.0 does, and the submitter pod's log the way `ray job submit` prints it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from pathlib import Path

import pytest
from kopf.testing import KopfRunner

from llmray.progress import format_line
from tests.kube.emulator import emulated_cluster

ROOT = Path(__file__).resolve().parents[1]
CRDS = [
    ROOT / "crds" / "llmray.io_finetunejobs.yaml",
    ROOT / "crds" / "llmray.io_llmdeployments.yaml",
    ROOT / "third_party" / "kuberay-crds" / "ray.io_rayjobs.yaml",
    ROOT / "third_party" / "kuberay-crds" / "ray.io_rayservices.yaml",
]
FTJ = "llmray.io/v1alpha1/finetunejobs"
LLMD = "llmray.io/v1alpha1/llmdeployments"
RAYJOBS = "ray.io/v1/rayjobs"
RAYSERVICES = "ray.io/v1/rayservices"
CONFIGMAPS = "v1/configmaps"
EVENTS = "v1/events"
NS = "ml"

pytestmark = pytest.mark.timeout(120)

JOB = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "support-bot", "namespace": NS},
    "spec": {
        "baseModel": {"uri": "pvc://models/smollm2-135m-instruct"},
        "dataset": {"train": "s3://data/support/train.jsonl", "format": "chat"},
        "method": "lora",
        "lora": {"rank": 8},
        "compute": {"workers": 2, "resourcesPerWorker": {"cpu": "4", "memory": "8Gi"}},
        "checkpointing": {"storageUri": "s3://runs"},
        "output": {"uri": "s3://models/support-bot"},
    },
}
DEPLOYMENT = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "support-bot", "namespace": NS},
    "spec": {
        "model": {"fineTuneJobRef": {"name": "support-bot"}},
        "compute": {"resourcesPerReplica": {"cpu": "2", "memory": "4Gi"}},
        "scaling": {"minReplicas": 1, "maxReplicas": 2},
    },
}


@pytest.fixture
async def cluster(tmp_path, monkeypatch):
    async with emulated_cluster(tmp_path, CRDS) as (kube, kubeconfig):
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("LLMRAY_DEFAULT_STORAGE_URI", "s3://llmray-runs")
        yield kube


@contextlib.asynccontextmanager
async def operator():
    """The operator as `llmray operator` runs it, in a thread with its own event loop; the
    emulator keeps serving from this test's loop meanwhile."""
    runner = KopfRunner(
        ["run", "--standalone", "--all-namespaces", "-m", "llmray_operator.handlers"],
        reraise=False,
    )
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert "Traceback" not in runner.output, runner.output


async def eventually(check, timeout: float = 20.0, what: str = ""):
    """Poll `check()` until it returns a truthy value (the operator works asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


def phase(kube, res, name):
    obj = kube.get_object(res, NS, name)
    return ((obj or {}).get("status") or {}).get("phase")


def status_of(kube, res, name="support-bot"):
    return (kube.get_object(res, NS, name) or {}).get("status") or {}


def events_for(kube, name):
    return [
        (e.get("type"), e.get("reason"))
        for e in kube.list_objects(EVENTS, NS)
        if e.get("involvedObject", {}).get("name") == name
    ]


async def play_kuberay_rayjob(kube, name, **status):
    await kube.patch_status(RAYJOBS, NS, name, status)


def submitter_pod(job_name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job_name}-abcde",
            "namespace": NS,
            "labels": {"batch.kubernetes.io/job-name": job_name},
        },
        "spec": {"containers": [{"name": "ray-job-submitter", "image": "ray"}]},
    }


async def test_finetunejob_runs_as_a_rayjob_and_reports_back(cluster):
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        job = await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        ftj = kube.get_object(FTJ, NS, "support-bot")
        owner = {"kind": "FineTuneJob", "name": "support-bot", "uid": ftj["metadata"]["uid"]}
        for child in (job, kube.get_object(CONFIGMAPS, NS, "support-bot-trainer")):
            (ref,) = child["metadata"]["ownerReferences"]
            assert {k: ref[k] for k in owner} == owner and ref["controller"] is True
        assert job["metadata"]["labels"]["llmray.io/finetunejob"] == "support-bot"
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Pending", what="Pending")

        # KubeRay: cluster up, job running; the driver prints progress lines.
        await kube.apply_object(submitter_pod("support-bot"))
        record = {
            "epoch": 0,
            "step": 6,
            "totalSteps": 12,
            "trainLoss": 1.25,
            "event": "step",
            "tokensPerSecond": 812.5,
            "checkpoint": "s3://runs/support-bot/checkpoint_000001",
        }
        kube.set_pod_log(NS, "support-bot-abcde", f"INFO starting\n{format_line(record)}\n")
        await play_kuberay_rayjob(
            kube,
            "support-bot",
            jobDeploymentStatus="Running",
            jobStatus="RUNNING",
            startTime="2026-11-23T10:00:00Z",
            dashboardURL="support-bot-raycluster-x-head-svc.ml.svc.cluster.local:8265",
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Running", what="Running")
        status = kube.get_object(FTJ, NS, "support-bot")["status"]
        assert status["startTime"] == "2026-11-23T10:00:00Z"
        assert status["rayJobName"] == "support-bot"
        assert status["dashboardURL"].endswith(":8265")
        assert status["progress"]["step"] == 6 and status["progress"]["trainLoss"] == 1.25
        assert status["latestCheckpoint"].endswith("checkpoint_000001")

        await play_kuberay_rayjob(
            kube,
            "support-bot",
            jobDeploymentStatus="Complete",
            jobStatus="SUCCEEDED",
            startTime="2026-11-23T10:00:00Z",
            endTime="2026-11-23T10:30:00Z",
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Succeeded", what="Succeeded")
        status = kube.get_object(FTJ, NS, "support-bot")["status"]
        assert status["completionTime"] == "2026-11-23T10:30:00Z"
        assert status["model"] == {"uri": "s3://models/support-bot"}
        conds = {c["type"]: c["status"] for c in status["conditions"]}
        assert conds == {"Running": "False", "Succeeded": "True", "Failed": "False"}
        # kopf's bookkeeping stays in llmray.io annotations, never in status.
        assert set(status) <= {
            "phase",
            "conditions",
            "observedGeneration",
            "rayJobName",
            "dashboardURL",
            "startTime",
            "completionTime",
            "progress",
            "latestCheckpoint",
            "model",
        }
        await eventually(
            lambda: ("Normal", "Succeeded") in events_for(kube, "support-bot"), what="event"
        )
        assert ("Normal", "Running") in events_for(kube, "support-bot")


async def test_a_failed_rayjob_fails_the_finetunejob_with_its_reason(cluster):
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await play_kuberay_rayjob(
            kube,
            "support-bot",
            jobDeploymentStatus="Failed",
            jobStatus="FAILED",
            reason="DeadlineExceeded",
            message="The RayJob has passed the activeDeadlineSeconds.",
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Failed", what="Failed")
        status = kube.get_object(FTJ, NS, "support-bot")["status"]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "DeadlineExceeded"
        assert "activeDeadlineSeconds" in failed["message"]
        await eventually(
            lambda: ("Warning", "DeadlineExceeded") in events_for(kube, "support-bot"),
            what="warning event",
        )


async def test_invalid_spec_fails_once_naming_the_field(cluster):
    kube = cluster
    bad = copy.deepcopy(JOB)
    bad["spec"]["dataset"]["train"] = "data/train.jsonl"  # fine locally, no file on a cluster
    async with operator():
        await kube.apply_object(bad)
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Failed", what="Failed")
        status = kube.get_object(FTJ, NS, "support-bot")["status"]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert "spec.dataset.train" in failed["message"]
        assert kube.get_object(RAYJOBS, NS, "support-bot") is None
        writes = len([c for c in kube.api_calls if c[0] == "patch" and c[3] == "status"])
        await asyncio.sleep(1.5)  # no retry storm: nothing more to write
        assert len([c for c in kube.api_calls if c[0] == "patch" and c[3] == "status"]) == writes


async def test_llmdeployment_waits_for_its_job_then_serves_its_model(cluster):
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(DEPLOYMENT))
        await eventually(
            lambda: phase(kube, LLMD, "support-bot") == "WaitingForModel", what="waiting"
        )
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        assert kube.get_object(RAYSERVICES, NS, "support-bot") is None
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"
        )
        service = await eventually(
            lambda: kube.get_object(RAYSERVICES, NS, "support-bot"), what="RayService"
        )
        assert "s3://models/support-bot" in service["spec"]["serveConfigV2"]
        await eventually(lambda: phase(kube, LLMD, "support-bot") == "Deploying", what="Deploying")

        await kube.patch_status(
            RAYSERVICES,
            NS,
            "support-bot",
            {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "NonZeroServeEndpoints",
                        "message": "",
                        "lastTransitionTime": "2026-11-23T10:40:00Z",
                    }
                ]
            },
        )
        await eventually(lambda: phase(kube, LLMD, "support-bot") == "Ready", what="Ready")
        status = kube.get_object(LLMD, NS, "support-bot")["status"]
        assert status["endpoint"] == "http://support-bot-serve-svc.ml.svc.cluster.local:8000/v1"
        assert status["modelUri"] == "s3://models/support-bot"

        # A spec edit patches the RayService (KubeRay then rolls it).
        def replicas_pod():
            service = kube.get_object(RAYSERVICES, NS, "support-bot")
            group = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
            return group["maxReplicas"], group["template"]["spec"].get("nodeSelector")

        dep = kube.get_object(LLMD, NS, "support-bot")
        dep["spec"]["scaling"] = {"minReplicas": 1, "maxReplicas": 5}
        dep["spec"]["compute"]["nodeSelector"] = {"pool": "serving"}
        await kube.apply_object(dep)
        await eventually(lambda: replicas_pod() == (5, {"pool": "serving"}), what="patched")
        # ... and a field removed from the spec is removed from the RayService too.
        dep = kube.get_object(LLMD, NS, "support-bot")
        del dep["spec"]["compute"]["nodeSelector"]
        await kube.apply_object(dep)
        await eventually(lambda: replicas_pod() == (5, None), what="nodeSelector removed")
        # No finalizers: deleting a CR never waits for the operator.
        for res in (FTJ, LLMD):
            assert not kube.get_object(res, NS, "support-bot")["metadata"].get("finalizers")


async def test_a_failed_referenced_job_fails_the_deployment(cluster):
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        await kube.apply_object(copy.deepcopy(DEPLOYMENT))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await play_kuberay_rayjob(
            kube,
            "support-bot",
            jobDeploymentStatus="Failed",
            jobStatus="FAILED",
            reason="AppFailed",
            message="CUDA out of memory",
        )
        await eventually(lambda: phase(kube, LLMD, "support-bot") == "Failed", what="Failed")
        status = kube.get_object(LLMD, NS, "support-bot")["status"]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "ModelFailed"
        assert "AppFailed" in failed["message"] and "CUDA out of memory" in failed["message"]
        assert kube.get_object(RAYSERVICES, NS, "support-bot") is None


async def test_restarting_the_operator_creates_no_duplicates_and_keeps_status(cluster):
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Running", jobStatus="RUNNING"
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Running", what="Running")
    before = kube.get_object(FTJ, NS, "support-bot")["status"]
    # KubeRay moves on while no operator runs.
    await play_kuberay_rayjob(
        kube, "support-bot", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"
    )
    async with operator():
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Succeeded", what="resumed")
    assert len(kube.list_objects(RAYJOBS, NS)) == 1
    assert len(kube.list_objects(CONFIGMAPS, NS)) == 1
    rayjob_creates = [c for c in kube.api_calls if c[:3] == ("create", "ray.io", "rayjobs")]
    assert len(rayjob_creates) == 1
    after = kube.get_object(FTJ, NS, "support-bot")["status"]
    assert after["startTime"] == before["startTime"]


async def test_deleting_the_finetunejob_deletes_its_children(cluster):
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await kube.delete_object(FTJ, NS, "support-bot")
        await eventually(
            lambda: (
                kube.get_object(RAYJOBS, NS, "support-bot") is None
                and kube.get_object(CONFIGMAPS, NS, "support-bot-trainer") is None
            ),
            what="children gone",
        )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_llmray_operator_process_serves_health_and_metrics_and_keeps_to_its_namespace(
    cluster, tmp_path
):
    """`llmray operator -n ml` as the Helm chart runs it: a process, its own ports."""
    import os
    import subprocess
    import sys

    import httpx

    kube = cluster
    metrics, health = _free_port(), _free_port()
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmray.cli",
            "operator",
            "--namespace",
            NS,
            "--metrics-port",
            str(metrics),
            "--health-port",
            str(health),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    try:
        other = copy.deepcopy(JOB)
        other["metadata"]["namespace"] = "elsewhere"
        await kube.apply_object(other)
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(
            lambda: kube.get_object(RAYJOBS, NS, "support-bot"), timeout=60, what="RayJob"
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Pending", what="Pending")
        async with httpx.AsyncClient() as http:
            alive = await http.get(f"http://127.0.0.1:{health}/healthz")
            assert alive.status_code == 200
            text = (await http.get(f"http://127.0.0.1:{metrics}/metrics")).text
        assert 'llmray_reconciles_total{kind="FineTuneJob",result="ok"}' in text
        assert 'llmray_objects{kind="FineTuneJob",phase="Pending"} 1.0' in text
        assert 'llmray_reconcile_seconds_count{kind="FineTuneJob"}' in text
        assert kube.get_object(RAYJOBS, "elsewhere", "support-bot") is None
        assert not [c for c in kube.api_calls if c.namespace == "elsewhere" and c.verb != "create"]
    except BaseException:
        print((tmp_path / "operator.log").read_text()[-4000:])
        raise
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 60)
    output = (tmp_path / "operator.log").read_text()
    assert "Traceback" not in output, output[-3000:]


async def test_the_operator_makes_exactly_the_api_calls_its_rbac_rules_grant(cluster):
    """Every request of a whole lifecycle is covered by `rbac.RULES`, and every rule is used:
    the Helm chart's role grants these rules, so nothing is missing and nothing is extra."""
    from llmray_operator.rbac import NOT_REQUESTED, RULES

    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(DEPLOYMENT))
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await kube.apply_object(submitter_pod("support-bot"))
        kube.set_pod_log(NS, "support-bot-abcde", format_line({"step": 1}) + "\n")
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Running", jobStatus="RUNNING"
        )
        await eventually(
            lambda: (
                (phase(kube, FTJ, "support-bot") and status_of(kube, FTJ)["progress"].get("step"))
                == 1
            ),
            what="progress",
        )
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"
        )
        await eventually(lambda: kube.get_object(RAYSERVICES, NS, "support-bot"), what="RS")
        dep = kube.get_object(LLMD, NS, "support-bot")
        dep["spec"]["maxOngoingRequests"] = 4
        await kube.apply_object(dep)
        await eventually(
            lambda: (
                "max_ongoing_requests: 4"
                in kube.get_object(RAYSERVICES, NS, "support-bot")["spec"]["serveConfigV2"]
            ),
            what="RayService patched",
        )
    assert len([c for c in kube.api_calls if c[:3] == ("patch", "ray.io", "rayservices")]) == 1
    granted = {(group, resource, verb) for group, resource, verbs in RULES for verb in verbs}
    made = {
        (c.group, f"{c.resource}/{c.subresource}" if c.subresource else c.resource, c.verb)
        for c in kube.api_calls
    }
    assert made - granted == set(), "calls the RBAC rules do not grant"
    unused = {g for g in granted - made if (g[0], g[1]) not in NOT_REQUESTED}
    assert unused == set(), "RBAC rules the operator never needs"


async def test_progress_is_read_periodically_while_the_job_runs(cluster, monkeypatch):
    """A pod log sends no event: the periodic pass picks up new progress lines."""
    monkeypatch.setenv("LLMRAY_PROGRESS_SECONDS", "0.3")
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await kube.apply_object(submitter_pod("support-bot"))
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Running", jobStatus="RUNNING"
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Running", what="Running")
        for step in (3, 7):
            kube.set_pod_log(NS, "support-bot-abcde", format_line({"step": step}) + "\n")
            await eventually(
                lambda s=step: status_of(kube, FTJ)["progress"].get("step") == s,
                what=f"step {step}",
            )
