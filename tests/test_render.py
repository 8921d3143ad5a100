"""`llmray render`: exactly the objects the operator creates, as YAML, and the same errors as
`llmray validate`. The operator runs as in test_operator_integration.py (KopfRunner against
the API emulator); what it POSTs is compared with what render prints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from llmray_cli.main import main
from llmray_cli.render import PLACEHOLDER_UID
from tests.test_operator_integration import (
    CRDS,
    DEPLOYMENT,
    FTJ,
    JOB,
    LLMD,
    NS,
    RAYJOBS,
    RAYSERVICES,
    eventually,
    operator,
    play_kuberay_rayjob,
)

pytestmark = pytest.mark.timeout(120)
STORAGE = "s3://llmray-runs"


@pytest.fixture
async def cluster(tmp_path, monkeypatch):
    from tests.kube.emulator import emulated_cluster

    async with emulated_cluster(tmp_path, CRDS) as (kube, kubeconfig):
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("LLMRAY_DEFAULT_STORAGE_URI", STORAGE)
        monkeypatch.setenv("LLMRAY_HEAD_MEMORY", "6Gi")
        yield kube


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def render(capsys, *args: str) -> list[dict]:
    code, out, err = run(capsys, "render", *args)
    assert code == 0, err
    return list(yaml.safe_load_all(out))


def created(kube, plural: str) -> list[dict]:
    """The bodies the operator POSTed for `plural` (before the API server added anything)."""
    return [
        r.data
        for r in kube
        if r.method == "POST" and r.resource is not None and r.resource.plural == plural
    ]


def write(path: Path, resource: dict) -> str:
    path.write_text(yaml.safe_dump(resource))
    return str(path)


def with_uid(objects: list[dict], uid: str) -> list[dict]:
    """`objects` with their owner's uid replaced by `uid`, wherever it stands (the
    ownerReferences, and the trainer config's run_id)."""
    out = copy.deepcopy(objects)
    for obj in out:
        for ref in obj["metadata"].get("ownerReferences", []):
            old, ref["uid"] = ref["uid"], uid
            if "trainer.json" in obj.get("data", {}):
                obj["data"]["trainer.json"] = obj["data"]["trainer.json"].replace(old, uid)
    return out


async def test_render_prints_what_the_operator_creates(cluster, tmp_path, capsys):
    kube = cluster
    job_file = write(tmp_path / "job.yaml", JOB)
    dep_file = write(tmp_path / "dep.yaml", DEPLOYMENT)
    async with operator():
        await kube.apply_object(copy.deepcopy(JOB))
        await kube.apply_object(copy.deepcopy(DEPLOYMENT))
        await eventually(lambda: kube.get_object(RAYJOBS, NS, "support-bot"), what="RayJob")
        await play_kuberay_rayjob(
            kube, "support-bot", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED"
        )
        await eventually(lambda: kube.get_object(RAYSERVICES, NS, "support-bot"), what="RS")
    job_uid = kube.get_object(FTJ, NS, "support-bot")["metadata"]["uid"]
    dep_uid = kube.get_object(LLMD, NS, "support-bot")["metadata"]["uid"]

    # The same settings as the operator's (the environment), the owner's uid from the cluster:
    # the very objects the operator created.
    job_children = render(capsys, job_file, "--owner-uid", job_uid)
    assert [o["kind"] for o in job_children] == ["ConfigMap", "RayJob"]
    assert job_children == created(kube, "configmaps") + created(kube, "rayjobs")
    service = render(capsys, dep_file, "--job", job_file, "--owner-uid", dep_uid)
    assert service == created(kube, "rayservices")
    # Without --owner-uid: the same with the documented placeholder uid.
    assert render(capsys, job_file) == with_uid(job_children, PLACEHOLDER_UID)
    # --model-uri: what the job's status.model.uri says.
    model = kube.get_object(FTJ, NS, "support-bot")["status"]["model"]["uri"]
    assert render(capsys, dep_file, "--model-uri", model, "--owner-uid", dep_uid) == service


def test_settings_come_from_the_environment_and_flags(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRAY_TRAINER_IMAGE", "registry.example/trainer:1")
    job = copy.deepcopy(JOB)
    del job["spec"]["checkpointing"], job["spec"]["output"]
    path = write(tmp_path / "job.yaml", job)
    config_map, ray_job = render(
        capsys, path, "--setting", f"LLMRAY_DEFAULT_STORAGE_URI={STORAGE}", "-n", NS
    )
    head = ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/trainer:1"
    # The operator's default storage, a folder per namespace.
    assert f'"output_uri": "{STORAGE}/{NS}/support-bot/model"' in config_map["data"]["trainer.json"]

    code, _, err = run(capsys, "render", path, "--setting", "LLMRAY_NO_SUCH=1")
    assert code == 2 and "--setting LLMRAY_NO_SUCH=1" in err and "LLMRAY_HEAD_CPU" in err


def test_spec_errors_read_as_llmray_validate_says_them(capsys, tmp_path):
    bad = copy.deepcopy(JOB)
    bad["spec"]["dataset"]["format"] = "csv"
    bad["spec"]["lora"] = {"rank": 0}
    path = write(tmp_path / "bad.yaml", bad)
    code, out, err = run(capsys, "render", path)
    assert (code, out) == (2, "")
    assert "spec.dataset.format" in err and "spec.lora.rank" in err
    assert err == run(capsys, "validate", path)[2]


def test_what_only_a_cluster_rejects_names_the_field(capsys, tmp_path):
    local = copy.deepcopy(JOB)
    local["spec"]["dataset"]["train"] = "data/train.jsonl"  # fine for `llmray finetune`
    code, _, err = run(capsys, "render", write(tmp_path / "job.yaml", local))
    assert code == 2 and "spec.dataset.train: data/train.jsonl is a local path" in err


def test_a_deployment_of_a_job_needs_the_jobs_model(capsys, tmp_path):
    path = write(tmp_path / "dep.yaml", DEPLOYMENT)
    code, _, err = run(capsys, "render", path)
    assert code == 2 and "--model-uri URI or --job FILE" in err
    other = copy.deepcopy(JOB)
    other["metadata"]["name"] = "another-job"
    code, _, err = run(capsys, "render", path, "--job", write(tmp_path / "job.yaml", other))
    assert code == 2 and "this LLMDeployment references support-bot" in err


def test_namespace_flag_and_file_must_agree(capsys, tmp_path):
    path = write(tmp_path / "job.yaml", JOB)
    code, _, err = run(capsys, "render", path, "-n", "elsewhere")
    assert code == 2 and "metadata.namespace: ml does not match the namespace elsewhere" in err
    unnamed = copy.deepcopy(JOB)
    del unnamed["metadata"]["namespace"]
    (_, ray_job) = render(capsys, write(tmp_path / "u.yaml", unnamed), "-n", "team-b")
    assert ray_job["metadata"]["namespace"] == "team-b"
