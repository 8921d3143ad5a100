"""Checkpoints through `ray.train.report`: save on every rank, resume from the latest.

Layout of one checkpoint directory (Ray merges every rank's files into it)::

    trainer_state.json     {"step": 40, "epoch": 1, "micro_batches_in_epoch": 0, ...} (rank 0)
    model.pt, optim.pt     ddp: trainable weights, optimizer + scheduler state (rank 0)
    ds/                    deepspeed: engine.save_checkpoint, one shard file per rank
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray.train
import torch

from llmray_trainer.modeling import load_trainable_state_dict, trainable_state_dict

DS_TAG = "ds"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    micro_batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    tokens: int = 0  # training tokens seen (all workers)
    train_loss: float = 0.0
    eval_loss: float | None = None


def checkpoint_dir_name(step: int) -> str:
    """Ray Train's folder of one checkpoint under <storage>/<run>: checkpoint_step00000012."""
    return f"checkpoint_step{step:08d}"


def checkpoint_uri(storage: str, run: str, step: int) -> str:
    """Where the checkpoint of `step` is, in the spec's own terms (s3://..., pvc://...)."""
    return f"{storage.rstrip('/')}/{run}/{checkpoint_dir_name(step)}"


def save_and_report(
    state: TrainState,
    metrics: dict[str, Any],
    *,
    rank: int,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    engine: Any | None,
) -> None:
    """Every rank must call this at the same point (`ray.train.report` is a barrier)."""
    tmp = Path(tempfile.mkdtemp(prefix="llmray-ckpt-"))
    try:
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)
        elif rank == 0:
            torch.save(trainable_state_dict(unwrap(model)), tmp / "model.pt")
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                tmp / "optim.pt",
            )
        if rank == 0:
            (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
        has_files = any(tmp.iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(str(tmp)) if has_files else None
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state.step)
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(
    *, model: Any, optimizer: Any, scheduler: Any, engine: Any | None
) -> tuple[TrainState, str] | None:
    """(state, checkpoint path) from the latest checkpoint of this run, or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = Path(d)
        state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        if engine is not None:
            engine.load_checkpoint(str(path), tag=DS_TAG)
        else:
            load_trainable_state_dict(unwrap(model), torch.load(path / "model.pt"))
            optim = torch.load(path / "optim.pt", weights_only=False)
            optimizer.load_state_dict(optim["optimizer"])
            scheduler.load_state_dict(optim["scheduler"])
    return state, checkpoint.path


def unwrap(model: Any) -> Any:
    """The plain module under DDP / DeepSpeed wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
