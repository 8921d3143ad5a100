"""The operator under chaos: many resources reconciling against a flaky API server while the
operator process is SIGKILLed at random moments; then every outcome is checked.

    report = await run_chaos(tmp_path, jobs=20, deployments=5, kills=10, seed=1)
    assert report.problems == []

- the API emulator (tests/kube/emulator.py) injects faults into the operator's requests
  (tests/kube/faults.py: 429, 500 before and after taking effect, 409 on writes, watch
  streams cut);
- `llmray operator` runs as a process (as the chart runs it), killed with SIGKILL `kills`
  times at random moments and started again at once;
- KubeRay is played here: each RayJob goes Initializing -> Running -> Complete/SUCCEEDED (or
  Failed, for every 7th job), each RayService becomes Ready, a few passes of the player apart;
- the LLMDeployments serve FineTuneJobs by `fineTuneJobRef`, so they wait, then deploy.

At the end (once every resource reached its final phase, or `timeout` passed) `check`
lists whatever is wrong: a resource without exactly one child of each kind, a child created
more than once (a new uid), a wrong phase / reason / model URI / endpoint, or more Events
about one resource than its transitions explain.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.kube.emulator import KubeEmulator, emulated_cluster
from tests.kube.faults import Faults
from tests.kube.operator_crds import CONFIGMAPS, CRDS, EVENTS, FTJ, LLMD, RAYJOBS, RAYSERVICES

NS = "chaos"
# Events one resource may have: a Created event and one per phase it passes (FineTuneJob:
# Pending, Running, Succeeded/Failed; LLMDeployment: WaitingForModel, Deploying, Ready), with
# room for one more. More than this is a storm (an event per pass, per retry or per restart).
MAX_EVENTS_PER_RESOURCE = 6
# KubeRay's RayJob states, in the order the player walks them.
RAYJOB_STAGES = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
]
SUCCEEDED = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
FAILED = {
    "jobDeploymentStatus": "Failed",
    "jobStatus": "FAILED",
    "reason": "AppFailed",
    "message": "the trainer exited with 1",
}


def job_name(i: int) -> str:
    return f"job-{i:03d}"


def fails(i: int) -> bool:
    return i % 7 == 6


def finetunejob(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": job_name(i), "namespace": NS},
        "spec": {
            "baseModel": {"uri": "s3://models/smollm2-135m"},
            "dataset": {"train": "s3://data/train.jsonl", "format": "chat"},
            "method": "lora",
            "compute": {"workers": 2, "resourcesPerWorker": {"cpu": "2", "memory": "4Gi"}},
            "checkpointing": {"storageUri": "s3://runs"},
            "output": {"uri": f"s3://models/{job_name(i)}"},
        },
    }


def llmdeployment(d: int, job: int) -> dict[str, Any]:
    return {
        "apiVersion": "llmray.io/v1alpha1",
        "kind": "LLMDeployment",
        "metadata": {"name": f"serve-{d:03d}", "namespace": NS},
        "spec": {
            "model": {"fineTuneJobRef": {"name": job_name(job)}},
            "compute": {"resourcesPerReplica": {"cpu": "2", "memory": "4Gi"}},
        },
    }


@dataclass
class ChaosReport:
    jobs: int
    deployments: int
    kills: int = 0
    converged_s: float = 0.0  # from the first resource created to every final phase
    settled_s: float = 0.0  # from the last restart to every final phase (0: done before)
    problems: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    api_calls: int = 0
    events: int = 0
    max_events_per_resource: int = 0
    operator_log: str = ""


class Operator:
    """`llmray operator` as a child process; SIGKILL and start again."""

    def __init__(self, kubeconfig: Path, log: Path, env: dict[str, str]) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), **env}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llmray_cli",
                    "operator",
                    "--metrics-port",
                    "0",
                    "--health-port",
                    "0",
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)  # no cleanup, no goodbye: a node lost, an OOM
        await asyncio.to_thread(self.proc.wait, 30)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                await self.kill()


class KubeRayPlayer:
    """Moves every RayJob and RayService on, one stage per few ticks, as KubeRay would."""

    def __init__(self, kube: KubeEmulator, rng: random.Random) -> None:
        self.kube = kube
        self.rng = rng
        self.stage: dict[str, int] = {}
        self.ready: set[str] = set()

    async def run(self, tick: float = 0.1) -> None:
        while True:
            await self.step()
            await asyncio.sleep(tick)

    async def step(self) -> None:
        for rayjob in self.kube.list_objects(RAYJOBS, NS):
            name = rayjob["metadata"]["name"]
            stage = self.stage.setdefault(name, 0)
            if stage > len(RAYJOB_STAGES) or self.rng.random() > 0.3:
                continue
            if stage < len(RAYJOB_STAGES):
                status = RAYJOB_STAGES[stage]
            else:
                status = FAILED if fails(int(name.split("-")[1])) else SUCCEEDED
            await self.kube.patch_status(RAYJOBS, NS, name, dict(status))
            self.stage[name] = stage + 1
        for service in self.kube.list_objects(RAYSERVICES, NS):
            name = service["metadata"]["name"]
            if name in self.ready or self.rng.random() > 0.3:
                continue
            ready = {
                "type": "Ready",
                "status": "True",
                "reason": "NonZeroServeEndpoints",
                "message": "",
                "lastTransitionTime": "2026-11-23T10:40:00Z",
            }
            await self.kube.patch_status(RAYSERVICES, NS, name, {"conditions": [ready]})
            self.ready.add(name)


def _phase(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("status") or {}).get("phase")


def finished(kube: KubeEmulator, jobs: int, deployments: int) -> bool:
    done = all(
        _phase(kube.get_object(FTJ, NS, job_name(i))) == ("Failed" if fails(i) else "Succeeded")
        for i in range(jobs)
    )
    return done and all(
        _phase(kube.get_object(LLMD, NS, f"serve-{d:03d}")) == "Ready" for d in range(deployments)
    )


def check(kube: KubeEmulator, jobs: int, deployments: int, targets: list[int]) -> list[str]:
    """Everything that is not as it must be, one line each."""
    problems: list[str] = []

    def children(resource: str, owner: dict[str, Any]) -> list[dict[str, Any]]:
        uid = owner["metadata"]["uid"]
        return [
            c
            for c in kube.list_objects(resource, NS)
            if any(r.get("uid") == uid for r in c["metadata"].get("ownerReferences", []))
        ]

    for i in range(jobs):
        name = job_name(i)
        ftj = kube.get_object(FTJ, NS, name)
        if ftj is None:
            problems.append(f"{name}: gone")
            continue
        for resource in (RAYJOBS, CONFIGMAPS):
            owned = children(resource, ftj)
            if len(owned) != 1:
                problems.append(f"{name}: {len(owned)} {resource}")
        status = ftj.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        if fails(i):
            failed = conditions.get("Failed", {})
            if (status.get("phase"), failed.get("reason")) != ("Failed", "AppFailed"):
                problems.append(f"{name}: {status.get('phase')} {failed.get('reason')}")
        elif (status.get("phase"), (status.get("model") or {}).get("uri")) != (
            "Succeeded",
            f"s3://models/{name}",
        ):
            problems.append(f"{name}: {status.get('phase')} model {status.get('model')}")
    for d in range(deployments):
        name = f"serve-{d:03d}"
        dep = kube.get_object(LLMD, NS, name)
        if dep is None:
            problems.append(f"{name}: gone")
            continue
        if len(owned := children(RAYSERVICES, dep)) != 1:
            problems.append(f"{name}: {len(owned)} rayservices")
        status = dep.get("status") or {}
        want = (
            "Ready",
            f"s3://models/{job_name(targets[d])}",
            f"http://{name}-serve-svc.{NS}.svc.cluster.local:8000/v1",
        )
        got = (status.get("phase"), status.get("modelUri"), status.get("endpoint"))
        if got != want:
            problems.append(f"{name}: {got}, not {want}")
    # Nothing created twice: a deleted-and-recreated child would count 2 here.
    for (resource, _, name), count in kube.created.items():
        if count != 1:
            problems.append(f"{resource} {name} created {count} times")
    expected = {RAYJOBS: jobs, CONFIGMAPS: jobs, RAYSERVICES: deployments}
    for resource, count in expected.items():
        if len(kube.list_objects(resource, NS)) != count:
            problems.append(f"{len(kube.list_objects(resource, NS))} {resource}, not {count}")
    for name, count in events_by_resource(kube).items():
        if count > MAX_EVENTS_PER_RESOURCE:
            problems.append(f"{name}: {count} events (a storm)")
    return problems


def events_by_resource(kube: KubeEmulator) -> collections.Counter[str]:
    return collections.Counter(
        f"{e['involvedObject'].get('kind')}/{e['involvedObject'].get('name')}"
        for e in kube.list_objects(EVENTS, NS)
    )


async def _finished_at(kube: KubeEmulator, jobs: int, deployments: int) -> float:
    """When every resource first reached its final phase (a status never regresses)."""
    while not finished(kube, jobs, deployments):
        await asyncio.sleep(0.2)
    return time.monotonic()


async def run_chaos(
    tmp: Path,
    *,
    jobs: int = 20,
    deployments: int = 5,
    kills: int = 10,
    seed: int = 1,
    faults: Faults | None = None,
    kill_every: tuple[float, float] = (2.0, 6.0),
    timeout: float = 240.0,
) -> ChaosReport:
    rng = random.Random(seed)
    faults = faults or Faults(seed=seed, throttle=0.03, error=0.03, conflict=0.03, watch_drop=5)
    targets = [d % jobs for d in range(deployments)]
    targets = [t if not fails(t) else (t + 1) % jobs for t in targets]
    report = ChaosReport(jobs=jobs, deployments=deployments)
    async with emulated_cluster(tmp, CRDS) as (kube, kubeconfig):
        kube.faults = faults
        operator = Operator(
            kubeconfig,
            tmp / "operator.log",
            # Periodic passes often: a pass that failed on a fault is retried by kopf only
            # after its backoff, the resync catches it up sooner.
            {"LLMRAY_RESYNC_SECONDS": "2", "LLMRAY_PROGRESS_SECONDS": "1"},
        )
        player = asyncio.create_task(KubeRayPlayer(kube, rng).run())
        done = asyncio.create_task(_finished_at(kube, jobs, deployments))
        operator.start()
        try:
            started = time.monotonic()
            for d in range(deployments):
                await kube.apply_object(llmdeployment(d, targets[d]))
            for i in range(jobs):
                await kube.apply_object(finetunejob(i))
            last_start = started
            for _ in range(kills):
                await asyncio.sleep(rng.uniform(*kill_every))
                await operator.kill()
                report.kills += 1
                operator.start()
                last_start = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(done), timeout - (time.monotonic() - started))
            except asyncio.TimeoutError:
                report.problems.append(f"not finished after {timeout:.0f} s")
            else:
                report.converged_s = done.result() - started
                report.settled_s = max(0.0, done.result() - last_start)
            await asyncio.sleep(1.0)  # anything more it would do (a storm) shows now
        finally:
            player.cancel()
            done.cancel()
            await operator.stop()
        report.problems += check(kube, jobs, deployments, targets)
        report.faults = dict(faults.injected)
        report.api_calls = len(kube.api_calls)
        by_resource = events_by_resource(kube)
        report.events = sum(by_resource.values())
        report.max_events_per_resource = max(by_resource.values(), default=0)
    report.operator_log = (tmp / "operator.log").read_text()
    return report
