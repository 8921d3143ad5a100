"""The CRDs on a real API server: schema, defaults, CEL rules, immutability, kubectl explain."""

from __future__ import annotations

import json

import pytest
import yaml

from e2e.conftest import REPO

pytestmark = pytest.mark.e2e


def manifest(name: str, **spec) -> str:
    base = {
        "baseModel": {"uri": "s3://bucket/models/base"},
        "dataset": {"train": "s3://bucket/data/train.jsonl"},
    }
    return yaml.safe_dump(
        {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": base | spec,
        }
    )


def test_every_example_is_accepted(kubectl, crds_installed, namespace) -> None:
    for path in sorted((REPO / "examples").rglob("*.yaml")):
        done = kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
        assert done.returncode == 0, f"{path}: {done.stderr}"


def test_defaults_are_applied(kubectl, crds_installed, namespace) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest("defaults"))
    got = json.loads(kubectl("get", "ftj", "defaults", "-n", namespace, "-o", "json").stdout)
    assert got["spec"]["method"] == "full"
    assert got["spec"]["dataset"]["format"] == "instruction"
    assert got["spec"]["hyperparameters"]["learningRate"] == 2e-05


def test_cross_field_rule_rejected_with_its_message(kubectl, crds_installed, namespace) -> None:
    done = kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        check=False,
        stdin=manifest("bad", method="full", lora={"rank": 8}),
    )
    assert done.returncode != 0
    assert "spec.lora: only allowed when spec.method is lora or qlora" in done.stderr


def test_unknown_field_and_bad_enum_rejected(kubectl, crds_installed, namespace) -> None:
    done = kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        check=False,
        stdin=manifest("bad", method="sgd"),
    )
    assert done.returncode != 0 and "spec.method" in done.stderr


def test_spec_is_immutable(kubectl, crds_installed, namespace) -> None:
    kubectl("apply", "-n", namespace, "-f", "-", stdin=manifest("frozen"))
    patch = '{"spec": {"hyperparameters": {"epochs": 3}}}'
    done = kubectl(
        "patch", "ftj", "frozen", "-n", namespace, "--type=merge", "-p", patch, check=False
    )
    assert done.returncode != 0 and "immutable" in done.stderr


def test_explain_describes_fields(kubectl, crds_installed) -> None:
    out = kubectl("explain", "finetunejob.spec.dataset.maskPrompt").stdout
    assert "response tokens only" in out
