"""e2e tests run against the cluster in KUBECONFIG (kind, minikube, a real one with KubeRay).

Skipped, not failed, when there is no cluster or no kubectl: `make e2e` on a laptop without
one reports them as skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def kubectl_binary() -> str | None:
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


def _cluster_reachable(kubectl: str) -> bool:
    try:
        done = subprocess.run(
            [kubectl, "version", "-o", "json"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "serverVersion" in json.loads(done.stdout or "{}")


@pytest.fixture(scope="session")
def kubectl() -> Iterator[Callable[..., subprocess.CompletedProcess]]:
    binary = kubectl_binary()
    if not os.environ.get("KUBECONFIG") and not Path("~/.kube/config").expanduser().exists():
        pytest.skip("no KUBECONFIG: e2e tests need a cluster")
    if binary is None:
        pytest.skip("kubectl not found (set KUBECTL or put it on PATH)")
    if not _cluster_reachable(binary):
        pytest.skip("the cluster in KUBECONFIG does not answer")

    def run(*args: str, stdin: str | None = None, check: bool = True):
        done = subprocess.run(
            [binary, *args], input=stdin, capture_output=True, text=True, timeout=120
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr}")
        return done

    yield run


@pytest.fixture(scope="session")
def crds_installed(kubectl) -> None:
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    for name in ("finetunejobs.llmray.io", "llmdeployments.llmray.io"):
        kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")


@pytest.fixture
def namespace(kubectl) -> Iterator[str]:
    name = f"llmray-e2e-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)
