"""`llmray finetune` end to end on real Ray Train, real DeepSpeed, a tiny random Llama.

Each test writes a FineTuneJob YAML as a user would and runs it through the same entry the
CLI uses; assertions are what a user sees: loss falls, the model reloads and generates, a
killed worker resumes, a re-run resumes, a bad line names its file and line.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import threading
import time
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


def checkpointed_run(folder: Path, name: str, model: Path, train: Path, strategy: dict, steps: int):
    """Job `name` run to `steps`, checkpointing every 2: run again with more steps, it
    resumes from its last checkpoint."""
    return finetune(
        write_job(
            folder,
            name,
            model,
            train,
            strategy=strategy,
            hyperparameters={"maxSteps": steps},
            checkpointing={"everySteps": 2},
        )
    )


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


def kill_a_worker_during(progress_file: Path, every: int, stop: threading.Event) -> dict:
    """From outside the run, as a node failure would: SIGKILL one Ray Train worker process
    (found through Ray's state API) once a checkpoint step has had time to be registered.

    Ray Train's controller registers a reported checkpoint when it next polls the workers
    (every 2 s): a kill sooner after the report resumes from the one before.
    """
    import ray
    from ray.util.state import list_actors

    gcs = ray.get_runtime_context().gcs_address  # other Ray instances may run on this machine
    seen: dict[str, Any] = {}
    while not stop.wait(0.2):
        lines = progress_file.read_text().splitlines() if progress_file.exists() else []
        steps = [json.loads(ln) for ln in lines]
        steps = [r for r in steps if r.get("event") == "step"]
        saved = [r for r in steps if r["step"] % every == 0]
        if not saved or time.time() - saved[0]["time"] < 3.0:
            continue
        workers = list_actors(
            address=gcs,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
        )
        if not workers:
            continue
        os.kill(workers[-1].pid, signal.SIGKILL)
        seen.update(pid=workers[-1].pid, last_step=steps[-1]["step"])
        return seen
    return seen


def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path, tiny_model, small_data):
    # A real SIGKILL of a worker process, sent by the test; Ray Train restarts the worker
    # group, which resumes from the latest registered checkpoint (every 3 steps).
    total, every = 40, 3
    job = write_job(
        tmp_path,
        "killed",
        tiny_model,
        small_data,
        maxRetries=1,
        checkpointing={"everySteps": every},
        hyperparameters={"maxSteps": total},
    )
    progress = Path(ray_session_home()) / "jobs" / "killed" / "progress.jsonl"
    stop = threading.Event()
    killed: dict[str, Any] = {}
    killer = threading.Thread(
        target=lambda: killed.update(kill_a_worker_during(progress, every, stop)), daemon=True
    )
    killer.start()
    try:
        result = finetune(job)
    finally:
        stop.set()
        killer.join()
    assert killed, "the run ended before a worker could be killed"
    resumed = [r["step"] for r in result.records if r["event"] == "resumed"]
    assert len(resumed) == 1, resumed
    at = resumed[0]
    # It resumed from a checkpoint (not from scratch), one that was saved before the kill ...
    assert at > 0 and at % every == 0 and at <= killed["last_step"]
    # ... and went on from the step after it, to the end.
    events = [r["event"] for r in result.records]
    after = result.records[events.index("resumed") :]
    assert [r["step"] for r in after if r["event"] == "step"] == list(range(at + 1, total + 1))
    assert_model_generates(result.model_uri)


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param({"type": "ddp"}, id="ddp"),
        # DeepSpeed's engine checkpoint with the (fused) client AdamW's partitioned state.
        pytest.param({"type": "deepspeed", "zeroStage": 2}, id="zero2"),
    ],
)
def test_rerun_same_name_resumes(ray_session, tmp_path, tiny_model, small_data, strategy):
    name = f"rerun-{strategy['type']}{strategy.get('zeroStage', '')}"

    def run(steps: int):
        return checkpointed_run(tmp_path, name, tiny_model, small_data, strategy, steps)

    first = run(4)
    assert [r["step"] for r in first.steps] == [1, 2, 3, 4]
    second = run(8)
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


def zero3_load_and_export(config: dict[str, Any]) -> None:
    """Inside each Ray Train worker: build the model as the trainer does under ZeRO-3, record
    what this rank holds, stream the export, and (rank 0) compare it with the checkpoint."""
    import resource

    import ray.train
    import torch
    import torch.distributed as dist

    from llmray.trainer_config import TrainerConfig
    from llmray_trainer.deepspeed_config import render_deepspeed_config
    from llmray_trainer.export import write_model
    from llmray_trainer.modeling import (
        build_model,
        hidden_size,
        load_tokenizer,
        register_zero3,
        weights_dtype,
    )

    cfg = TrainerConfig.model_validate(config["trainer"])
    rank = ray.train.get_context().get_world_rank()
    model_dir = Path(cfg.spec.baseModel.uri)
    tokenizer, added = load_tokenizer(model_dir, "instruction", [])
    ds = render_deepspeed_config(cfg.spec, 2, hidden_size(model_dir))
    registration = register_zero3(ds, "gloo")
    # Warm up (imports, DeepSpeed's first zero.Init) on the tiny model: what grows after is
    # this model's share.
    build_model(cfg, Path(config["tiny"]), tokenizer, added, dtype=weights_dtype(cfg))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_model(cfg, model_dir, tokenizer, added, dtype=weights_dtype(cfg))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    params = list(model.parameters())
    stats = {
        "rss_growth": grown,
        "all_zero3": all(hasattr(p, "ds_id") for p in params),
        "local": sum(p.ds_tensor.numel() for p in params),
        "full": sum(p.ds_numel for p in params),
        "empty": all(p.numel() == 0 for p in params),  # nothing gathered is left behind
    }
    out = Path(config["out"])
    write_model(
        model,
        tokenizer,
        out if rank == 0 else None,
        zero3=True,
        rank=rank,
        dtype=torch.float32,
        shard_bytes=8 * 2**20,
    )
    if rank == 0:
        from safetensors.torch import load_file

        exported: dict[str, torch.Tensor] = {}
        for f in sorted(out.glob("*.safetensors")):
            exported.update(load_file(f))
        original = load_file(model_dir / "model.safetensors")
        stats["same_keys"] = sorted(exported) == sorted(original)
        stats["same_values"] = all(torch.equal(exported[k], original[k]) for k in original)
        stats["shards"] = len(list(out.glob("*.safetensors")))
    Path(config["stats"], f"rank{rank}.json").write_text(json.dumps(stats))
    dist.barrier()
    del registration


@pytest.fixture(scope="module")
def medium_model(tmp_path_factory) -> Path:
    """~50M parameters (200 MB in fp32): big enough for a rank's memory to show it."""
    from llmray_trainer.tiny_model import create_tiny_model

    return create_tiny_model(
        tmp_path_factory.mktemp("models") / "medium", hidden_size=640, layers=10, heads=8
    )


def test_zero3_loads_partitioned_and_streams_the_same_weights(
    ray_session, tmp_path, medium_model, small_data, tiny_model
):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from llmray.api import load_resource
    from llmray.hardware import profile
    from llmray.trainer_config import resolve_trainer_config
    from llmray_trainer.hardware import worker_env

    job = load_resource(
        write_job(
            tmp_path,
            "z3load",
            medium_model,
            small_data,
            strategy={"type": "deepspeed", "zeroStage": 3},
        )
    )
    cfg = resolve_trainer_config(
        job,
        base_dir=str(tmp_path),
        default_storage=str(tmp_path),
        cache_dir=str(tmp_path),
        cpus_per_worker=1,
    )
    (tmp_path / "stats").mkdir()
    # pytest imports this file under its own name, which Ray's workers cannot import.
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[zero3_load_and_export.__module__])
    TorchTrainer(
        zero3_load_and_export,
        train_loop_config={
            "trainer": cfg.model_dump(mode="json"),
            "out": str(tmp_path / "out"),
            "stats": str(tmp_path / "stats"),
            "tiny": str(tiny_model),
        },
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name="z3load",
            storage_path=str(tmp_path / "ray"),
            # What the trainer gives its workers (DS_ACCELERATOR, threads, the allocator).
            worker_runtime_env={"env_vars": worker_env(profile("cpu"), "deepspeed", 1, zero3=True)},
        ),
    ).fit()
    stats = [json.loads((tmp_path / "stats" / f"rank{r}.json").read_text()) for r in (0, 1)]
    full_bytes = stats[0]["full"] * 4
    for rank, s in enumerate(stats):
        assert s["all_zero3"] and s["empty"], (rank, s)
        assert s["local"] <= s["full"] / 2 + 2**16  # its half (padded), not the model
    # Rank 1 never held the full model: its peak grew by its shard (+ one module), not 200 MB.
    assert stats[1]["rss_growth"] < 0.75 * full_bytes, (stats[1]["rss_growth"], full_bytes)
    assert stats[0]["same_keys"] and stats[0]["same_values"]
    assert stats[0]["shards"] > 10  # 8 MiB shards: written one at a time


