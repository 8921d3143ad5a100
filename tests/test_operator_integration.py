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

import pytest
from kopf.testing import KopfRunner

from llmray.localray import free_port
from llmray.progress import format_line
from tests.kube.emulator import emulated_cluster
from tests.kube.operator_crds import CONFIGMAPS, CRDS, EVENTS, FTJ, LLMD, RAYJOBS, RAYSERVICES

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


async def test_a_job_its_workers_cannot_fit_gets_wontfit_before_its_rayjob(cluster):
    """A 7B full fine-tune (ZeRO-2, fp32, 2 workers) in 8Gi workers: the plan says a worker
    needs far more. A Warning Event and the WontFit condition name the need and the limit;
    the RayJob is still created (a prediction is not InvalidSpec)."""
    kube = cluster
    job = copy.deepcopy(JOB)
    job["metadata"]["name"] = "too-big"
    spec = job["spec"]
    spec["baseModel"] = {"uri": "hf://meta-llama/Llama-2-7b-hf", "parameters": 6738415616}
    spec["method"] = "full"
    del spec["lora"]
    spec["strategy"] = {"type": "deepspeed", "zeroStage": 2}
    async with operator():
        await kube.apply_object(job)
        await eventually(
            lambda: ("Warning", "WontFit") in events_for(kube, "too-big"), what="WontFit event"
        )
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "too-big"), what="the RayJob")

        def conditions():
            return {c["type"]: c for c in status_of(kube, FTJ, "too-big").get("conditions", [])}

        conds = await eventually(lambda: "WontFit" in conditions() and conditions(), what="cond")
        wont = conds["WontFit"]
        assert wont["status"] == "True" and wont["reason"] == "WontFit"
        assert "a worker needs" in wont["message"] and "8.0Gi" in wont["message"]
        assert "spec.compute.resourcesPerWorker.memory" in wont["message"]
        assert conds["Failed"]["status"] == "False"  # not InvalidSpec: it is a prediction
        # Later passes (the RayJob exists) keep the verdict as judged.
        await play_kuberay_rayjob(
            kube, "too-big", jobDeploymentStatus="Running", jobStatus="RUNNING"
        )
        await eventually(lambda: phase(kube, FTJ, "too-big") == "Running", what="Running")
        assert conditions()["WontFit"]["status"] == "True"


async def test_an_image_outside_the_allowed_prefixes_fails_both_kinds(cluster, monkeypatch):
    """LLMRAY_ALLOWED_IMAGE_PREFIXES (chart policy.allowedImagePrefixes): a spec.image outside
    it is InvalidSpec naming spec.image, and no child is created."""
    monkeypatch.setenv("LLMRAY_ALLOWED_IMAGE_PREFIXES", "registry.example.com/ml/")
    kube = cluster
    job = copy.deepcopy(JOB)
    job["spec"]["image"] = "docker.io/someone/trainer:latest"
    dep = copy.deepcopy(DEPLOYMENT)
    dep["spec"]["model"] = {"uri": "s3://models/support-bot"}
    dep["spec"]["image"] = "docker.io/someone/server:latest"
    async with operator():
        await kube.apply_object(job)
        await kube.apply_object(dep)
        for res in (FTJ, LLMD):
            await eventually(lambda r=res: phase(kube, r, "support-bot") == "Failed", what=res)
            failed = next(c for c in status_of(kube, res)["conditions"] if c["type"] == "Failed")
            assert failed["reason"] == "InvalidSpec"
            assert failed["message"].startswith("spec.image: docker.io/someone/")
    assert kube.get_object(RAYJOBS, NS, "support-bot") is None
    assert kube.get_object(RAYSERVICES, NS, "support-bot") is None


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


def _on_default_storage(job: dict) -> dict:
    """The job with neither checkpointing.storageUri nor output.uri: the operator's default
    storage (LLMRAY_DEFAULT_STORAGE_URI) decides where its model goes."""
    job = copy.deepcopy(job)
    del job["spec"]["checkpointing"], job["spec"]["output"]
    return job


