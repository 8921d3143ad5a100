"""A FineTuneJob rendered by `llmray render` and run the way KubeRay 1.7 runs its RayJob: one
Ray node per pod (head, rank-0 group, workers), the ConfigMap where the head mounts it, the
entrypoint submitted by KubeRay's submitter command with Ray's token auth, the RayJob status
as KubeRay writes it (tests/kuberay_replay/)."""

from __future__ import annotations

import re

import pytest

from llmray.progress import PREFIX, failure_of, parse_line
from llmray_operator.status import rayjob_verdict
from tests.kuberay_replay.rayjob import RayJobReplay
from tests.replay_world import (
    SETTINGS,
    config_maps,
    finetunejob,
    make_world,
    reload_model,
    render,
    write,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
RANK0_LABEL = {"llmray.io/rank0": "true"}


@pytest.fixture
def world(tmp_path, s3, s3_endpoint, tiny_model, small_data):
    return make_world(tmp_path, s3, s3_endpoint, tiny_model, small_data)


def rank0_job(world):
    return finetunejob(
        world,
        "rank0-job",
        compute={
            "workers": 3,
            "resourcesPerWorker": {"cpu": "1", "memory": "2Gi"},
            "rank0": {"nodeSelector": {"llmray.io/memory-class": "large"}, "memory": "2Gi"},
        },
        output={"uri": world.uri("models/rank0-job")},
    )


def run(world, objects) -> tuple[RayJobReplay, dict]:
    ray_job = next(o for o in objects if o["kind"] == "RayJob")
    replay = RayJobReplay(
        ray_job, workdir=world.root, config_maps=config_maps(objects), secrets=world.secrets
    )
    try:
        result = replay.run(timeout=800)
    finally:
        replay.stop()
    return replay, result.status


def test_rank0_job_trains_on_the_labelled_node_and_exports_to_s3(world, tmp_path, capsys):
    objects = render(capsys, str(write(tmp_path / "job.yaml", rank0_job(world))), *SETTINGS)
    ray_job = objects[1]
    groups = {g["groupName"]: g for g in ray_job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups["rank0"]["labels"] == RANK0_LABEL and groups["workers"]["replicas"] == 2

    replay, status = run(world, objects)

    assert status["jobDeploymentStatus"] == "Complete", status.get("message")
    assert status["jobStatus"] == "SUCCEEDED" and status["succeeded"] == 1
    assert rayjob_verdict(status).phase == "Succeeded"
    # Head (no CPUs), one rank-0 node with the label, two workers: one Ray node per pod.
    (cluster,) = replay.clusters
    nodes = {n["node_id"]: n for n in cluster.node_table}
    labelled = [i for i, n in nodes.items() if n["labels"].get("llmray.io/rank0") == "true"]
    assert len(nodes) == 4 and len(labelled) == 1
    assert sorted(n["resources_total"].get("CPU", 0) for n in nodes.values()) == [0, 1, 1, 1]
    # The trainer's own check ran on rank 0, on that node.
    log = replay.logs[-1]
    (rank0_node,) = re.findall(r"rank 0 runs on Ray node (\w+), labelled", log)
    assert rank0_node == labelled[0]
    steps = [r for r in map(parse_line, log.splitlines()) if r and r.get("event") == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[-1]["trainLoss"] < steps[0]["trainLoss"]
    # Checkpoints and the model went to S3 (Ray Train's storage through pyarrow, the export
    # through fsspec), and the model reloads and generates.
    assert world.s3.glob(f"llmray-test/{world.run}/runs/rank0-job/checkpoint_*")
    assert isinstance(reload_model(world.uri("models/rank0-job"), tmp_path), str)


def test_without_the_rank0_label_the_job_fails_with_the_documented_message(world, tmp_path, capsys):
    objects = render(capsys, str(write(tmp_path / "job.yaml", rank0_job(world))), *SETTINGS)
    for group in objects[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        group.pop("labels", None)

    replay, status = run(world, objects)

    # Before the fix Ray Train waited for the node for ever (RUNNING, no failure counted).
    assert status["jobDeploymentStatus"] == "Failed" and status["reason"] == "AppFailed"
    message = failure_of(status["message"])
    assert message is not None and message.startswith(
        "rank 0 needs a Ray node with the label llmray.io/rank0=true and room for one worker"
    )
    # What the FineTuneJob's Failed condition says: that sentence, not Ray's log tail.
    verdict = rayjob_verdict(status)
    assert (verdict.phase, verdict.reason, verdict.message) == ("Failed", "AppFailed", message)
    assert PREFIX in replay.logs[-1]
