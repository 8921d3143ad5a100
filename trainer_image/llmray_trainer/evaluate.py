"""spec.evaluation after export: batch inference over the exported model (and the base model
with `baseline: true`), scores into status.evaluation, predictions next to the model.

    <output.uri>/predictions.jsonl           one row per evaluation record, in its order:
        {"prompt", "reference", "output", "results": {"exactMatch": true, "loss": 0.7}}
    <output.uri>/baseline-predictions.jsonl  the same for the base model (baseline: true)

The driver calls `evaluation_records` before training (a bad line in spec.evaluation.dataset
fails in seconds, like the training data) and `evaluate` after the model is exported.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmray import uris
from llmray.api.finetunejob import BASELINE_KEY, Evaluation
from llmray.metrics import aggregate, needs_generation, needs_loss, score_row
from llmray.paths import pod_path
from llmray.trainer_config import TrainerConfig, adapter_output, base_model_uri
from llmray_trainer.batch import Generation, ModelSource, run_batch
from llmray_trainer.data import load_records

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
BASELINE_PREDICTIONS = "baseline-predictions.jsonl"
# The columns of a prediction row, in file order (lossSum / lossTokens only with loss).
ROW_KEYS = ("prompt", "reference", "output", "outputTokens", "lossSum", "lossTokens", "results")


def evaluation_records(
    cfg: TrainerConfig, eval_split: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The records spec.evaluation scores: its dataset, else the eval split (validation
    guarantees one of them when spec.evaluation is set); [] without spec.evaluation."""
    spec = cfg.spec.evaluation
    if spec is None:
        return []
    if spec.dataset is None:
        return eval_split
    base, cache = Path(cfg.base_dir), pod_path(cfg.cache_dir)
    path = uris.fetch(spec.dataset, base, cache, field="spec.evaluation.dataset")
    return load_records(path, cfg.spec.dataset.format)


def generation_of(spec: Evaluation) -> Generation:
    return Generation(
        max_new_tokens=spec.maxNewTokens,
        sampling=spec.sampling,
        generate=needs_generation(spec.metrics),
        loss=needs_loss(spec.metrics),
    )


def sources(cfg: TrainerConfig) -> dict[str, ModelSource]:
    """The models scored: "model" (the export) and, with baseline, "baseline" (the base)."""
    spec = cfg.spec
    common = {
        "base_dir": cfg.base_dir,
        "cache_dir": cfg.cache_dir,
        "fmt": spec.dataset.format,
        "special_tokens": tuple(spec.dataset.specialTokens),
    }
    out = {
        "model": ModelSource(
            uri=cfg.output_uri,
            adapter_base=base_model_uri(cfg) if adapter_output(spec) else "",
            **common,
        )
    }
    if spec.evaluation is not None and spec.evaluation.baseline:
        out[BASELINE_KEY] = ModelSource(uri=spec.baseModel.uri, prepare_tokenizer=True, **common)
    return out


def evaluate(
    cfg: TrainerConfig,
    records: list[dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
    gpus_per_worker: float = 0,
) -> dict[str, Any]:
    """status.evaluation: `{metric: value}` of the exported model, and `baseline`'s."""
    spec = cfg.spec.evaluation
    assert spec is not None
    scores: dict[str, Any] = {}
    for name, source in sources(cfg).items():
        report({"event": "evaluating", "model": name, "records": len(records)})
        rows = run_batch(
            records,
            source,
            generation_of(spec),
            workers=cfg.spec.compute.workers,
            batch_size=spec.batchSize,
            cpus_per_worker=cfg.cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
        )
        for row in rows:
            row["results"] = score_row(spec.metrics, row)
        found = aggregate(spec.metrics, rows)
        target = PREDICTIONS if name == "model" else BASELINE_PREDICTIONS
        written = write_predictions(rows, posixpath.join(cfg.output_uri, target), cfg.base_dir)
        log.info("%s: %s -> %s", name, found, written)
        if name == "model":
            scores.update(found)
        else:
            scores[BASELINE_KEY] = found
    return scores


def write_predictions(rows: list[dict[str, Any]], uri: str, base_dir: str) -> str:
    """JSON lines, one prediction a line, keys in ROW_KEYS order."""
    text = "".join(
        json.dumps({k: row[k] for k in ROW_KEYS if k in row}, ensure_ascii=False) + "\n"
        for row in rows
    )
    return uris.put_file(text.encode(), uri, Path(base_dir), field="spec.output.uri")
