"""spec.maxRetries is one budget: the driver's restarts and KubeRay's new clusters count together.

The unit tests run the budget on a local folder and on a real S3 API (moto's server); the
integration test runs a job whose workers fail every time (its weights file is cut short) on
real Ray Train: it runs 1 + maxRetries times, no more, and a second driver of the same run (what
KubeRay starts on a new cluster) gives up at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmray_trainer.retries import ATTEMPTS_FILE, RetriesUsedUp, RetryBudget


def test_one_plus_max_retries_starts(tmp_path: Path) -> None:
    budget = RetryBudget(str(tmp_path), "job", "uid-1", max_retries=2)
    budget.start()
    budget.start(reason=RuntimeError("worker lost"))
    budget.start(reason=RuntimeError("worker lost"))
    with pytest.raises(RetriesUsedUp) as err:
        budget.start(reason=RuntimeError("worker lost again"))
    # The failure first (the Failed condition keeps a message's start), then the budget.
    assert str(err.value).startswith("worker lost again")
    assert "gave up after 3 attempts: spec.maxRetries is 2" in str(err.value)


def test_a_new_driver_of_the_same_run_goes_on_counting(tmp_path: Path) -> None:
    RetryBudget(str(tmp_path), "job", "uid-1", max_retries=1).start()
    RetryBudget(str(tmp_path), "job", "uid-1", max_retries=1).start()  # KubeRay's retry
    with pytest.raises(RetriesUsedUp, match="previous attempt ended without finishing"):
        RetryBudget(str(tmp_path), "job", "uid-1", max_retries=1).start()
    record = json.loads((tmp_path / "job" / ATTEMPTS_FILE).read_text())
    assert record == {"run_id": "uid-1", "attempts": 2}


def test_a_new_job_of_the_same_name_starts_again(tmp_path: Path) -> None:
    RetryBudget(str(tmp_path), "job", "uid-1", max_retries=0).start()
    with pytest.raises(RetriesUsedUp):
        RetryBudget(str(tmp_path), "job", "uid-1", max_retries=0).start()
    RetryBudget(str(tmp_path), "job", "uid-2", max_retries=0).start()  # recreated: a new uid


def test_no_run_id_counts_in_this_process_only(tmp_path: Path) -> None:
    budget = RetryBudget(str(tmp_path), "job", "", max_retries=0)
    budget.start()
    with pytest.raises(RetriesUsedUp):
        budget.start(reason=RuntimeError("boom"))
    assert not (tmp_path / "job").exists()


def test_the_count_lives_beside_s3_checkpoints(s3) -> None:
    RetryBudget("s3://llmray-test/runs", "job", "uid-1", max_retries=1).start()
    RetryBudget("s3://llmray-test/runs", "job", "uid-1", max_retries=1).start()
    assert json.loads(s3.cat_file(f"llmray-test/runs/job/{ATTEMPTS_FILE}"))["attempts"] == 2
    with pytest.raises(RetriesUsedUp):
        RetryBudget("s3://llmray-test/runs", "job", "uid-1", max_retries=1).start()


@pytest.mark.integration
def test_failing_job_runs_one_plus_max_retries_times(
    ray_session, tmp_path, tiny_model, small_data
) -> None:
    from llmray.api.loader import load_resource
    from llmray_trainer.launcher import run
    from llmray_trainer.local import local_config
    from tests.test_finetune import write_job

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # every worker fails to load it
    job = load_resource(write_job(tmp_path, "always-fails", broken, small_data, maxRetries=1))
    cfg = local_config(job, tmp_path, 2).model_copy(update={"run_id": "uid-1"})
    with pytest.raises(RetriesUsedUp) as err:
        run(cfg)
    assert "gave up after 2 attempts: spec.maxRetries is 1" in str(err.value)
    assert "safetensors" in str(err.value).lower() or "header" in str(err.value).lower()
    attempts = Path(cfg.storage_path) / "always-fails" / ATTEMPTS_FILE
    assert json.loads(attempts.read_text())["attempts"] == 2
    # KubeRay's next try of the same job (a new cluster, a new driver) gives up at once.
    with pytest.raises(RetriesUsedUp, match="previous attempt ended without finishing"):
        run(cfg)
    assert json.loads(attempts.read_text())["attempts"] == 2
