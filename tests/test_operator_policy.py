"""What a CR author may ask of the pods (llmray_operator.policy), through the pure builders:
allowed image prefixes, tolerations on or off, the operator's own variables, read-only input
claims. The same checks through the running operator: test_operator_integration.py."""

from __future__ import annotations

import copy

import pytest

from llmray.api.validation import SpecError, parse_finetunejob, parse_llmdeployment
from llmray_operator import rayjob, rayservice
from llmray_operator.owner import Owner
from llmray_operator.settings import Settings

UID = "6f1c1d8e-0000-4000-8000-000000000002"
JOB = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "j", "namespace": "ml"},
    "spec": {
        "baseModel": {"uri": "pvc://models/base"},
        "dataset": {"train": "pvc://data/train.jsonl", "eval": "pvc://data/eval.jsonl"},
        "compute": {"workers": 2, "resourcesPerWorker": {"cpu": "4"}},
        "checkpointing": {"storageUri": "pvc://runs/"},
        "output": {"uri": "pvc://models/tuned"},
    },
}
DEPLOYMENT = {
    "apiVersion": "llmray.io/v1alpha1",
    "kind": "LLMDeployment",
    "metadata": {"name": "d", "namespace": "ml"},
    "spec": {"model": {"uri": "pvc://models/tuned"}},
}
TOLERATE_ALL = [{"operator": "Exists"}]
RESTRICTED = Settings(
    allowed_image_prefixes=("registry.example.com/ml/", "ghcr.io/llmray/"),
    allow_tolerations=False,
)


def _owner(kind: str, name: str) -> Owner:
    return Owner("llmray.io/v1alpha1", kind, name, "ml", UID)


def build_job(settings: Settings, **spec):
    obj = copy.deepcopy(JOB)
    obj["spec"].update(spec)
    job = parse_finetunejob(obj)
    return rayjob.build(job, _owner("FineTuneJob", "j"), settings)


def build_deployment(settings: Settings, **spec):
    obj = copy.deepcopy(DEPLOYMENT)
    obj["spec"].update(spec)
    dep = parse_llmdeployment(obj)
    return rayservice.build(dep, _owner("LLMDeployment", "d"), "pvc://models/tuned", settings)


def errors_of(build, settings: Settings, **spec) -> dict[str, str]:
    with pytest.raises(SpecError) as caught:
        build(settings, **spec)
    return {e.path: e.message for e in caught.value.errors}


@pytest.mark.parametrize("build", [build_job, build_deployment], ids=["ftj", "llmd"])
def test_an_image_outside_the_allowed_prefixes_is_invalid_spec(build):
    errors = errors_of(build, RESTRICTED, image="docker.io/someone/miner:latest")
    assert "docker.io/someone/miner:latest" in errors["spec.image"]
    assert "registry.example.com/ml/" in errors["spec.image"]
    # A prefix is a prefix of the whole reference: "registry.example.com/ml-other" is outside.
    assert "spec.image" in errors_of(build, RESTRICTED, image="registry.example.com/ml-x/t:1")
    build(RESTRICTED, image="registry.example.com/ml/trainer:1")  # inside: fine
    build(RESTRICTED)  # no spec.image: the operator's own default images
    build(Settings(), image="docker.io/someone/miner:latest")  # no policy: any image


@pytest.mark.parametrize("build", [build_job, build_deployment], ids=["ftj", "llmd"])
def test_tolerations_can_be_turned_off(build):
    def with_tolerations(settings: Settings):
        kind = JOB if build is build_job else DEPLOYMENT
        compute = copy.deepcopy(kind["spec"].get("compute", {}))
        return build(settings, compute={**compute, "tolerations": TOLERATE_ALL})

    built = with_tolerations(Settings())  # default: allowed, and passed to the pods
    ray_job = getattr(built, "ray_job", None)
    cluster = ray_job["spec"]["rayClusterSpec"] if ray_job else built["spec"]["rayClusterConfig"]
    assert cluster["workerGroupSpecs"][0]["template"]["spec"]["tolerations"] == TOLERATE_ALL
    with pytest.raises(SpecError, match=r"spec\.compute\.tolerations: not allowed"):
        with_tolerations(RESTRICTED)


def test_spec_env_may_not_override_the_operators_variables():
    env = [
        {"name": "OMP_NUM_THREADS", "value": "64"},
        {"name": "MY_SETTING", "value": "1"},
        {"name": "DS_ACCELERATOR", "value": "cuda"},
    ]
    errors = errors_of(build_job, Settings(), env=env)
    assert set(errors) == {"spec.env[0].name", "spec.env[2].name"}
    assert errors["spec.env[0].name"].startswith("OMP_NUM_THREADS is set by the operator")
    assert "DS_ACCELERATOR" in errors["spec.env[0].name"]  # the list of its own names
    children = build_job(Settings(), env=env[1:2])
    head = children.ray_job["spec"]["rayClusterSpec"]["headGroupSpec"]
    names = [e["name"] for e in head["template"]["spec"]["containers"][0]["env"]]
    assert len(names) == len(set(names)) and "MY_SETTING" in names


def test_input_claims_are_read_only_and_output_claims_writable():
    """The base model and the dataset are only read; checkpoints and the model are written.
    `models` holds both the base model and the output: writable."""
    children = build_job(Settings())
    spec = children.ray_job["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claim_of = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        read_only = {
            claim_of[m["name"]]: m.get("readOnly", False)
            for m in pod["containers"][0]["volumeMounts"]
            if m["name"] in claim_of
        }
        assert read_only == {"models": False, "data": True, "runs": False}
    service = build_deployment(Settings())
    for group in [
        service["spec"]["rayClusterConfig"]["headGroupSpec"],
        *service["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]:
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        (model,) = [m for m in mounts if m["mountPath"].endswith("/models")]
        assert model["readOnly"] is True  # serving never writes its model


def test_policy_settings_come_from_the_environment():
    settings = Settings.from_env(
        {
            "LLMRAY_ALLOWED_IMAGE_PREFIXES": "registry.example.com/ml/, ghcr.io/llmray/",
            "LLMRAY_ALLOW_TOLERATIONS": "false",
        }
    )
    assert settings.allowed_image_prefixes == ("registry.example.com/ml/", "ghcr.io/llmray/")
    assert settings.allow_tolerations is False
    assert Settings.from_env({}).allow_tolerations is True
