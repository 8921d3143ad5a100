"""Evaluation scoring (llmray.metrics), the scores' way into status, and the promotion gate
of `llmray serve` (pure: no Ray, no model)."""

from __future__ import annotations

import json
import math

import pytest

from llmray.api.finetunejob import EvalMetric
from llmray.metrics import aggregate, regex_match, score_row, summary
from llmray.progress import evaluation_of, format_line, last_record

METRICS = [
    EvalMetric(name="exactMatch"),
    EvalMetric(name="contains"),
    EvalMetric(name="answer", regex=r"#### (\d+)"),
    EvalMetric(name="loss"),
    EvalMetric(name="perplexity"),
]


def row(output: str, reference: str, loss_sum: float = 2.0, tokens: int = 2) -> dict:
    r = {"output": output, "reference": reference, "lossSum": loss_sum, "lossTokens": tokens}
    return {**r, "results": score_row(METRICS, r)}


def test_each_metric_on_one_row():
    assert row(" 42\n", "42")["results"] == {
        "exactMatch": True,
        "contains": True,
        "answer": False,  # no "#### N" in the output
        "loss": 1.0,
        "perplexity": math.e,
    }
    assert row("so #### 42", "work... #### 42")["results"]["answer"] is True
    assert row("so #### 41", "work... #### 42")["results"]["answer"] is False
    assert row("the answer is 42.", "42")["results"]["contains"] is True
    assert row("the answer is 42.", "42")["results"]["exactMatch"] is False
    assert row("anything", "")["results"]["contains"] is False  # an empty reference


def test_a_regex_compares_with_the_whole_reference_when_it_has_no_match():
    assert regex_match(r"#### (\d+)", "#### 7", "7")
    assert not regex_match(r"#### (\d+)", "#### 7", "8")


def test_scores_are_shares_and_the_loss_is_token_weighted():
    rows = [row("a", "a", 3.0, 1), row("b", "c", 1.0, 3)]
    scores = aggregate(METRICS, rows)
    assert scores["exactMatch"] == 0.5 and scores["contains"] == 0.5
    assert scores["loss"] == 1.0  # (3 + 1) / (1 + 3), not the mean of 3.0 and 0.33
    assert scores["perplexity"] == pytest.approx(math.e, rel=1e-5)
    json.dumps(scores, allow_nan=False)  # the status can carry it


def test_a_huge_loss_gives_a_finite_perplexity():
    scores = aggregate([EvalMetric(name="perplexity")], [row("a", "a", 1e6, 1)])
    assert math.isfinite(scores["perplexity"])


def test_summary_line():
    assert summary({"exactMatch": 0.8, "baseline": {"exactMatch": 0.05}}) == (
        "exactMatch 0.8 (baseline: exactMatch 0.05)"
    )


def test_the_last_record_carries_the_evaluation():
    scores = {"exactMatch": 0.8, "baseline": {"exactMatch": 0.1}}
    lines = [
        format_line({"event": "evaluated", "step": 5, "evaluation": scores}),
        format_line({"event": "done", "step": 5}),
    ]
    assert last_record(lines)["evaluation"] == scores
    assert evaluation_of(last_record(lines)).model_dump() == scores


@pytest.mark.parametrize("bad", ["high", {"a": "x"}, {"baseline": {"a": "y"}}, None])
def test_a_bad_evaluation_record_is_no_evaluation(bad):
    assert evaluation_of({"evaluation": bad}) is None


def test_llmray_serve_refuses_a_job_below_min_evaluation(tmp_path, monkeypatch):
    from llmray import paths
    from llmray.api.llmdeployment import LLMDeployment
    from llmray_serve.local import ModelNotReady, local_model_uri

    monkeypatch.setenv("LLMRAY_HOME", str(tmp_path))
    status = {"phase": "Succeeded", "model": {"uri": "/m"}, "evaluation": {"exactMatch": 0.3}}
    paths.job_dir("j").mkdir(parents=True)
    (paths.job_dir("j") / "status.json").write_text(json.dumps(status))

    def deployment(minimum):
        model = {"fineTuneJobRef": {"name": "j"}, "minEvaluation": minimum}
        return LLMDeployment.model_validate({"metadata": {"name": "d"}, "spec": {"model": model}})

    assert local_model_uri(deployment({"exactMatch": 0.3})) == "/m"
    with pytest.raises(ModelNotReady) as err:
        local_model_uri(deployment({"exactMatch": 0.5}))
    assert str(err.value) == (
        "spec.model.minEvaluation: BelowMinEvaluation: FineTuneJob j scored exactMatch 0.3, "
        "below minEvaluation exactMatch >= 0.5"
    )
    with pytest.raises(ModelNotReady, match="no evaluation score 'answer'"):
        local_model_uri(deployment({"answer": 0.1}))
