"""`llmray finetune FILE.yaml`: the FineTuneJob on an embedded local Ray, status in a file.

Locally there is no operator: this writes `$LLMRAY_HOME/jobs/<name>/status.json` in the
FineTuneJob status shape, which `llmray serve` reads to resolve `model.fineTuneJobRef`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import uuid
from pathlib import Path

from llmray import paths
from llmray.api.common import Condition
from llmray.api.finetunejob import FineTuneJob, FineTuneJobStatus
from llmray.api.loader import load_resource
from llmray.api.quantity import parse_quantity
from llmray.progress import progress_of
from llmray.trainer_config import TrainerConfig, produced_model, resolve_trainer_config
from llmray_trainer.launcher import RunResult, run

log = logging.getLogger("llmray.trainer")


def local_config(job: FineTuneJob, base_dir: Path, cpu_count: int) -> TrainerConfig:
    workers = job.spec.compute.workers
    share = max(1, cpu_count // workers)
    asked = job.spec.compute.resourcesPerWorker.cpu
    asked_cores = float(parse_quantity(asked))
    if asked_cores > share:
        log.warning(
            "compute.resourcesPerWorker.cpu %s: this machine has %d cores for %d "
            "workers; using %d per worker",
            asked,
            cpu_count,
            workers,
            share,
        )
    return resolve_trainer_config(
        job,
        base_dir=str(base_dir.resolve()),
        default_storage=str(paths.runs_dir()),
        cache_dir=str(paths.cache_dir()),
        cpus_per_worker=min(asked_cores, share) if asked_cores > 0 else share,
        rank0_label={},  # one machine: there is no large-memory node to pick
        progress_file=str(paths.job_dir(job.metadata.name) / "progress.jsonl"),
        run_id=uuid.uuid4().hex,  # each `llmray finetune` has spec.maxRetries restarts anew
    )


def finetune_file(path: str | Path) -> RunResult:
    path = Path(path)
    job = load_resource(path, kind="FineTuneJob")
    assert isinstance(job, FineTuneJob)
    cfg = local_config(job, path.parent, os.cpu_count() or 1)
    status_file = paths.job_dir(cfg.name) / "status.json"
    status_file.parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.progress_file).unlink(missing_ok=True)
    started = _now()
    write_status(status_file, FineTuneJobStatus(phase="Running", startTime=started))
    try:
        result = run(cfg)
    except BaseException as exc:
        failed = Condition(
            type="Failed", status="True", reason="TrainingFailed", message=str(exc)[:2000]
        )
        write_status(
            status_file,
            FineTuneJobStatus(
                phase="Failed", startTime=started, completionTime=_now(), conditions=[failed]
            ),
        )
        raise
    last = result.steps[-1] if result.steps else {}
    write_status(
        status_file,
        FineTuneJobStatus(
            phase="Succeeded",
            startTime=started,
            completionTime=_now(),
            latestCheckpoint=result.checkpoint,
            # an adapter also says so, and of which base model
            model=produced_model(cfg).model_copy(update={"uri": result.model_uri}),
            progress=progress_of({**last, "evalLoss": result.eval_loss}),
            **({"evaluation": result.evaluation} if result.evaluation is not None else {}),
        ),
    )
    return result


def write_status(path: Path, status: FineTuneJobStatus) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status.model_dump(mode="json", exclude_unset=True), indent=2))
    tmp.replace(path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
