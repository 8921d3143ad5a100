"""What the KubeRay replay tests share: the cluster-side storage a job reads and writes (a PVC
folder with the tiny model, an S3 bucket on moto's server with data, runs and models), the
resource files a user would commit, and `llmray render` run as the user runs it."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

BUCKET = "llmray-test"
NS = "ml"
# The S3 credentials Secret of the namespace; the pods get it by reference only.
S3_SECRET = "s3-credentials"


def s3_secret(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }


def s3_env() -> list[dict[str, Any]]:
    """spec.env of a FineTuneJob: every S3 variable from the Secret, by reference."""
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": S3_SECRET, "key": key}}}
        for key in s3_secret("")
    ]


@dataclass
class World:
    root: Path  # the replay's workdir; PVCs under root/pvc
    endpoint: str
    s3: Any  # fsspec S3 filesystem
    run: str  # a prefix of this test in the bucket

    @property
    def secrets(self) -> dict[str, dict[str, str]]:
        return {S3_SECRET: s3_secret(self.endpoint)}

    def uri(self, key: str) -> str:
        return f"s3://{BUCKET}/{self.run}/{key}"


def make_world(tmp_path: Path, s3: Any, endpoint: str, tiny_model: Path, data: Path) -> World:
    root = tmp_path / "replay"
    shutil.copytree(tiny_model, root / "pvc" / "models" / "tiny")
    world = World(root, endpoint, s3, tmp_path.name)
    s3.put(str(data), f"{BUCKET}/{world.run}/data/train.jsonl")
    return world


def finetunejob(world: World, name: str, **spec: Any) -> dict[str, Any]:
    base = {
        "baseModel": {"uri": "pvc://models/tiny"},
        "dataset": {
            "train": world.uri("data/train.jsonl"),
            "format": "instruction",
            "maxSeqLength": 64,
        },
        "method": "full",
        "hyperparameters": {
            "maxSteps": 4,
            "learningRate": 3e-3,
            "batchSizePerWorker": 4,
            "warmupRatio": 0.0,
            "lrScheduler": "constant",
            "seed": 7,
            "precision": "fp32",
        },
        "strategy": {"type": "ddp"},
        "compute": {"workers": 2, "resourcesPerWorker": {"cpu": "1", "memory": "2Gi"}},
        "checkpointing": {"storageUri": world.uri("runs"), "everySteps": 2, "keep": 1},
        "maxRetries": 0,
        "env": s3_env(),
    }
    base.update(copy.deepcopy(spec))
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": base,
    }


def llmdeployment(name: str, job: str) -> dict[str, Any]:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "model": {"fineTuneJobRef": {"name": job}, "secretRef": {"name": S3_SECRET}},
            "compute": {"resourcesPerReplica": {"cpu": "1", "memory": "2Gi"}},
            "generation": {"maxNewTokens": 16, "maxPromptTokens": 64},
        },
    }


# Operator settings as a small cluster's chart would set them: a head of one core.
SETTINGS = ["--setting", "LLMRAY_HEAD_CPU=1", "--setting", "LLMRAY_HEAD_MEMORY=2Gi"]


def write(path: Path, resource: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(resource, sort_keys=False))
    return path


def render(capsys: Any, *args: str) -> list[dict[str, Any]]:
    """`llmray render ARGS...` as a user runs it: its objects, parsed back from its YAML."""
    from llmray_cli.main import main

    capsys.readouterr()
    code = main(["render", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return list(yaml.safe_load_all(out))


def config_maps(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}


def reload_model(uri: str, workdir: Path) -> str:
    """The exported model fetched from its URI and asked something: its answer."""
    from llmray import uris
    from llmray_trainer.generate import chat_answer

    local = uris.fetch(uri, workdir, workdir / "cache")
    assert (local / "config.json").exists() and list(local.glob("*.safetensors"))
    return chat_answer(str(local), "What is 2 plus 2?", max_new_tokens=8)
