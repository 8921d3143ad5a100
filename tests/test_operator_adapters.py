"""The operator with adapters (issue 16), against the Kubernetes API emulator: an LLMDeployment
whose adapter comes from a FineTuneJob (lora, no merge) lists it as waiting, and when the job
succeeds only the RayService's serveConfigV2 changes (rayClusterConfig byte-identical, so
KubeRay updates Serve in place); an adapter trained on another base is refused with a clear
condition. KubeRay's part (RayJob status) is played as in test_operator_integration."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.test_operator_integration import (  # noqa: F401  (cluster: a fixture)
    FTJ,
    LLMD,
    NS,
    RAYJOBS,
    RAYSERVICES,
    cluster,
    eventually,
    operator,
    play_kuberay_rayjob,
)

pytestmark = pytest.mark.timeout(120)

BASE = "s3://models/smollm2-135m-instruct"


def adapter_job(name: str, base: str = BASE) -> dict:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "baseModel": {"uri": base},
            "dataset": {"train": "s3://data/support/train.jsonl", "format": "chat"},
            "method": "lora",
            "compute": {"workers": 1, "resourcesPerWorker": {"cpu": "2", "memory": "4Gi"}},
            "checkpointing": {"storageUri": "s3://runs"},
            "output": {"uri": f"s3://adapters/{name}", "mergeLora": False},
        },
    }


DEPLOYMENT = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "smollm2", "namespace": NS},
    "spec": {
        "model": {"uri": BASE},
        "adapters": [
            {"name": "legal", "uri": "s3://adapters/legal"},
            {"name": "support", "fineTuneJobRef": {"name": "support-v3"}},
        ],
        "compute": {"resourcesPerReplica": {"cpu": "2", "memory": "4Gi"}},
    },
}


def served_adapters(kube) -> list[dict] | None:
    service = kube.get_object(RAYSERVICES, NS, "smollm2")
    if service is None:
        return None
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    return app["deployments"][0]["user_config"]["adapters"]


def cluster_config(kube) -> str:
    service = kube.get_object(RAYSERVICES, NS, "smollm2")
    return json.dumps(service["spec"]["rayClusterConfig"], sort_keys=True)


def adapters_status(kube) -> dict[str, dict]:
    status = (kube.get_object(LLMD, NS, "smollm2") or {}).get("status") or {}
    return {a["name"]: a for a in status.get("adapters") or []}


def condition(kube, type_: str) -> dict:
    status = kube.get_object(LLMD, NS, "smollm2")["status"]
    return next(c for c in status["conditions"] if c["type"] == type_)


async def succeed(kube, job: str) -> None:
    await eventually(lambda: kube.get_object(RAYJOBS, NS, job), what=f"RayJob {job}")
    await play_kuberay_rayjob(kube, job, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    await eventually(
        lambda: (
            ((kube.get_object(FTJ, NS, job) or {}).get("status") or {}).get("phase") == "Succeeded"
        ),
        what=f"{job} Succeeded",
    )


async def test_an_adapter_job_succeeding_changes_the_serve_config_only(cluster):  # noqa: F811
    kube = cluster
    async with operator():
        await kube.apply_object(copy.deepcopy(DEPLOYMENT))
        # The base model is known: the RayService is there at once, serving the adapter that
        # is ready and listing the other as waiting, with why.
        adapters = await eventually(lambda: served_adapters(kube), what="RayService")
        assert adapters[0] == {
            "name": "legal",
            "uri": "s3://adapters/legal",
            "reason": "",
            "message": "",
        }
        assert adapters[1]["uri"] == "" and adapters[1]["reason"] == "FineTuneJobNotFound"
        before = cluster_config(kube)
        await eventually(lambda: "support" in adapters_status(kube), what="status.adapters")
        assert not adapters_status(kube)["support"]["ready"]

        await kube.apply_object(adapter_job("support-v3"))
        await eventually(
            lambda: served_adapters(kube)[1]["reason"] == "FineTuneJobPending", what="pending"
        )
        await succeed(kube, "support-v3")
        job_model = kube.get_object(FTJ, NS, "support-v3")["status"]["model"]
        assert job_model == {"uri": "s3://adapters/support-v3", "adapter": True, "baseModel": BASE}
        await eventually(
            lambda: served_adapters(kube)[1]["uri"] == "s3://adapters/support-v3",
            what="the adapter in serveConfigV2",
        )
        assert cluster_config(kube) == before  # KubeRay updates Serve in place
        await eventually(lambda: adapters_status(kube)["support"]["ready"], what="ready")
        assert condition(kube, "AdaptersReady")["status"] == "True"

        # An adapter trained on another base model is not served, and the condition says why.
        await kube.apply_object(adapter_job("legal-v2", base="hf://org/another-model"))
        await succeed(kube, "legal-v2")
        dep = kube.get_object(LLMD, NS, "smollm2")
        dep["spec"]["adapters"].append({"name": "legal-v2", "fineTuneJobRef": {"name": "legal-v2"}})
        await kube.apply_object(dep)
        await eventually(lambda: "legal-v2" in adapters_status(kube), what="legal-v2 status")
        cond = condition(kube, "AdaptersReady")
        assert (cond["status"], cond["reason"]) == ("False", "AdapterBaseMismatch")
        assert (
            "legal-v2: FineTuneJob legal-v2 trained this adapter on hf://org/another-model, "
            f"but this deployment serves {BASE}"
        ) in cond["message"]
        assert served_adapters(kube)[2]["reason"] == "AdapterBaseMismatch"
        assert cluster_config(kube) == before
        assert kube.get_object(LLMD, NS, "smollm2")["status"]["phase"] != "Failed"