def test_zero3_resumes_from_partitioned_checkpoints(ray_session, tmp_path, tiny_model, small_data):
    zero3 = {"type": "deepspeed", "zeroStage": 3}

    def run(steps: int):
        return checkpointed_run(tmp_path, "z3rerun", tiny_model, small_data, zero3, steps)

    first = run(4)
    # Each rank wrote its own shard of the optimizer and weights; nothing was gathered.
    ckpt = Path(first.checkpoint)
    shards = sorted(p.name for p in ckpt.rglob("*optim_states.pt"))
    assert len(shards) == 2 and any("rank_0" in s for s in shards)
    assert any("rank_1" in s for s in shards)
    second = run(8)
    assert second.resumed_at == 4
    assert [r["step"] for r in second.steps] == [5, 6, 7, 8]
    assert_model_generates(second.model_uri)


def test_lora_zero3_adapter_only_export(ray_session, tmp_path, tiny_model, small_data):
    job = write_job(
        tmp_path,
        "z3adapter",
        tiny_model,
        small_data,
        method="lora",
        lora={"rank": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj", "lm_head"]},
        strategy={"type": "deepspeed", "zeroStage": 3},
        output={"mergeLora": False},
        hyperparameters={"learningRate": 2e-2, "maxSteps": 6},
    )
    result = finetune(job)
    out = Path(result.model_uri)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model)  # the job's baseModel.uri
    assert (out / "adapter_model.safetensors").exists()
    assert not list(out.glob("model*.safetensors"))  # no second full model was written
    # The tokenizer did not change (the tiny one has a chat template): none is written, and
    # the local status says what `llmray serve` needs to serve the adapter on its base.
    assert not (out / "tokenizer.json").exists()
    from llmray import paths

    status = paths.job_status("z3adapter")
    assert status is not None and status["phase"] == "Succeeded"
    assert status["model"] == {"uri": str(out), "adapter": True, "baseModel": str(tiny_model)}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, out)
    trained = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # B started at zero
