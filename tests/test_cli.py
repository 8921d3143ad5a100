"""The `llmray` command as a user types it: exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import EXAMPLES, REPO


def llmray(*args: str, cwd: Path = REPO, home: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if home is not None:
        import os

        env = {**os.environ, "LLMRAY_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "llmray_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_validate_accepts_every_example() -> None:
    files = sorted(str(p) for p in EXAMPLES.rglob("*.yaml"))
    done = llmray("validate", *files)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("is valid") == len(files)


def test_validate_reports_every_error_with_its_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: llmray.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: x}\n"
        "spec:\n  baseModel: {uri: 'ftp://x/y'}\n  dataset: {train: d.jsonl, format: csv}\n"
        "  method: full\n  lora: {rank: 8}\n"
    )
    done = llmray("validate", str(bad))
    assert done.returncode == 2
    assert "spec.dataset.format" in done.stderr
    assert "spec.baseModel.uri" in done.stderr
    assert "spec.lora" in done.stderr


def test_finetune_bad_data_line_exits_2_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text(
        '{"instruction": "a", "response": "b"}\n{"instruction": "a", "response": "b"}\n'
        '{"instruction": "a"\n'
    )
    (tmp_path / "job.yaml").write_text(
        "apiVersion: llmray.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: bad-line}\n"
        "spec:\n  baseModel: {uri: models/none}\n  dataset: {train: d.jsonl}\n"
    )
    done = llmray("finetune", "job.yaml", cwd=tmp_path, home=tmp_path / "home")
    assert done.returncode == 2, done.stderr
    assert "d.jsonl:3" in done.stderr and "Traceback" not in done.stderr


def test_finetune_missing_model_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    (tmp_path / "job.yaml").write_text(
        "apiVersion: llmray.io/v1alpha1\nkind: FineTuneJob\nmetadata: {name: no-model}\n"
        "spec:\n  baseModel: {uri: models/none}\n  dataset: {train: d.jsonl}\n"
    )
    done = llmray("finetune", "job.yaml", cwd=tmp_path, home=tmp_path / "home")
    assert done.returncode == 2, done.stderr
    assert "spec.baseModel.uri: models/none" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_console_script_is_the_command_line_package() -> None:
    """`llmray` (pip's console script) runs llmray_cli's main, which offers every command."""
    import importlib

    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["llmray"]
    module, _, name = target.partition(":")
    assert module.split(".")[0] == "llmray_cli"
    assert callable(getattr(importlib.import_module(module), name))
    done = llmray("--help")
    assert done.returncode == 0, done.stderr
    for command in ("validate", "finetune", "serve", "init-model", "crds", "operator"):
        assert command in done.stdout


def test_crds_prints_both_resources() -> None:
    done = llmray("crds")
    assert done.returncode == 0, done.stderr
    assert "kind: CustomResourceDefinition" in done.stdout
    assert "finetunejobs.llmray.io" in done.stdout and "llmdeployments.llmray.io" in done.stdout
