"""Chaos: 20 FineTuneJobs and 5 LLMDeployments reconcile against an API server that throttles,
errs, conflicts and drops watches, while the operator process is SIGKILLed at random moments
10 times (tests/kube/chaos.py). At the end every resource has exactly one child of each kind,
every status is right, nothing was created twice and there was no Event storm.

A bigger run, with figures: benchmarks/operator_chaos.py (BENCHMARKS.md).
"""

from __future__ import annotations

import pytest

from tests.kube.chaos import run_chaos

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


async def test_the_operator_converges_through_faults_and_kills(tmp_path):
    report = await run_chaos(tmp_path, jobs=20, deployments=5, kills=10, seed=1)
    assert report.problems == [], (report.problems, report.operator_log[-5000:])
    assert report.kills == 10
    # The faults really happened, of every kind.
    assert set(report.faults) == {"throttle", "error", "error-after", "conflict", "watch-drop"}
