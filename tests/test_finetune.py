"""`llmray finetune` end to end on real Ray Train, real DeepSpeed, a tiny random Llama.

Each test writes a FineTuneJob YAML as a user would and runs it through the same entry the
CLI uses; assertions are what a user sees: loss falls, the model reloads and generates, a
killed worker resumes, a re-run resumes, a bad line names its file and line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES

pytestmark = pytest.mark.integration


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def write_job(folder: Path, name: str, model: Path, train: Path, **spec: Any) -> Path:
    base = {
        "baseModel": {"uri": str(model)},
        "dataset": {"train": str(train), "format": "instruction", "maxSeqLength": 64},
        "hyperparameters": {
            "maxSteps": 12,
            "learningRate": 3e-3,
            "batchSizePerWorker": 4,
            "warmupRatio": 0.0,
            "lrScheduler": "constant",
            "seed": 7,
        },
        "compute": {"workers": 2},
        "checkpointing": {"everyEpoch": False},
    }
    doc = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": deep_merge(base, spec),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def finetune(path: Path):
    from llmray_trainer.local import finetune_file

    return finetune_file(path)


def losses(result) -> list[float]:
    return [r["trainLoss"] for r in result.steps]


def assert_loss_falls(result, factor: float = 0.85) -> None:
    first, last = losses(result)[0], losses(result)[-1]
    assert last < first * factor, f"loss did not fall enough: {losses(result)}"


def assert_model_generates(model_dir: str) -> None:
    from llmray_trainer.generate import chat_answer

    assert Path(model_dir, "config.json").exists()
    assert any(Path(model_dir).glob("*.safetensors"))
    assert Path(model_dir, "tokenizer.json").exists()
    answer = chat_answer(model_dir, "What is 2 plus 2?", max_new_tokens=8)
    assert isinstance(answer, str)


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param({"type": "ddp"}, id="ddp"),
        pytest.param({"type": "deepspeed", "zeroStage": 2}, id="zero2"),
        pytest.param({"type": "deepspeed", "zeroStage": 3}, id="zero3"),
        pytest.param(
            {"type": "deepspeed", "zeroStage": 1, "offloadOptimizer": True}, id="zero1-offload"
        ),
    ],
)
def test_loss_falls_and_model_reloads(ray_session, tmp_path, tiny_model, small_data, strategy):
    job = write_job(
        tmp_path,
        f"strategy-{strategy.get('zeroStage', 0)}",
        tiny_model,
        small_data,
        strategy=strategy,
    )
    result = finetune(job)
    assert [r["step"] for r in result.steps] == list(range(1, 13))
    assert_loss_falls(result)
    assert_model_generates(result.model_uri)


def test_lora_merged_export(ray_session, tmp_path, tiny_model, small_data):
    # A random-init model predicts through its random lm_head: adapt it too, and every linear.
    modules = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ]
    job = write_job(
        tmp_path,
        "lora",
        tiny_model,
        small_data,
        method="lora",
        lora={"rank": 16, "alpha": 32, "dropout": 0.0, "targetModules": modules},
        hyperparameters={"learningRate": 2e-2},
    )
    result = finetune(job)
    assert_loss_falls(result)
    exported = Path(result.model_uri)
    assert not (exported / "adapter_config.json").exists(), "mergeLora should export full weights"
    from safetensors import safe_open

    with safe_open(str(next(exported.glob("*.safetensors"))), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # noqa: SIM118 (safe_open has no __iter__)
    assert_model_generates(result.model_uri)


def test_same_seed_same_losses(ray_session, tmp_path, tiny_model, small_data):
    runs = [
        finetune(
            write_job(
                tmp_path, f"seed-{i}", tiny_model, small_data, hyperparameters={"maxSteps": 5}
            )
        )
        for i in range(2)
    ]
    assert losses(runs[0]) == pytest.approx(losses(runs[1]), rel=1e-6)


def test_killed_worker_resumes_from_checkpoint(
    ray_session, tmp_path, tiny_model, small_data, monkeypatch
):
    # A real SIGKILL of rank 1's process at step 7 (triggered from inside the worker so the
    # moment is deterministic); Ray Train restarts the group from the step-6 checkpoint.
    marker = tmp_path / "killed"
    monkeypatch.setenv("LLMRAY_TEST_KILL_AT_STEP", "7")
    monkeypatch.setenv("LLMRAY_TEST_KILL_RANK", "1")
    monkeypatch.setenv("LLMRAY_TEST_KILL_MARKER", str(marker))
    job = write_job(
        tmp_path, "killed", tiny_model, small_data, maxRetries=1, checkpointing={"everySteps": 3}
    )
    # Workers inherit the env through Ray's runtime env of the launcher.
    result = finetune(job)
    assert marker.exists(), "the worker was never killed"
    resumed = [r for r in result.records if r["event"] == "resumed"]
    assert [r["step"] for r in resumed] == [6]
    steps = [r["step"] for r in result.steps]
    assert steps[-1] == 12 and steps.count(7) == 1  # step 7 was lost with the worker, redone once
    assert_model_generates(result.model_uri)


def test_rerun_same_name_resumes(ray_session, tmp_path, tiny_model, small_data):
    first = finetune(
        write_job(
            tmp_path,
            "rerun",
            tiny_model,
            small_data,
            hyperparameters={"maxSteps": 4},
            checkpointing={"everySteps": 2},
        )
    )
    assert [r["step"] for r in first.steps] == [1, 2, 3, 4]
    second = finetune(
        write_job(
            tmp_path,
            "rerun",
            tiny_model,
            small_data,
            hyperparameters={"maxSteps": 8},
            checkpointing={"everySteps": 2},
        )
    )
    assert [r["step"] for r in second.records if r["event"] == "resumed"] == [4]
    assert [r["step"] for r in second.steps] == [5, 6, 7, 8]


@pytest.mark.parametrize("fmt", ["text", "chat"])
def test_other_formats_train(ray_session, tmp_path, tiny_model, fmt):
    extra = (
        {"specialTokens": ["<USER>", "</USER>", "<ASSISTANT>", "</ASSISTANT>"]}
        if fmt == "text"
        else {}
    )
    job = write_job(
        tmp_path,
        f"fmt-{fmt}",
        tiny_model,
        EXAMPLES / "data" / f"{fmt}.jsonl",
        dataset={"format": fmt, "evalFraction": 0.1, **extra},
        compute={"workers": 1},
        hyperparameters={
            "maxSteps": 8,
            "gradientAccumulationSteps": 2,
            "gradientCheckpointing": True,
            "lrScheduler": "cosine",
            "warmupRatio": 0.2,
        },
    )
    result = finetune(job)
    assert_loss_falls(result, factor=0.95)
    assert result.eval_loss is not None
    if fmt == "text":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(result.model_uri)
        assert len(tok.tokenize("<ASSISTANT>")) == 1


def test_malformed_line_fails_before_training(ray_session, tmp_path, tiny_model, small_data):
    from llmray_trainer.data import DatasetError

    bad = tmp_path / "bad.jsonl"
    lines = small_data.read_text().splitlines()
    lines.insert(4, '{"instruction": "no response here"}')
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        finetune(write_job(tmp_path, "bad-data", tiny_model, bad))
    assert "bad.jsonl:5" in str(err.value) and "response" in str(err.value)
    status = json.loads(
        (Path(ray_session_home()) / "jobs" / "bad-data" / "status.json").read_text()
    )
    assert status["phase"] == "Failed"


def ray_session_home() -> str:
    import os

    return os.environ["LLMRAY_HOME"]


@pytest.mark.slow
def test_torch_compile_trains_and_exports_plain_weights(
    ray_session, tmp_path, tiny_model, small_data
):
    job = write_job(
        tmp_path,
        "compiled",
        tiny_model,
        small_data,
        compute={"workers": 1},
        hyperparameters={"torchCompile": True, "maxSteps": 8},
    )
    result = finetune(job)
    assert_loss_falls(result, factor=0.95)
    from safetensors import safe_open

    with safe_open(str(next(Path(result.model_uri).glob("*.safetensors"))), "pt") as f:
        assert not [k for k in f.keys() if "_orig_mod" in k]  # noqa: SIM118
    assert_model_generates(result.model_uri)


def test_rayjob_entrypoint_joins_a_running_cluster(ray_session, tmp_path, tiny_model, small_data):
    # What a KubeRay RayJob runs: `python -m llmray_trainer --config FILE` in a process that
    # joins the cluster through RAY_ADDRESS; progress goes to stdout as machine-readable lines.
    import os
    import subprocess
    import sys

    from llmray.api import load_resource
    from llmray.progress import PREFIX, parse_line
    from llmray.trainer_config import resolve_trainer_config

    job = load_resource(
        write_job(tmp_path, "rayjob", tiny_model, small_data, hyperparameters={"maxSteps": 6})
    )
    cfg = resolve_trainer_config(
        job,
        base_dir=str(tmp_path),
        default_storage=str(tmp_path / "s"),
        cache_dir=str(tmp_path / "cache"),
        cpus_per_worker=1,
    )
    config = tmp_path / "trainer.json"
    config.write_text(cfg.model_dump_json())
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run(
        [sys.executable, "-m", "llmray_trainer", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    records = [parse_line(ln) for ln in done.stdout.splitlines() if ln.startswith(PREFIX)]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["totalSteps"] == 6 for r in steps)
    assert steps[-1]["trainLoss"] < steps[0]["trainLoss"]
    assert_model_generates(str(tmp_path / "s" / "rayjob" / "model"))
