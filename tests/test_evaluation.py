"""spec.evaluation end to end (issue 17): a tiny model fine-tuned on "Repeat: X" -> "X" on
real Ray Train, then scored by Ray Data batch inference; what a user reads is checked: the
scores in the summary and status.json, predictions.jsonl next to the model, and that it holds
what the model generates when run directly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.test_finetune import finetune, write_job

pytestmark = pytest.mark.integration

# Few words: a 656k-parameter model learns to copy them within a few dozen steps.
WORDS = ["apple", "river", "green", "stone", "music", "happy"]


def repeat_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"instruction": f"Repeat: {word}", "response": word}
        for word in (rng.choice(WORDS) for _ in range(n))
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def evaluated(ray_session, tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("eval-job")
    train = write_jsonl(folder / "train.jsonl", repeat_records(128, seed=1))
    test = write_jsonl(folder / "test.jsonl", repeat_records(12, seed=2))
    job = write_job(
        folder,
        "repeat",
        tiny_model,
        train,
        dataset={"eval": str(test)},
        hyperparameters={"maxSteps": 60, "batchSizePerWorker": 8, "learningRate": 3e-3},
        compute={"workers": 2},
        evaluation={
            "maxNewTokens": 6,
            "batchSize": 4,
            "metrics": [{"name": "exactMatch"}, {"name": "contains"}, {"name": "loss"}],
            "baseline": True,
        },
    )
    return finetune(job), test, job


def test_the_fine_tuned_model_scores_clearly_above_its_baseline(evaluated, llmray_home):
    result, _, _ = evaluated
    scores = result.evaluation
    assert scores["exactMatch"] >= scores["baseline"]["exactMatch"] + 0.5, scores
    assert scores["loss"] < scores["baseline"]["loss"], scores
    status = json.loads((llmray_home / "jobs" / "repeat" / "status.json").read_text())
    assert status["evaluation"] == scores


def test_predictions_are_the_models_greedy_output_one_row_per_record(evaluated):
    from llmray_trainer.generate import chat_answer

    result, test, _ = evaluated
    records = [json.loads(line) for line in test.read_text().splitlines()]
    rows = [
        json.loads(line)
        for line in Path(result.model_uri, "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["reference"] for r in rows] == [r["response"] for r in records]
    for record, row in zip(records, rows, strict=True):
        assert row["output"] == chat_answer(result.model_uri, record["instruction"], 6)
        assert row["results"]["exactMatch"] == (row["output"].strip() == record["response"])
    baseline = Path(result.model_uri, "baseline-predictions.jsonl").read_text().splitlines()
    assert len(baseline) == len(records)


def predictions(result) -> list[dict]:
    text = Path(result.model_uri, "predictions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def test_llmray_batch_on_a_finetunejob_jsonl_in_input_order(evaluated, tmp_path, capsys):
    from llmray_cli.main import main

    result, test, job = evaluated
    records = [json.loads(line) for line in test.read_text().splitlines()][::-1]
    records[0] = {"instruction": records[0]["instruction"]}  # no response: no reference
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(job), "--input", str(source), "--output", str(out)]) == 0
    assert f"{len(records)} predictions" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = {p["prompt"]: p["output"] for p in predictions(result)}
    assert [r["reference"] for r in rows] == [""] + [r["response"] for r in records[1:]]
    assert [r["output"] for r in rows] == [expected[r["prompt"]] for r in rows]
    assert [r["prompt"].split("Repeat: ")[1].split("<")[0] for r in rows] == [
        r["instruction"].split("Repeat: ")[1] for r in records
    ]


def test_llmray_batch_on_an_llmdeployment_parquet(evaluated, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from llmray_cli.main import main

    result, test, _ = evaluated
    records = [json.loads(line) for line in test.read_text().splitlines()]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(records), source)
    dep = tmp_path / "dep.yaml"
    dep.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "llmray.io/v1alpha1",
                "kind": "LLMDeployment",
                "metadata": {"name": "repeat"},
                "spec": {"model": {"uri": result.model_uri}, "generation": {"maxNewTokens": 6}},
            }
        )
    )
    out = tmp_path / "out.parquet"
    argv = ["batch", str(dep), "--input", str(source), "--output", str(out), "--workers", "2"]
    assert main(argv) == 0
    rows = pq.read_table(out).to_pylist()
    assert [r["output"] for r in rows] == [p["output"] for p in predictions(result)]
    assert [r["reference"] for r in rows] == [r["response"] for r in records]


def test_an_adapter_only_job_is_scored_on_its_base(ray_session, tmp_path, tiny_model):
    train = write_jsonl(tmp_path / "train.jsonl", repeat_records(32, seed=3))
    test = write_jsonl(tmp_path / "test.jsonl", repeat_records(4, seed=4))
    job = write_job(
        tmp_path,
        "repeat-adapter",
        tiny_model,
        train,
        dataset={"eval": str(test)},
        method="lora",
        lora={"targetModules": ["q_proj", "v_proj"]},
        output={"mergeLora": False},
        hyperparameters={"maxSteps": 4},
        compute={"workers": 1},
        evaluation={"maxNewTokens": 4, "metrics": [{"name": "exactMatch"}, {"name": "loss"}]},
    )
    result = finetune(job)
    assert Path(result.model_uri, "adapter_config.json").exists()
    assert set(result.evaluation) == {"exactMatch", "loss"}
    assert len(predictions(result)) == 4
