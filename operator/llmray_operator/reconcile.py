"""One level-based pass per object: compute the desired children from the spec, converge,
and write the status computed from the children. The same pass runs on create, update,
resume, a child's change and a periodic resync, so a restart loses nothing and a second
run of the same pass changes nothing."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from llmray import progress as progress_lines
from llmray.api.validation import SpecError, parse_finetunejob, parse_llmdeployment
from llmray_operator import rayjob, rayservice
from llmray_operator.kube import (
    FINETUNEJOBS,
    LLMDEPLOYMENTS,
    RAYJOBS,
    RAYSERVICES,
    ApiError,
    KubeApi,
)
from llmray_operator.metrics import PHASES, RECONCILE_SECONDS, RECONCILES
from llmray_operator.names import ray_name
from llmray_operator.owner import Owner
from llmray_operator.settings import Settings
from llmray_operator.status import (
    TERMINAL,
    Verdict,
    condition,
    finetunejob_status,
    llmdeployment_status,
    rayservice_verdict,
)

log = logging.getLogger("llmray.operator")
# (body, type, reason, message): posts a Kubernetes Event about `body`.
Emit = Callable[[dict[str, Any], str, str, str], None]
# The RayJob is worth reading progress from once its driver may be running.
_PROGRESS_STATES = ("Running", "Retrying", "Complete", "Failed")


def utcnow() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _resource(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a live object the spec models read (no status, server metadata dropped)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace")},
        "spec": body.get("spec") or {},
    }


def _spec_error(exc: SpecError) -> str:
    return "; ".join(str(e) for e in exc.errors)


def is_subset(want: Any, have: Any) -> bool:
    """Every field we set has our value (the API server may add defaults around them)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(is_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(is_subset(w, h) for w, h in zip(want, have, strict=True))
        )
    return want == have


class Gone(Exception):
    """The object was deleted while its pass ran (its children go by garbage collection)."""


