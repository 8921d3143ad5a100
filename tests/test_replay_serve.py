"""An LLMDeployment serving a FineTuneJob's model, rendered by `llmray render` and run the way
KubeRay 1.7 runs a RayService: the cluster from rayClusterConfig, serveConfigV2 PUT to Serve's
REST API on the head's dashboard (token auth), Ready once the application is RUNNING, the
`openai` client answered through the serve port (tests/kuberay_replay/)."""

from __future__ import annotations

import openai
import pytest

from llmray import uris
from llmray_operator.status import rayservice_verdict
from tests.kuberay_replay.rayservice import RayServiceReplay
from tests.replay_world import (
    SETTINGS,
    finetunejob,
    llmdeployment,
    make_world,
    render,
    write,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_deployment_of_a_jobs_model_serves_it_through_the_serve_port(
    tmp_path, s3, s3_endpoint, tiny_model, small_data, capsys
):
    world = make_world(tmp_path, s3, s3_endpoint, tiny_model, small_data)
    job = write(tmp_path / "job.yaml", finetunejob(world, "support"))
    dep = write(tmp_path / "dep.yaml", llmdeployment("support", "support"))
    # What the job exports (its status.model.uri once it succeeded): here, the tiny model.
    job_objects = render(capsys, str(job), *SETTINGS)
    output = job_objects[0]["data"]["trainer.json"]
    model_uri = world.uri("runs/support/model")
    assert f'"output_uri": "{model_uri}"' in output
    uris.upload(tiny_model, model_uri, tmp_path)

    (service,) = render(capsys, str(dep), "--job", str(job), *SETTINGS)
    assert model_uri in service["spec"]["serveConfigV2"]

    replay = RayServiceReplay(service, workdir=world.root, secrets=world.secrets)
    with replay:
        status = replay.status
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("True", "NonZeroServeEndpoints")
        apps = status["activeServiceStatus"]["applicationStatuses"]
        assert apps["support"]["status"] == "RUNNING"
        assert rayservice_verdict(status).phase == "Ready"

        client = openai.OpenAI(
            base_url=f"{replay.endpoint}/v1", api_key="unused", max_retries=0, timeout=120
        )
        assert [m.id for m in client.models.list().data] == ["support"]
        answer = client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "Hi"}], max_tokens=8
        )
        assert answer.choices[0].message.content and answer.usage.completion_tokens > 0
