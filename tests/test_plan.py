"""`llmray plan`: the memory a FineTuneJob needs, against the formula and DeepSpeed's estimators.

The model-state numbers must be DeepSpeed's own (`estimate_zero3_model_states_mem_needs`,
`estimate_zero2_model_states_mem_needs`) for Llama-2 7B and 70B; the measured side (peak RSS
of real runs) is benchmarks/train_memory.py, BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from llmray.api import parse_finetunejob
from llmray.model_shape import from_config, from_parameters, resolve_shape
from llmray.sizing import GIB, plan, trainable_parameters, zero_tuning

# The config.json files of meta-llama/Llama-2-7b-hf and Llama-2-70b-hf (the fields that count).
LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
LLAMA2_70B = {
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
CONFIGS = {"7b": (LLAMA2_7B, 6_738_415_616), "70b": (LLAMA2_70B, 68_976_648_192)}


def spec(**over: Any):
    base = {"baseModel": {"uri": "hf://meta-llama/Llama-2-7b-hf"}, "dataset": {"train": "d.jsonl"}}
    doc = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "p"},
        "spec": base | over,
    }
    return parse_finetunejob(doc).spec


def gpu_zero(stage: int, workers: int, offload_opt=False, offload_params=False, memory=None):
    resources = {"gpu": 1} if memory is None else {"gpu": 1, "memory": memory}
    return spec(
        strategy={
            "type": "deepspeed",
            "zeroStage": stage,
            "offloadOptimizer": offload_opt,
            "offloadParameters": offload_params,
        },
        hyperparameters={"precision": "bf16"},
        compute={"accelerator": "nvidia-gpu", "workers": workers, "resourcesPerWorker": resources},
    )


@pytest.mark.parametrize("name", ["7b", "70b"])
def test_parameter_count_from_config_json(name) -> None:
    config, count = CONFIGS[name]
    assert from_config(config, "test").parameters == count  # what the checkpoints hold


@pytest.mark.parametrize("name", ["7b", "70b"])
@pytest.mark.parametrize("workers", [2, 8, 64])
@pytest.mark.parametrize(
    ("offload_opt", "offload_params"), [(False, False), (True, False), (True, True)]
)
def test_zero3_model_states_are_deepspeeds_estimate(name, workers, offload_opt, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    shape = from_config(CONFIGS[name][0], "test")
    p = plan(gpu_zero(3, workers, offload_opt, offload_params), shape)
    host_ds, accel_ds, _ = estimate_zero3_model_states_mem_needs(
        shape.parameters,
        shape.largest_module_parameters,
        num_gpus_per_node=1,
        num_nodes=workers,
        cpu_offload=offload_opt,
        cpu_offload_params=offload_params,
        zero_init=True,
        additional_buffer_factor=1.0,
    )
    assert p.per_worker.accelerator["train"].model_states == accel_ds
    if offload_opt:  # what DeepSpeed puts in host memory: the offloaded states, per node
        assert p.per_worker.host["train"].model_states == pytest.approx(host_ds, rel=1e-9)


@pytest.mark.parametrize("name", ["7b", "70b"])
@pytest.mark.parametrize("workers", [2, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_are_deepspeeds_estimate(name, workers, offload) -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = from_config(CONFIGS[name][0], "test")
    p = plan(gpu_zero(2, workers, offload), shape)
    _, accel_ds = estimate_zero2_model_states_mem_needs(
        shape.parameters, num_gpus_per_node=1, num_nodes=workers, cpu_offload=offload
    )
    assert p.per_worker.accelerator["train"].model_states == accel_ds


def test_documented_formula_on_cpu_fp32() -> None:
    # 7B, 8 workers, fp32 on CPUs: every byte is host memory (sizing.py's table).
    shape = from_config(LLAMA2_7B, "test")
    P, W = shape.parameters, 8
    ddp = plan(spec(compute={"workers": W}), shape).per_worker.host["train"]
    assert (ddp.weights, ddp.gradients, ddp.optimizerStates) == (4 * P, 8 * P, 8 * P)
    z3 = plan(
        spec(strategy={"type": "deepspeed", "zeroStage": 3}, compute={"workers": W}), shape
    ).per_worker.host["train"]
    assert z3.weights == 4 * P // W and z3.optimizerStates == 16 * P // W
    assert z3.gathered == 2 * 4 * shape.largest_module_parameters
    tune = zero_tuning(None, 4096)
    live = tune["stage3_max_live_parameters"] - shape.largest_module_parameters
    gathering = 4 * (live + tune["stage3_prefetch_bucket_size"])
    gradient_partition = 4 * P // W  # what DeepSpeed's estimator leaves out
    assert z3.buffers == gathering + gradient_partition + 4 * tune["reduce_bucket_size"]
    # ZeRO-3 per worker: far below DDP's copy of everything.
    assert z3.model_states < 0.2 * ddp.model_states


def test_lora_trains_only_its_matrices() -> None:
    shape = from_config(LLAMA2_7B, "test")
    s = spec(method="lora", lora={"rank": 8, "targetModules": ["q_proj", "v_proj"]})
    assert trainable_parameters(s, shape) == 32 * 2 * 8 * (4096 + 4096)  # 4,194,304


def test_70b_zero3_offload_needs_a_big_rank0_and_says_so() -> None:
    shape = from_config(LLAMA2_70B, "test")
    s = gpu_zero(3, 16, offload_opt=True, offload_params=True, memory="64Gi")
    p = plan(s, shape)
    # 18 bytes x 69B / 16 workers = 72 GiB of offloaded states: 64Gi is too little.
    assert not p.fits
    assert any("a worker needs" in r and "64.0Gi" in r for r in p.reasons)
    out = p.to_json()
    assert set(out) >= {"perWorker", "rank0", "fits", "reasons"}
    assert set(out["perWorker"]) >= {"peakHostBytes", "peakAcceleratorBytes"}
    assert out["rank0"]["peakHostBytes"] > out["perWorker"]["peakHostBytes"]  # reads the shards


def test_rank0_export_holds_one_shard_not_the_model() -> None:
    shape = from_config(LLAMA2_70B, "test")
    p = plan(spec(strategy={"type": "deepspeed", "zeroStage": 3}, compute={"workers": 32}), shape)
    extra = p.rank0.host["export"].total - p.per_worker.host["export"].total
    assert 0 < extra <= 1.2 * GIB  # one 1 GiB shard (+ slack), for a 276 GB model


def test_shape_from_a_parameter_hint_when_no_config(tmp_path: Path) -> None:
    shape = resolve_shape("s3://nowhere/model", 6_738_415_616, tmp_path, tmp_path)
    assert shape is not None and "spec.baseModel.parameters" in shape.source
    assert shape.parameters == 6_738_415_616 and shape.hidden_size == 4096
    assert from_parameters(68_976_648_192, "x").hidden_size in range(8192, 9216 + 1)
    assert resolve_shape("s3://nowhere/model", None, tmp_path, tmp_path) is None


def test_shape_from_a_local_config_json(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(LLAMA2_7B))
    shape = resolve_shape("m", 1, tmp_path, tmp_path)  # the file wins over the hint
    assert shape is not None and shape.parameters == 6_738_415_616
    assert "config.json at" in shape.source


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmray_cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        check=False,
    )


def write(tmp_path: Path, name: str, **over: Any) -> Path:
    (tmp_path / "llama").mkdir(exist_ok=True)
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA2_7B))
    doc = {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "baseModel": {"uri": "llama"},
            "dataset": {"train": "d.jsonl"},
            "strategy": {"type": "deepspeed", "zeroStage": 3},
            **over,
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_plan_command_prints_json_and_a_table(tmp_path: Path) -> None:
    job = write(tmp_path, "small", compute={"workers": 2, "resourcesPerWorker": {"memory": "8Gi"}})
    done = run_cli("plan", str(job), "-o", "json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["model"]["parameters"] == 6_738_415_616
    assert out["fits"] is False and "8.0Gi" in " ".join(out["reasons"])
    assert out["perWorker"]["peakHostBytes"] > 8 * GIB
    table = run_cli("plan", str(job), cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    assert "does not fit" in table.stdout and "rank 0" in table.stdout


def test_validate_shows_the_plan_verdict(tmp_path: Path) -> None:
    big = write(tmp_path, "big", compute={"workers": 2, "resourcesPerWorker": {"memory": "512Gi"}})
    small = write(
        tmp_path, "tight", compute={"workers": 2, "resourcesPerWorker": {"memory": "1Gi"}}
    )
    done = run_cli("validate", str(big), str(small), cwd=tmp_path)
    assert done.returncode == 0, done.stderr  # a plan is advice: the spec itself is valid
    lines = done.stdout.splitlines()
    assert any("big" in ln and "fits" in ln for ln in lines)
    assert any("does not fit" in ln and "1.0Gi" in ln for ln in lines)


def test_checkpoint_share_of_the_largest_rank() -> None:
    from llmray.sizing import checkpoint_rank_bytes, preemption_grace_seconds

    shape = from_config(LLAMA2_7B, "test")
    P = shape.parameters
    # DDP: rank 0 writes the trained weights in fp32 and their two Adam moments.
    assert checkpoint_rank_bytes(spec(compute={"workers": 4}), shape) == 12 * P
    lora = spec(method="lora", compute={"workers": 4})
    assert checkpoint_rank_bytes(lora, shape) == 12 * trainable_parameters(lora, shape)
    # ZeRO-2: rank 0 also writes the module's 16-bit weights (frozen ones too).
    z2 = gpu_zero(2, 8)
    assert checkpoint_rank_bytes(z2, shape) == 2 * P + 12 * P // 8
    # ZeRO-3: everything is partitioned.
    assert checkpoint_rank_bytes(gpu_zero(3, 8), shape) == (2 + 12) * P // 8
    grace = preemption_grace_seconds(z2, checkpoint_rank_bytes(z2, shape))
    assert grace == 60 + -(-(2 * P + 12 * P // 8) // (100 * 2**20))
    assert plan(z2, shape).to_json()["checkpoint"]["preemptionGracePeriodSeconds"] == grace