async def resumed(kube, since: int) -> None:
    """Wait until a restarted operator's resume passes have read the job and the
    deployment's RayService."""
    for resource in ("finetunejobs", "rayservices"):
        await eventually(
            lambda r=resource: any(
                c.verb == "get" and c.resource == r for c in kube.api_calls[since:]
            ),
            what=f"resume pass ({resource})",
        )
    await asyncio.sleep(1.0)  # what the pass would write after its reads


async def test_a_settings_change_and_a_restart_never_regress_a_finished_job(cluster, monkeypatch):
    """A Succeeded job stays Succeeded with the same model URI, and the LLMDeployment serving
    it is not repointed, when the operator restarts with another default storage or with none
    (which would now make the job's spec InvalidSpec)."""
    kube = cluster
    async with operator():
        await kube.apply_object(_on_default_storage(JOB))
        await kube.apply_object(copy.deepcopy(DEPLOYMENT))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Succeeded", what="done")
        service = await eventually(
            lambda: kube.get_object(RAYSERVICES, NS, "support-bot"), what="RayService"
        )
    finished = status_of(kube, FTJ)
    model = finished["model"]["uri"]
    assert model.startswith("s3://llmray-runs/ml/support-bot")
    assert model in service["spec"]["serveConfigV2"]
    for storage in ("s3://another-bucket", None):
        if storage:
            monkeypatch.setenv("LLMRAY_DEFAULT_STORAGE_URI", storage)
        else:
            monkeypatch.delenv("LLMRAY_DEFAULT_STORAGE_URI")
        since = len(kube.api_calls)
        async with operator():
            await resumed(kube, since)
        assert status_of(kube, FTJ) == finished, storage
        assert status_of(kube, LLMD)["modelUri"] == model
        assert kube.get_object(RAYSERVICES, NS, "support-bot")["spec"] == service["spec"]
        assert not [
            c for c in kube.api_calls[since:] if c.verb == "patch" and c.group == "llmray.io"
        ], "a finished job's status was written again"


async def test_a_running_job_follows_its_rayjob_after_a_settings_change(cluster, monkeypatch):
    """Once submitted, a job is judged by its RayJob, not by settings that changed since: an
    operator restarted without default storage keeps it Running, and its model is where the
    trainer was told to write it (its ConfigMap), not where the new settings would put it."""
    kube = cluster
    async with operator():
        await kube.apply_object(_on_default_storage(JOB))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Running", jobStatus="RUNNING"
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Running", what="Running")
    config = kube.get_object(CONFIGMAPS, NS, "support-bot-trainer")["data"]["trainer.json"]
    monkeypatch.delenv("LLMRAY_DEFAULT_STORAGE_URI")
    since = len(kube.api_calls)
    async with operator():
        await eventually(
            lambda: any(c.resource == "rayjobs" for c in kube.api_calls[since:]), what="resume"
        )
        await asyncio.sleep(1.0)
        assert phase(kube, FTJ, "support-bot") == "Running"
        monkeypatch.setenv("LLMRAY_DEFAULT_STORAGE_URI", "s3://another-bucket")  # not re-read
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"
        )
        await eventually(lambda: phase(kube, FTJ, "support-bot") == "Succeeded", what="done")
    model = status_of(kube, FTJ)["model"]["uri"]
    assert model.startswith("s3://llmray-runs/ml/support-bot") and f'"{model}"' in config
    conds = {c["type"]: c["reason"] for c in status_of(kube, FTJ)["conditions"]}
    assert "InvalidSpec" not in conds.values()


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


async def test_llmray_operator_process_serves_health_and_metrics_and_keeps_to_its_namespace(
    cluster, tmp_path
):
    """`llmray operator -n ml` as the Helm chart runs it: a process, its own ports."""
    import os
    import subprocess
    import sys

    import httpx

    kube = cluster
    metrics, health = free_port(), free_port()
    log = (tmp_path / "operator.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llmray_cli",
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
