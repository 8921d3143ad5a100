"""The replay as KubeRay in front of the Kubernetes API emulator (tests/kube/emulator.py).

Every RayJob and RayService that appears in the emulator is run by the replay in a thread of
its own; the status the replay computes is merge-patched into the object's status
subresource, and the submitter's output becomes the log of a pod `<rayjob>-xxxxx` labelled
`batch.kubernetes.io/job-name: <rayjob>` (the operator reads progress from there, as from
KubeRay's submitter pod). ConfigMaps are read from the emulator; Secrets, which the emulator
does not keep, come from the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.kuberay_replay.rayjob import RayJobReplay
from tests.kuberay_replay.rayservice import RayServiceReplay

log = logging.getLogger("kuberay_replay")
RAYJOBS = "ray.io/v1/rayjobs"
RAYSERVICES = "ray.io/v1/rayservices"
CONFIGMAPS = "v1/configmaps"
SCAN_SECONDS = 0.5


def status_patch(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A merge patch from one whole status to the next (a key dropped is set to null)."""
    patch: dict[str, Any] = {k: None for k in before if k not in after}
    for key, value in after.items():
        if isinstance(value, dict) and isinstance(before.get(key), dict):
            patch[key] = status_patch(before[key], value)
        elif before.get(key) != value or key not in before:
            patch[key] = value
    return patch


class KubeRayReplay:
    """Runs what the operator creates; `services` maps RayService names to their replays."""

    def __init__(
        self,
        kube: Any,
        workdir: Path,
        *,
        secrets: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.kube = kube
        self.workdir = workdir
        self.secrets = dict(secrets or {})
        self.jobs: dict[tuple[str, str], RayJobReplay] = {}
        self.services: dict[tuple[str, str], RayServiceReplay] = {}
        self.errors: list[BaseException] = []
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[KubeRayReplay]:
        self._loop = asyncio.get_running_loop()
        scanner = asyncio.create_task(self._scan())
        try:
            yield self
        finally:
            scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scanner
            for replay in [*self.jobs.values(), *self.services.values()]:
                await asyncio.to_thread(replay.stop)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _scan(self) -> None:
        while True:
            for obj in self.kube.list_objects(RAYJOBS):
                key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                if key not in self.jobs:
                    self._start_job(key, obj)
            for obj in self.kube.list_objects(RAYSERVICES):
                key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
                if key not in self.services:
                    self._start_service(key, obj)
            await asyncio.sleep(SCAN_SECONDS)

    # --- RayJob -----------------------------------------------------------------------

    def _start_job(self, key: tuple[str, str], obj: dict[str, Any]) -> None:
        namespace, name = key
        replay = RayJobReplay(
            obj,
            workdir=self.workdir,  # clusters get folders of their own; PVCs are shared
            config_maps=self._config_maps(namespace),
            secrets=self.secrets,
            write_status=self._status_writer(RAYJOBS, namespace, name),
            write_log=self._log_writer(namespace, name),
        )
        self.jobs[key] = replay
        self._tasks.append(asyncio.create_task(self._run(asyncio.to_thread(replay.run))))

    def _log_writer(self, namespace: str, job_name: str):
        pods: set[str] = set()

        async def write(pod: str, text: str) -> None:
            if pod not in pods:
                pods.add(pod)
                await self.kube.apply_object(_submitter_pod(namespace, job_name, pod))
            self.kube.set_pod_log(namespace, pod, text)

        return lambda pod, text: self._call(write(pod, text))

    # --- RayService -------------------------------------------------------------------

    def _start_service(self, key: tuple[str, str], obj: dict[str, Any]) -> None:
        namespace, name = key
        replay = RayServiceReplay(
            obj,
            workdir=self.workdir,
            config_maps=self._config_maps(namespace),
            secrets=self.secrets,
            write_status=self._status_writer(RAYSERVICES, namespace, name),
        )
        self.services[key] = replay
        self._tasks.append(asyncio.create_task(self._run(asyncio.to_thread(replay.start))))

    # --- plumbing ---------------------------------------------------------------------

    def _config_maps(self, namespace: str) -> dict[str, dict[str, str]]:
        return {
            cm["metadata"]["name"]: cm.get("data") or {}
            for cm in self.kube.list_objects(CONFIGMAPS, namespace)
        }

    def _status_writer(self, resource: str, namespace: str, name: str):
        written: dict[str, Any] = {}

        async def write(status: dict[str, Any]) -> None:
            patch = status_patch(written, status)
            written.clear()
            written.update(status)
            await self.kube.patch_status(resource, namespace, name, patch)

        return lambda status: self._call(write(status))

    def _call(self, coro) -> None:
        """From a replay's thread: run `coro` on the emulator's loop and wait for it."""
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    async def _run(self, work) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the test reports it (the replay itself broke)
            log.exception("replay failed")
            self.errors.append(exc)


def _submitter_pod(namespace: str, job_name: str, pod: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod,
            "namespace": namespace,
            "labels": {"batch.kubernetes.io/job-name": job_name},
        },
        "spec": {"containers": [{"name": "ray-job-submitter", "image": "rayproject/ray"}]},
    }
