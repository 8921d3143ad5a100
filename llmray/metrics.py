"""Evaluation scores from predictions (pure: no torch, no Ray; the operator image can read it).

A prediction row is what batch inference writes to predictions.jsonl::

    {"prompt": "...", "reference": "42", "output": "#### 42",
     "results": {"exactMatch": false, "answer": true, "loss": 0.71}}

`score_row` fills `results` from the output and reference (loss from the row's `lossSum` /
`lossTokens`, which the generator measured); `aggregate` turns rows into status.evaluation's
`{metric: value}`: the share of rows a generation metric holds for, the token-weighted mean
loss, and its exp as perplexity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from llmray.api.finetunejob import LOSS_METRICS, EvalMetric

# A perplexity above this is written as this (JSON, and so the API, has no infinity).
MAX_PERPLEXITY = 1e30


def needs_generation(metrics: Sequence[EvalMetric]) -> bool:
    """Whether any metric compares generated text (loss and perplexity need none)."""
    return any(m.regex is not None or m.name not in LOSS_METRICS for m in metrics)


def needs_loss(metrics: Sequence[EvalMetric]) -> bool:
    return any(m.regex is None and m.name in LOSS_METRICS for m in metrics)


def score_row(metrics: Sequence[EvalMetric], row: dict[str, Any]) -> dict[str, Any]:
    """Each metric's result on one prediction: True / False, or the row's mean loss."""
    output, reference = row.get("output") or "", row.get("reference") or ""
    results: dict[str, Any] = {}
    for metric in metrics:
        if metric.regex is not None:
            results[metric.name] = regex_match(metric.regex, output, reference)
        elif metric.name == "exactMatch":
            results[metric.name] = output.strip() == reference.strip()
        elif metric.name == "contains":
            results[metric.name] = bool(reference.strip()) and reference.strip() in output
        elif metric.name in LOSS_METRICS:
            tokens = row.get("lossTokens") or 0
            loss = row["lossSum"] / tokens if tokens else None
            results[metric.name] = loss if metric.name == "loss" else _perplexity(loss)
    return results


def regex_match(pattern: str, output: str, reference: str) -> bool:
    """The pattern's first group in the output equals the one in the reference (the whole,
    trimmed reference when it has no match: a reference may be the bare answer)."""
    found = re.search(pattern, output)
    if found is None:
        return False
    ref = re.search(pattern, reference)
    expected = ref.group(1) if ref is not None else reference
    return (found.group(1) or "").strip() == (expected or "").strip()


def aggregate(metrics: Sequence[EvalMetric], rows: Iterable[dict[str, Any]]) -> dict[str, float]:
    """status.evaluation's `{metric: value}` over scored rows (see the module docstring)."""
    rows = list(rows)
    scores: dict[str, float] = {}
    loss_sum = sum(float(r.get("lossSum") or 0.0) for r in rows)
    loss_tokens = sum(int(r.get("lossTokens") or 0) for r in rows)
    mean_loss = loss_sum / loss_tokens if loss_tokens else None
    for metric in metrics:
        if metric.regex is None and metric.name in LOSS_METRICS:
            value = mean_loss if metric.name == "loss" else _perplexity(mean_loss)
            if value is not None:
                scores[metric.name] = round(value, 6)
            continue
        held = [bool(r["results"].get(metric.name)) for r in rows]
        scores[metric.name] = round(sum(held) / len(held), 6) if held else 0.0
    return scores


def _perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return MAX_PERPLEXITY if loss > math.log(MAX_PERPLEXITY) else math.exp(loss)


def summary(scores: dict[str, Any]) -> str:
    """One line for a terminal: `exactMatch 0.41, answer 0.37 (baseline: exactMatch 0.05)`."""
    own = ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if k != "baseline")
    base = scores.get("baseline")
    if base:
        own += " (baseline: " + ", ".join(f"{k} {v:.4g}" for k, v in base.items()) + ")"
    return own
