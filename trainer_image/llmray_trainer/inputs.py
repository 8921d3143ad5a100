"""The run's train / eval splits: fetch the files, validate every record, tokenize."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmray import uris
from llmray.paths import pod_path
from llmray.trainer_config import TrainerConfig
from llmray_trainer.data import load_records, split_eval, tokenize_records

log = logging.getLogger(__name__)


def load_raw_splits(cfg: TrainerConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records of both splits; a malformed line raises DatasetError naming file and line.

    The driver calls this before any worker starts, so bad data fails in seconds.
    """
    ds = cfg.spec.dataset
    base, cache = Path(cfg.base_dir), pod_path(cfg.cache_dir)
    train = load_records(uris.fetch(ds.train, base, cache, field="spec.dataset.train"), ds.format)
    if ds.eval:
        return train, load_records(
            uris.fetch(ds.eval, base, cache, field="spec.dataset.eval"), ds.format
        )
    if ds.evalFraction:
        return split_eval(train, ds.evalFraction, cfg.spec.hyperparameters.seed)
    return train, []


def load_splits(cfg: TrainerConfig, tokenizer: Any) -> tuple[list[dict], list[dict]]:
    ds = cfg.spec.dataset
    train_records, eval_records = load_raw_splits(cfg)

    def tokenize(records: list[dict[str, Any]]) -> list[dict]:
        return tokenize_records(records, tokenizer, ds.format, ds.maxSeqLength, ds.maskPrompt)

    return tokenize(train_records), tokenize(eval_records) if eval_records else []
