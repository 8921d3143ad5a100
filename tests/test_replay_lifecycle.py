"""The whole path with nothing hand-written in KubeRay's place: the real operator (kopf's
KopfRunner) against the Kubernetes API emulator, and the KubeRay replay running what it
creates (tests/kuberay_replay/emulated.py): FineTuneJob -> RayJob -> training on a Ray node
per pod -> Succeeded with the trainer's progress and model URI -> LLMDeployment ->
RayService -> Ray Serve -> Ready, and the endpoint answers."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.kuberay_replay.emulated import KubeRayReplay
from tests.replay_world import BUCKET, NS, finetunejob, llmdeployment, make_world
from tests.test_operator_integration import CRDS, FTJ, LLMD, eventually, operator, phase

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


@pytest.fixture
async def cluster(tmp_path, monkeypatch, s3_endpoint):
    from tests.kube.emulator import emulated_cluster

    async with emulated_cluster(tmp_path, CRDS) as (kube, kubeconfig):
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("LLMRAY_PROGRESS_SECONDS", "1")
        monkeypatch.setenv("LLMRAY_HEAD_CPU", "1")
        monkeypatch.setenv("LLMRAY_HEAD_MEMORY", "2Gi")
        await kube.apply_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
        yield kube


async def test_finetune_then_serve_through_the_operator_and_the_replay(
    cluster, tmp_path, s3, s3_endpoint, tiny_model, small_data
):
    kube = cluster
    world = make_world(tmp_path, s3, s3_endpoint, tiny_model, small_data)
    kuberay = KubeRayReplay(kube, world.root, secrets=world.secrets)
    async with operator(), kuberay.running():
        await kube.apply_object(finetunejob(world, "support"))

        def done():
            assert not kuberay.errors, kuberay.errors
            return phase(kube, FTJ, "support") in ("Succeeded", "Failed")

        await eventually(done, timeout=600, what="the job to finish")
        status = kube.get_object(FTJ, NS, "support")["status"]
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert status["phase"] == "Succeeded", failed
        # Progress the operator read from the submitter pod's log, as the trainer printed it.
        assert status["progress"]["step"] == status["progress"]["totalSteps"] == 4
        assert status["progress"]["trainLoss"] > 0
        assert status["latestCheckpoint"].startswith(world.uri("runs/support/checkpoint_"))
        assert status["model"]["uri"] == world.uri("runs/support/model")
        assert s3.exists(f"{BUCKET}/{world.run}/runs/support/model/config.json")
        assert status["startTime"] and status["completionTime"]

        await kube.apply_object(llmdeployment("support", "support"))
        await eventually(
            lambda: not kuberay.errors and phase(kube, LLMD, "support") == "Ready",
            timeout=400,
            what="the deployment to be Ready",
        )
        dep = kube.get_object(LLMD, NS, "support")["status"]
        assert dep["modelUri"] == world.uri("runs/support/model")
        assert dep["endpoint"] == "http://support-serve-svc.ml.svc.cluster.local:8000/v1"
        # <name>-serve-svc:8000 is the replay's serve port on this machine.
        base = kuberay.services[(NS, "support")].endpoint
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        answer = await asyncio.to_thread(
            client.completions.create, model="support", prompt="Hello", max_tokens=4
        )
        assert answer.usage.completion_tokens > 0
