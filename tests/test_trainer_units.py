"""Trainer pieces that need no training run: DeepSpeed config, hardware choices, local sizing."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from llmray.api import parse_finetunejob
from llmray.hardware import profile
from llmray_trainer import hardware
from llmray_trainer.deepspeed_config import render_deepspeed_config


def job(**spec: Any):
    base = {"baseModel": {"uri": "models/tiny"}, "dataset": {"train": "d.jsonl"}}
    return parse_finetunejob(
        {
            "apiVersion": "llmray.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "t"},
            "spec": base | spec,
        }
    )


def test_deepspeed_config_from_the_spec() -> None:
    spec = job(
        strategy={
            "type": "deepspeed",
            "zeroStage": 3,
            "offloadOptimizer": True,
            "offloadParameters": True,
        },
        hyperparameters={
            "batchSizePerWorker": 4,
            "gradientAccumulationSteps": 2,
            "precision": "bf16",
        },
    ).spec
    config = render_deepspeed_config(spec, world_size=6, hidden_size=4096)
    assert config["train_batch_size"] == 4 * 2 * 6
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["bf16"] == {"enabled": True} and "fp16" not in config
    zero = config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"
    # Stage-3 limits from the hidden size (DeepSpeed's 1e9 defaults keep a sub-1B model
    # gathered whole), and no 16-bit consolidation: the export streams.
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 10 * 4096
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 24 * 4096**2
    assert zero["stage3_gather_16bit_weights_on_model_save"] is False


def test_zero_tuning_overrides_win() -> None:
    spec = job(
        strategy={
            "type": "deepspeed",
            "zeroStage": 3,
            "zeroTuning": {"maxLiveParameters": 1000, "reduceBucketSize": 77},
        }
    ).spec
    zero = render_deepspeed_config(spec, world_size=2, hidden_size=64)["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == 1000 and zero["reduce_bucket_size"] == 77
    assert zero["stage3_max_reuse_distance"] == 24 * 64 * 64  # the others stay derived


def test_deepspeed_defaults_to_zero2_fp32() -> None:
    config = render_deepspeed_config(
        job(strategy={"type": "deepspeed"}).spec, world_size=2, hidden_size=64
    )
    assert config["zero_optimization"]["stage"] == 2
    assert "offload_optimizer" not in config["zero_optimization"]
    assert "bf16" not in config and "fp16" not in config


def test_offload_parameters_needs_zero3() -> None:
    from llmray.api import SpecError

    with pytest.raises(SpecError, match=r"spec\.strategy\.offloadParameters: needs .* zeroStage 3"):
        job(strategy={"type": "deepspeed", "zeroStage": 2, "offloadParameters": True})


@pytest.mark.parametrize(
    ("accelerator", "ipex", "device", "backend", "gpu"),
    [
        ("cpu", False, "cpu", "gloo", False),
        ("cpu", True, "cpu", "gloo", False),
        ("nvidia-gpu", False, "cuda", "nccl", True),
        ("intel-gpu", False, "xpu", "xccl", False),
    ],
)
def test_hardware_choice(accelerator, ipex, device, backend, gpu) -> None:
    hw = profile(accelerator, ipex)
    assert (hw.device_type, hw.dist_backend, hw.ray_use_gpu, hw.ipex) == (
        device,
        backend,
        gpu,
        ipex,
    )


def test_worker_env_pins_threads_and_deepspeed_accelerator() -> None:
    env = hardware.worker_env(profile("cpu", False), "deepspeed", threads=3)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "3"
    assert env["DS_ACCELERATOR"] == "cpu"
    assert "DS_ACCELERATOR" not in hardware.worker_env(profile("cpu", False), "ddp", threads=1)


def test_worker_env_fixes_the_mmap_threshold_for_zero3_only() -> None:
    # A fixed 1 MiB threshold keeps ZeRO-3's gathered buffers out of the heap, and makes every
    # other strategy fault in its large activations afresh each step.
    cpu = profile("cpu", False)
    assert "MALLOC_MMAP_THRESHOLD_" not in hardware.worker_env(cpu, "ddp", threads=1)
    assert "MALLOC_MMAP_THRESHOLD_" not in hardware.worker_env(cpu, "deepspeed", threads=1)
    zero3 = hardware.worker_env(cpu, "deepspeed", threads=1, zero3=True)
    assert zero3["MALLOC_MMAP_THRESHOLD_"] == str(hardware.MMAP_THRESHOLD_BYTES)


def test_qlora_on_cpu_is_refused_clearly() -> None:
    with pytest.raises(RuntimeError, match=r"qlora needs compute\.accelerator nvidia-gpu"):
        hardware.check_method(profile("cpu", False), "qlora")
    hardware.check_method(profile("nvidia-gpu", False), "qlora")


def test_missing_ipex_names_the_versions_needed() -> None:
    try:
        import intel_extension_for_pytorch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("IPEX is installed here (the ipex environment)")
    with pytest.raises(RuntimeError, match=r"torch 2\.8\.\*.*this environment has torch"):
        hardware.import_ipex()


def test_bf16_without_bf16_hardware_warns(monkeypatch, caplog) -> None:
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        hardware.check_precision(profile("cpu", False), "bf16")
        hardware.check_precision(profile("cpu", False), "fp32")
    assert len(caplog.records) == 1
    assert "precision bf16" in caplog.text and "slower than fp32" in caplog.text


def test_local_run_fits_workers_to_the_cores(caplog) -> None:
    from llmray_trainer.local import local_config

    ftj = job(compute={"workers": 2, "resourcesPerWorker": {"cpu": "8"}})
    with caplog.at_level(logging.WARNING):
        cfg = local_config(ftj, Path("/data"), cpu_count=4)
    assert cfg.cpus_per_worker == 2
    assert "resourcesPerWorker.cpu 8" in caplog.text
    assert cfg.rank0_label == {}  # one machine: no rank-0 node to pick
    assert cfg.base_dir == "/data"


def test_rank0_check_fails_loudly_on_an_unlabelled_node(ray_session) -> None:
    import ray

    from llmray_trainer.loop import check_rank0_node

    @ray.remote(num_cpus=0)
    def check(label: dict[str, str]) -> str:
        check_rank0_node(label)
        return "ok"

    assert ray.get(check.remote({})) == "ok"  # no label configured: nothing to check
    node_id = ray.get_runtime_context().get_node_id()
    assert ray.get(check.remote({"ray.io/node-id": node_id})) == "ok"
    with pytest.raises(ray.exceptions.RayTaskError, match=r"without the label llmray.io/rank0"):
        ray.get(check.remote({"llmray.io/rank0": "true"}))


def test_spec_env_reaches_local_workers(monkeypatch, caplog) -> None:
    from llmray_trainer.launcher import spec_env
    from llmray_trainer.local import local_config

    monkeypatch.setenv("FROM_SHELL", "s")
    monkeypatch.delenv("MISSING", raising=False)
    secret = {"secretKeyRef": {"name": "x", "key": "k"}}
    ftj = job(
        env=[
            {"name": "LITERAL", "value": "v"},
            {"name": "FROM_SHELL", "valueFrom": secret},
            {"name": "MISSING", "valueFrom": secret},
        ]
    )
    with caplog.at_level(logging.WARNING):
        env = spec_env(local_config(ftj, Path("/data"), cpu_count=2))
    assert env == {"LITERAL": "v", "FROM_SHELL": "s"}
    assert "spec.env[2] MISSING" in caplog.text


def test_a_lora_job_without_merge_produces_an_adapter_on_its_base() -> None:
    from llmray.trainer_config import produced_model, resolve_trainer_config

    def produced(**spec: Any):
        cfg = resolve_trainer_config(
            job(**spec),
            base_dir="/data",
            default_storage="/runs",
            cache_dir="/c",
            cpus_per_worker=1,
        )
        return produced_model(cfg)

    assert produced(method="full").model_dump() == {
        "uri": "/runs/t/model",
        "adapter": False,
        "baseModel": "",
    }
    assert not produced(method="lora").adapter  # merged by default
    adapter = produced(method="lora", output={"mergeLora": False})
    assert adapter.adapter and adapter.baseModel == "/data/models/tiny"  # made absolute
    hub = produced(method="lora", output={"mergeLora": False}, baseModel={"uri": "hf://org/base"})
    assert hub.baseModel == "hf://org/base"
