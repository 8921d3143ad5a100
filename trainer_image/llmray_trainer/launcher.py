"""The driver: validate data, start (or join) Ray, run the TorchTrainer, watch progress.

Used by both entrypoints: `llmray finetune` (embedded local Ray) and the RayJob's
`python -m llmray_trainer --config FILE` (joins the KubeRay cluster).
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmray import uris
from llmray.hardware import profile
from llmray.localray import ensure_ray
from llmray.paths import pod_path
from llmray.trainer_config import TrainerConfig
from llmray_trainer import hardware, placement
from llmray_trainer.retries import RetryBudget

log = logging.getLogger("llmray.trainer")


@dataclass
class RunResult:
    name: str
    model_uri: str
    checkpoint: str
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("event") == "step"]

    @property
    def first_loss(self) -> float | None:
        return self.steps[0]["trainLoss"] if self.steps else None

    @property
    def last_loss(self) -> float | None:
        return self.steps[-1]["trainLoss"] if self.steps else None

    @property
    def resumed_at(self) -> int | None:
        """The step the last attempt resumed from (None: it started from scratch)."""
        resumed = [r["step"] for r in self.records if r.get("event") == "resumed"]
        return resumed[-1] if resumed else None

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """spec.evaluation's scores (status.evaluation), None without spec.evaluation."""
        done = [r["evaluation"] for r in self.records if r.get("event") == "evaluated"]
        return done[-1] if done else None

    @property
    def eval_loss(self) -> float | None:
        evals = [r["evalLoss"] for r in self.records if r.get("evalLoss") is not None]
        return evals[-1] if evals else None


def spec_env(cfg: TrainerConfig) -> dict[str, str]:
    """`spec.env` literal values for the workers. On Kubernetes the pods carry all of spec.env;
    here a `valueFrom` (a Secret) cannot be resolved: the variable comes from the shell."""
    env = {}
    for i, var in enumerate(cfg.spec.env):
        if var.value is not None:
            env[var.name] = var.value
        elif var.name in os.environ:
            env[var.name] = os.environ[var.name]
        else:
            log.warning(
                "spec.env[%d] %s: valueFrom is resolved on Kubernetes only; export %s "
                "in this shell to pass it to the workers",
                i,
                var.name,
                var.name,
            )
    return env


def _import_trainer_modules() -> None:
    import ray.train.torch  # noqa: F401  (torch, Ray Train: ~4 s on 2 cores)

    import llmray_trainer.loop  # noqa: F401


def run(cfg: TrainerConfig) -> RunResult:
    from llmray_trainer.evaluate import evaluation_records
    from llmray_trainer.inputs import load_raw_splits

    spec = cfg.spec
    # Fail on bad data in seconds, before any worker or model download.
    train_records, eval_records = load_raw_splits(cfg)
    log.info("dataset: %d train / %d eval records", len(train_records), len(eval_records))
    scored = evaluation_records(cfg, eval_records)
    if not uris.is_remote(spec.baseModel.uri):  # a typo'd path fails here, not in each worker
        uris.fetch(
            spec.baseModel.uri,
            Path(cfg.base_dir),
            pod_path(cfg.cache_dir),
            field="spec.baseModel.uri",
        )

    hw = profile(spec.compute.accelerator, spec.compute.ipex)
    hardware.check_method(hw, spec.method)
    if hw.ipex:
        hardware.import_ipex()  # the clear error now, not inside every worker
    workers = spec.compute.workers
    threads = max(1, int(cfg.cpus_per_worker))
    # Starting Ray takes ~7 s of mostly waiting on its processes: import torch and Ray Train
    # meanwhile (measured: job start 4 s shorter on 2 cores).
    preload = threading.Thread(target=_import_trainer_modules, name="llmray-preload")
    preload.start()
    ensure_ray()
    preload.join()
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from llmray_trainer.loop import train_func
    from llmray_trainer.progress import ProgressSink, ProgressWatcher

    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if spec.compute.resourcesPerWorker.gpu:
        resources["GPU"] = spec.compute.resourcesPerWorker.gpu
    # A rank-0 node that is not there would make Ray Train wait forever: fail now instead.
    placement.wait_for_rank0_node(cfg.rank0_label, resources)

    zero3 = spec.strategy.zero_stage() == 3
    worker_env = hardware.worker_env(hw, spec.strategy.type, threads, zero3=zero3)
    worker_env.update(spec_env(cfg))
    sink = ProgressSink.remote()
    storage = uris.storage_path_for_ray(
        cfg.storage_path, Path(cfg.base_dir), field="spec.checkpointing.storageUri"
    )

    def make_trainer() -> TorchTrainer:
        return TorchTrainer(
            train_func,
            train_loop_config={"trainer": cfg.model_dump(mode="json"), "progress_sink": sink},
            torch_config=TorchConfig(backend=hw.dist_backend),
            scaling_config=ScalingConfig(
                num_workers=workers,
                use_gpu=hw.ray_use_gpu,
                resources_per_worker=resources,
                label_selector=placement.label_selector(cfg.rank0_label, workers),
            ),
            run_config=RunConfig(
                name=cfg.name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpointing.keep),
                worker_runtime_env={"env_vars": worker_env},
            ),
        )

    # Restarts are counted here, across KubeRay's retries too (retries.py), not by Ray Train.
    budget = RetryBudget(storage, cfg.name, cfg.run_id, spec.maxRetries)
    budget.start()
    with ProgressWatcher(sink, cfg.progress_file) as watcher:
        while True:
            try:
                result = make_trainer().fit()
            except ray.train.TrainingFailedError as err:
                budget.start(reason=err)  # raises RetriesUsedUp once they are used up
                continue  # the same run name resumes from its latest checkpoint
            stopped = (result.return_value or {}).get("preempted")
            if stopped is None:
                break
            # Told to stop (preemption.py): the same run again resumes after that step.
            log.warning("preempted at step %d: starting again from its checkpoint", stopped)
        if spec.evaluation is not None:
            from llmray_trainer.evaluate import evaluate

            # The training workers are gone: the batch inference actors take their places.
            scores = evaluate(cfg, scored, watcher.add, spec.compute.resourcesPerWorker.gpu)
            watcher.add({"event": "evaluated", "evaluation": scores})
    checkpoint = result.checkpoint.path if result.checkpoint is not None else ""
    return RunResult(cfg.name, cfg.output_uri, checkpoint, watcher.records)