class Reconciler:
    def __init__(
        self,
        api: KubeApi,
        settings: Settings,
        *,
        emit: Emit | None = None,
        now: Callable[[], str] = utcnow,
    ) -> None:
        self.api = api
        self.settings = settings
        self.emit = emit or (lambda *_: None)
        self.now = now
        # One pass at a time per object: triggers (own events, children, timers) overlap.
        self._locks: defaultdict[tuple[str, str, str], asyncio.Lock] = defaultdict(asyncio.Lock)

    async def finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._run("FineTuneJob", namespace, name, self._finetunejob)

    async def llmdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._run("LLMDeployment", namespace, name, self._llmdeployment)

    async def _run(self, kind: str, namespace: str, name: str, fn) -> dict[str, Any] | None:
        async with self._locks[(kind, namespace, name)]:
            started = time.perf_counter()
            try:
                status = await fn(namespace, name)
            except Gone:
                status = None
            except Exception:
                RECONCILES.labels(kind, "error").inc()
                raise
            finally:
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)
            if status is None:
                PHASES.forget(kind, namespace, name)
                return None
            invalid = any(
                c.get("reason") == "InvalidSpec" and c.get("status") == "True"
                for c in status.get("conditions", [])
            )
            RECONCILES.labels(kind, "invalid" if invalid else "ok").inc()
            PHASES.set(kind, namespace, name, status["phase"])
            return status

    # --- FineTuneJob ------------------------------------------------------------------

    async def _finetunejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = await self.api.get(FINETUNEJOBS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # children go with it (ownerReferences)
        previous = body.get("status") or {}
        invalid = children = None
        try:
            job = parse_finetunejob(_resource(body))
            children = rayjob.build(job, Owner.of(body), self.settings)
        except SpecError as exc:
            invalid = _spec_error(exc)
        ray_status = progress = None
        job_name = ray_name(name)
        if children is not None:
            if previous.get("phase") in TERMINAL:
                # Done: never re-create a deleted RayJob (that would train again).
                ray_job = await self.api.get(RAYJOBS, namespace, job_name)
            else:
                await self.api.ensure(children.config_map)
                ray_job, created = await self.api.ensure(children.ray_job)
                if created:
                    self.emit(body, "Normal", "Created", f"RayJob {job_name} created")
            ray_status = (ray_job or {}).get("status")
            if (ray_status or {}).get("jobDeploymentStatus") in _PROGRESS_STATES:
                progress = await self._progress(namespace, job_name)
        status = finetunejob_status(
            previous=previous,
            generation=body["metadata"].get("generation", 0),
            now=self.now(),
            ray_job_name=job_name,
            ray_status=ray_status,
            model_uri=children.trainer_config.output_uri if children else "",
            progress=progress,
            invalid=invalid,
        )
        await self._write(FINETUNEJOBS, body, previous, status)
        return status

    async def _progress(self, namespace: str, job_name: str) -> dict[str, Any] | None:
        """The trainer's last progress record, from the driver output in the submitter's log.
        Progress is best effort: a log that cannot be read leaves the last known values."""
        try:
            text = await self.api.job_log_tail(namespace, job_name)
        except Exception as exc:  # never fail a pass over progress
            log.warning("progress of %s/%s: %s", namespace, job_name, exc)
            return None
        return progress_lines.last_record(text.splitlines()) if text else None

    # --- LLMDeployment ----------------------------------------------------------------

    async def _llmdeployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        body = await self.api.get(LLMDEPLOYMENTS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        previous = body.get("status") or {}
        service_name = model_uri = ""
        rs_status = None
        try:
            dep = parse_llmdeployment(_resource(body))
            verdict, model_uri = await self._model(namespace, dep)
            if model_uri:
                desired = rayservice.build(dep, Owner.of(body), model_uri, self.settings)
                service_name = desired["metadata"]["name"]
                rs_status = await self._converge_service(body, desired)
                verdict = rayservice_verdict(rs_status)
        except SpecError as exc:
            verdict = Verdict("Failed", "InvalidSpec", _spec_error(exc))
        status = llmdeployment_status(
            previous=previous,
            generation=body["metadata"].get("generation", 0),
            now=self.now(),
            verdict=verdict,
            ray_service_name=service_name,
            model_uri=model_uri,
            endpoint=rayservice.endpoint(name, namespace, self.settings),
            rs_status=rs_status,
        )
        await self._write(LLMDEPLOYMENTS, body, previous, status)
        return status

    async def _model(self, namespace: str, dep) -> tuple[Verdict, str]:
        """(verdict, model URI): the URI is empty while the referenced job has no model."""
        ref = dep.spec.model.fineTuneJobRef
        if ref is None:
            return Verdict("Deploying", "Creating"), dep.spec.model.uri or ""
        job = await self.api.get(FINETUNEJOBS, namespace, ref.name)
        if job is None:
            return Verdict(
                "WaitingForModel", "FineTuneJobNotFound", f"FineTuneJob {ref.name} does not exist"
            ), ""
        st = job.get("status") or {}
        phase = st.get("phase") or "Pending"
        if phase == "Failed":
            failed = condition(st, "Failed")
            return Verdict(
                "Failed",
                "ModelFailed",
                f"FineTuneJob {ref.name} failed: {failed.get('reason', '')}: "
                f"{failed.get('message', '')}",
            ), ""
        uri = (st.get("model") or {}).get("uri") or ""
        if phase == "Succeeded" and uri:
            return Verdict("Deploying", "Creating"), uri
        return Verdict(
            "WaitingForModel",
            f"FineTuneJob{phase}",
            f"waiting for FineTuneJob {ref.name} ({phase})",
        ), ""

    async def _converge_service(
        self, body: dict[str, Any], desired: dict[str, Any]
    ) -> dict[str, Any] | None:
        meta = desired["metadata"]
        service, created = await self.api.ensure(desired)
        if created:
            self.emit(body, "Normal", "Created", f"RayService {meta['name']} created")
            return None
        want = desired["metadata"]["annotations"]
        have = service["metadata"].get("annotations") or {}
        if have.get(rayservice.SPEC_HASH) != want[rayservice.SPEC_HASH]:
            # KubeRay rolls the Ray cluster (or updates Serve in place) on a spec change.
            service = await self.api.replace_spec(RAYSERVICES, service, desired["spec"], want)
            self.emit(body, "Normal", "Updated", f"RayService {meta['name']} updated")
        return service.get("status")

    # --- status -----------------------------------------------------------------------

    async def _write(self, res, body, previous: dict[str, Any], status: dict[str, Any]) -> None:
        meta = body["metadata"]
        # The API server fills schema defaults into what it stores: compare our fields only.
        if not is_subset(status, previous):
            try:
                await self.api.patch_status(res, meta["namespace"], meta["name"], status)
            except ApiError as exc:
                if exc.status == 404:
                    raise Gone from exc  # deleted during this pass: nothing left to report
                raise
        before, after = previous.get("phase"), status["phase"]
        if before != after:
            failed = after == "Failed"
            reason = condition(status, "Failed").get("reason", after) if failed else after
            message = (
                condition(status, "Failed").get("message", "")
                if failed
                else f"{body['kind']} is {after}"
            )
            self.emit(body, "Warning" if failed else "Normal", reason, message)
            log.info(
                "%s %s/%s: %s -> %s", body["kind"], meta["namespace"], meta["name"], before, after
            )
