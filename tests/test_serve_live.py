"""`llmray serve`'s live changes without Ray: what it deploys, and what an edit to its file
(or to a referenced job's status) deploys next."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmray_serve import local


def write(path: Path, adapters: list[dict], max_new_tokens: int = 32) -> None:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "llmray.io/v1alpha1",
                "kind": "LLMDeployment",
                "metadata": {"name": "d"},
                "spec": {
                    "model": {"uri": "models/base"},
                    "adapters": adapters,
                    "generation": {"maxNewTokens": max_new_tokens},
                },
            }
        )
    )


@pytest.fixture
def deployed(monkeypatch, tmp_path, llmray_home):
    calls: list[tuple] = []
    monkeypatch.setattr(local, "deploy", lambda args, config: calls.append((args, config)))
    monkeypatch.setattr(local, "wait_running", lambda name: calls.append(("restart", name)))
    return calls


def test_the_deployed_config_carries_the_adapters_as_user_config(tmp_path, llmray_home) -> None:
    spec = tmp_path / "d.yaml"
    write(
        spec,
        [
            {"name": "legal", "uri": "adapters/legal"},
            {"name": "w", "fineTuneJobRef": {"name": "w"}},
        ],
    )
    running = local.local_deployment(spec)
    (app,) = local.serve_config(running.args, running.user_config)["applications"]
    assert app["import_path"] == "llmray_serve.app:build_app"
    (deployment,) = app["deployments"]
    adapters = deployment["user_config"]["adapters"]
    assert adapters[0] == {"name": "legal", "uri": "adapters/legal", "reason": "", "message": ""}
    assert adapters[1]["reason"] == "FineTuneJobNotFound" and not adapters[1]["uri"]
    assert running.watched == (spec, llmray_home / "jobs" / "w" / "status.json")


def test_an_adapter_edit_reconfigures_other_edits_restart(tmp_path, deployed, capsys) -> None:
    spec = tmp_path / "d.yaml"
    write(spec, [{"name": "legal", "uri": "adapters/legal"}])
    running = local.local_deployment(spec)
    assert local.reload(spec, running) is not None and not deployed  # nothing changed

    write(spec, [{"name": "legal", "uri": "adapters/legal"}, {"name": "hr", "uri": "adapters/hr"}])
    running = local.reload(spec, running)
    ((_, config),) = deployed
    assert [a.name for a in config.adapters] == ["legal", "hr"]
    assert "adapters updated in place: ready legal, hr" in capsys.readouterr().out

    deployed.clear()
    write(spec, [{"name": "hr", "uri": "adapters/hr"}], max_new_tokens=64)
    running = local.reload(spec, running)
    assert deployed[-1] == ("restart", "d") and running.args.max_new_tokens == 64
    assert "the replicas restart" in capsys.readouterr().out


def test_a_broken_edit_keeps_the_running_deployment(tmp_path, deployed, capsys) -> None:
    spec = tmp_path / "d.yaml"
    write(spec, [{"name": "legal", "uri": "adapters/legal"}])
    running = local.local_deployment(spec)
    write(spec, [{"name": "legal", "uri": "a"}, {"name": "legal", "uri": "b"}])  # not unique
    assert local.reload(spec, running) is running and not deployed
    assert "not applied, still serving the previous spec" in capsys.readouterr().out


def test_a_referenced_job_that_succeeds_is_a_change_to_watch(tmp_path, llmray_home) -> None:
    spec = tmp_path / "d.yaml"
    write(spec, [{"name": "w", "fineTuneJobRef": {"name": "w"}}])
    running = local.local_deployment(spec)
    before = local.fingerprint(running.watched)
    status = llmray_home / "jobs" / "w" / "status.json"
    status.parent.mkdir(parents=True, exist_ok=True)
    status.write_text(
        json.dumps({"phase": "Succeeded", "model": {"uri": "/runs/w", "adapter": True}})
    )
    assert local.fingerprint(running.watched) != before
    (adapter,) = local.local_deployment(spec).user_config.adapters
    assert adapter.ready and adapter.uri == "/runs/w"
