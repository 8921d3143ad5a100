"""The KubeRay replay's own rules (tests/kuberay_replay/), pure parts: what KubeRay 1.7 makes
of a pod template. The replay itself runs in test_replay_*.py."""

from __future__ import annotations

import shlex

import pytest

from tests.kuberay_replay.emulated import status_patch
from tests.kuberay_replay.pods import (
    MissingReference,
    auth_env,
    cluster_pods,
    container_env,
    quantity,
    ray_start_args,
    start_params,
)
from tests.kuberay_replay.rayjob import submit_command


def group(limits, **extra):
    return {
        "groupName": "workers",
        "replicas": 2,
        "rayStartParams": {},
        "template": {
            "spec": {"containers": [{"name": "ray-worker", "resources": {"limits": limits}}]}
        },
        **extra,
    }


@pytest.mark.parametrize(
    ("text", "value"),
    [("500m", 0.5), ("2", 2), ("4Gi", 4 * 2**30), ("1.5", 1.5), ("1e3", 1000), ("2k", 2000)],
)
def test_quantities(text, value):
    assert quantity(text) == value


def test_start_params_follow_kuberay():
    g = group({"cpu": "1500m", "memory": "2Gi", "nvidia.com/gpu": 1}, labels={"b": "2", "a": "1"})
    params = start_params(g, g["template"]["spec"]["containers"][0], head=False, head_service="c")
    assert params == {
        "labels": "a=1,b=2",
        "num-cpus": "2",  # resource.Quantity.Value() rounds up
        "memory": str(2 * 2**30),
        "num-gpus": "1",
        "address": "c-head-svc:6379",
        "metrics-export-port": "8080",
        "dashboard-agent-listen-port": "52365",
        "block": "true",
    }
    # Intel's device plugin resource does not end in "gpu": KubeRay sets no num-gpus for it.
    intel = group({"cpu": "1", "gpu.intel.com/i915": 1})
    assert "num-gpus" not in start_params(
        intel, intel["template"]["spec"]["containers"][0], head=False, head_service="c"
    )
    assert ray_start_args({"block": "true", "num-cpus": "0", "x": "false"}) == [
        "--block",
        "--num-cpus=0",
    ]


def test_one_pod_per_replica():
    head = {"rayStartParams": {"num-cpus": "0"}, "template": {"spec": {"containers": [{}]}}}
    rank0 = {**group({"cpu": "1"}), "groupName": "rank0", "replicas": 1}
    pods = cluster_pods(
        {"headGroupSpec": head, "workerGroupSpecs": [rank0, group({"cpu": "1"})]}, "c"
    )
    assert [p.name for p in pods] == [
        "c-head",
        "c-rank0-worker-0",
        "c-workers-worker-0",
        "c-workers-worker-1",
    ]
    assert pods[0].head and pods[0].start_params["num-cpus"] == "0"


def test_container_env_resolves_references_as_the_kubelet_does():
    pod = cluster_pods(
        {
            "headGroupSpec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "envFrom": [{"secretRef": {"name": "creds"}}],
                                "env": [
                                    {"name": "A", "value": "1"},
                                    {"name": "B", "value": "$(A)-$(NOPE)-$$(A)"},
                                    {
                                        "name": "KEY",
                                        "valueFrom": {"secretKeyRef": {"name": "k", "key": "key"}},
                                    },
                                    {
                                        "name": "POD",
                                        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                    },
                                ],
                            }
                        ]
                    }
                }
            }
        },
        "c",
    )[0]
    secrets = {"creds": {"ID": "x"}, "k": {"key": "s3cret"}}
    env = container_env(pod, namespace="ml", secrets=secrets, config_maps={})
    assert env == {"ID": "x", "A": "1", "B": "1-$(NOPE)-$(A)", "KEY": "s3cret", "POD": "c-head"}
    with pytest.raises(MissingReference, match="Secret k not found"):
        container_env(pod, namespace="ml", secrets={"creds": {}}, config_maps={})


def test_token_auth_only_when_the_cluster_asks():
    assert auth_env({"authOptions": {"mode": "token"}}, "t") == {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": "t",
    }
    assert auth_env({}, "t") == {}


def test_the_submitter_runs_kuberays_command():
    job = {"spec": {"entrypoint": "python -m llmray_trainer --config /etc/llmray/trainer.json"}}
    command = submit_command(job, "http://127.0.0.1:8265", "j-abcde")
    assert "ray job status --address http://127.0.0.1:8265 j-abcde" in command
    assert (
        "ray job submit --address http://127.0.0.1:8265 --no-wait --submission-id j-abcde -- "
        "python -m llmray_trainer --config /etc/llmray/trainer.json ;" in command
    )
    assert command.endswith("ray job logs --address http://127.0.0.1:8265 --follow j-abcde")
    shlex.split(command)  # well-formed for the shell


def test_status_patch_nulls_what_is_gone():
    before = {"a": 1, "b": {"x": 1, "y": 2}, "reason": "AppFailed"}
    after = {"a": 1, "b": {"x": 3}, "c": [1]}
    assert status_patch(before, after) == {"reason": None, "b": {"y": None, "x": 3}, "c": [1]}
