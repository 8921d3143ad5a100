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
from llmray.adapters import evaluation_gate, referenced_jobs, resolve_adapters
from llmray.api.common import condition
from llmray.api.finetunejob import FineTuneJobStatus, ModelRef
from llmray.api.validation import SpecError, parse_finetunejob, parse_llmdeployment
from llmray.serve_args import AdapterArgs
from llmray.trainer_config import TrainerConfig, produced_model
from llmray_operator import rayjob, rayservice, sizing
from llmray_operator.kube import ApiError, KubeApi
from llmray_operator.metrics import PHASES, RECONCILE_SECONDS, RECONCILES
from llmray_operator.names import config_map_name, ray_name
from llmray_operator.owner import Owner
from llmray_operator.resources import (
    CONFIGMAPS,
    FINETUNEJOBS,
    LLMDEPLOYMENTS,
    RAYJOBS,
    RAYSERVICES,
)
from llmray_operator.settings import Settings
from llmray_operator.status import (
    TERMINAL,
    Verdict,
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
        if previous.get("phase") in TERMINAL:
            # Finished: its status is final, and nothing is re-created (that would train
            # again) or re-judged (a changed setting must not fail a job that succeeded).
            return previous
        job_name = ray_name(name)
        ray_job = await self.api.get(RAYJOBS, namespace, job_name)
        invalid = model = fit = None
        if ray_job is None:
            # Not submitted yet: the spec is judged against this operator's settings now.
            try:
                job = parse_finetunejob(_resource(body))
                children = rayjob.build(job, Owner.of(body), self.settings)
            except SpecError as exc:
                invalid = _spec_error(exc)
            else:
                # Warned before the RayJob exists; the job still runs: a plan is a prediction.
                misses = sizing.wont_fit(children.plan)
                if misses is not None:
                    self.emit(body, "Warning", "WontFit", misses)
                if children.plan is not None:
                    fit = (misses is not None, misses or "the memory plan fits every worker")
                await self.api.ensure(children.config_map)
                ray_job, created = await self.api.ensure(children.ray_job)
                if created:
                    self.emit(body, "Normal", "Created", f"RayJob {job_name} created")
                model = produced_model(children.trainer_config)
        ray_status = progress = None
        if ray_job is not None:
            # Submitted: follow the RayJob, whatever the settings say now; the model is
            # where the trainer's config (the ConfigMap it runs with) says it goes.
            ray_status = ray_job.get("status")
            if model is None:
                model = await self._produced(namespace, name)
            if (ray_status or {}).get("jobDeploymentStatus") in _PROGRESS_STATES:
                progress = await self._progress(namespace, job_name)
        status = finetunejob_status(
            previous=previous,
            generation=body["metadata"].get("generation", 0),
            now=self.now(),
            ray_job_name=job_name,
            ray_status=ray_status,
            model_uri=model.uri if model else "",
            adapter_base=model.baseModel if model else "",
            progress=progress,
            invalid=invalid,
            wont_fit=fit,
        )
        await self._write(FINETUNEJOBS, body, previous, status)
        return status

    async def _produced(self, namespace: str, name: str) -> ModelRef | None:
        """What the trainer config the RayJob runs with produces (None if it is gone)."""
        config_map = await self.api.get(CONFIGMAPS, namespace, config_map_name(name))
        text = ((config_map or {}).get("data") or {}).get(rayjob.CONFIG_KEY)
        try:
            return produced_model(TrainerConfig.model_validate_json(text)) if text else None
        except ValueError as exc:  # edited by hand: report no model rather than fail the pass
            log.warning("ConfigMap %s/%s: %s", namespace, config_map_name(name), exc)
            return None

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
        adapters: list[AdapterArgs] = []
        try:
            dep = parse_llmdeployment(_resource(body))
            verdict, model_uri = await self._model(namespace, dep)
            adapters = await self._adapters(namespace, dep, model_uri)
            if model_uri:
                desired = rayservice.build(dep, Owner.of(body), model_uri, self.settings, adapters)
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
            adapters=adapters,
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
        st = FineTuneJobStatus.model_validate(job.get("status") or {})
        phase = st.phase
        if phase == "Failed":
            failed = condition(st.conditions, "Failed")
            return Verdict(
                "Failed",
                "ModelFailed",
                f"FineTuneJob {ref.name} failed: {failed.reason if failed else ''}: "
                f"{failed.message if failed else ''}",
            ), ""
        if phase == "Succeeded" and st.model.uri:
            # The promotion gate: a finished job's scores never change, so below the
            # threshold is final (lowering minEvaluation or another job ref serves again).
            gate = evaluation_gate(
                ref.name, dep.spec.model.minEvaluation, (job.get("status") or {}).get("evaluation")
            )
            if gate is not None:
                return Verdict("Failed", *gate), ""
            return Verdict("Deploying", "Creating"), st.model.uri
        return Verdict(
            "WaitingForModel",
            f"FineTuneJob{phase}",
            f"waiting for FineTuneJob {ref.name} ({phase})",
        ), ""

    async def _adapters(self, namespace: str, dep, model_uri: str) -> list[AdapterArgs]:
        """spec.adapters resolved against the FineTuneJobs they reference, as they are now."""
        jobs = {}
        for job in referenced_jobs(dep):
            body = await self.api.get(FINETUNEJOBS, namespace, job)
            jobs[job] = None if body is None else body.get("status") or {}
        return resolve_adapters(dep, jobs, model_uri)

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
            if after == "Failed":  # both kinds always carry a Failed condition
                failed = next(c for c in status["conditions"] if c["type"] == "Failed")
                self.emit(body, "Warning", failed["reason"], failed["message"])
            else:
                self.emit(body, "Normal", after, f"{body['kind']} is {after}")
            log.info(
                "%s %s/%s: %s -> %s", body["kind"], meta["namespace"], meta["name"], before, after
            )
