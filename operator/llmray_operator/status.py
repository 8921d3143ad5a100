"""Status as an API: our phase and conditions, computed from the children's status (pure).

Every KubeRay status value has a row here (see tests/test_operator_status.py); an unknown
future value maps to a non-terminal phase with its name as the reason, never to a crash.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmray.adapters import BASE_MISMATCH, BELOW_MIN, FAILED, NO_SCORE, NOT_AN_ADAPTER, NOT_FOUND
from llmray.api.common import Condition, condition
from llmray.api.finetunejob import FineTuneJobStatus, ModelRef, Progress
from llmray.api.llmdeployment import AdapterStatus, LLMDeploymentStatus
from llmray.progress import evaluation_of, failure_of, progress_of
from llmray.serve_args import AdapterArgs

TERMINAL = ("Succeeded", "Failed")
# Reasons a referenced job's model is not served: it failed, or the promotion gate refused it.
_MODEL_REFUSED = ("ModelFailed", BELOW_MIN, NO_SCORE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours its tracebacks


@dataclass(frozen=True)
class Verdict:
    phase: str
    reason: str
    message: str = ""


# --- FineTuneJob <- RayJob --------------------------------------------------------------


def rayjob_verdict(ray_status: dict[str, Any] | None) -> Verdict:
    """Phase of a FineTuneJob from its RayJob's `status` (jobDeploymentStatus x jobStatus)."""
    st = ray_status or {}
    deployment = st.get("jobDeploymentStatus") or ""
    job = st.get("jobStatus") or ""
    reason = st.get("reason") or ""
    message = st.get("message") or ""
    message = failure_of(message) or message  # the trainer's words when it stopped on an error
    if deployment in ("Failed", "ValidationFailed"):
        return Verdict("Failed", reason or deployment, message or f"RayJob {deployment}")
    if job == "SUCCEEDED":
        return Verdict("Succeeded", "JobSucceeded", message or "training finished")
    if deployment == "Complete":
        if job in ("FAILED", "STOPPED"):
            return Verdict("Failed", reason or f"Job{job.title()}", message or f"Ray job {job}")
        return Verdict("Running", "Completing", message)
    if deployment == "Retrying":
        return Verdict("Running", "Retrying", message or "retrying from the latest checkpoint")
    if deployment == "Running":
        if job in ("", "PENDING"):
            return Verdict("Pending", "JobPending", message or "Ray cluster up, job starting")
        if job in ("FAILED", "STOPPED"):
            # KubeRay decides next: Retrying (backoffLimit left) or Failed.
            return Verdict("Running", f"Job{job.title()}", message)
        return Verdict("Running", "Training", message)
    if deployment in ("Suspending", "Suspended"):
        return Verdict("Pending", deployment, message)
    if deployment in ("", "New", "Initializing"):
        return Verdict("Pending", "ClusterInitializing", message or "starting the Ray cluster")
    if deployment == "Waiting":
        return Verdict("Pending", "Waiting", message)
    return Verdict("Pending", deployment, message)


def finetunejob_status(
    *,
    previous: dict[str, Any],
    generation: int,
    now: str,
    ray_job_name: str,
    ray_status: dict[str, Any] | None,
    model_uri: str,
    adapter_base: str = "",
    progress: dict[str, Any] | None = None,
    invalid: str | None = None,
    wont_fit: tuple[bool, str] | None = None,
) -> dict[str, Any]:
    """The whole FineTuneJob status (the `FineTuneJobStatus` model, dumped as the API stores
    it). `progress`: the trainer's last progress record; `invalid`: the message of a spec the
    cluster cannot run (only judged before the RayJob exists: see `reconcile`); `model_uri`:
    where the trainer was told to write the model (`adapter_base`: the base model, when that
    is an adapter only); `wont_fit`: the memory plan's verdict
    (True and the misses, False: it fits), judged with `invalid` before the RayJob exists,
    None afterwards (the condition stays as judged then).

    Never regresses: a Succeeded or Failed status is final, as written when the job finished
    (no later spec check, operator setting or child status changes it, so `model.uri` stays
    what the LLMDeployments referencing it serve); times and progress are kept when a child
    no longer reports them (KubeRay deletes the Ray cluster after the job, not the RayJob).
    """
    before = FineTuneJobStatus.model_validate(previous)
    if before.phase in TERMINAL:
        return dump(before)
    st = ray_status or {}
    if invalid is not None:
        verdict = Verdict("Failed", "InvalidSpec", invalid)
    else:
        verdict = rayjob_verdict(ray_status)
    start_time = before.startTime or st.get("startTime") or ""
    if verdict.phase != "Pending" and not start_time:
        start_time = now
    completion_time = before.completionTime
    if verdict.phase in TERMINAL and not completion_time:
        completion_time = st.get("endTime") or now
    progress_fields = before.progress.model_dump(exclude_unset=True)
    latest_checkpoint = before.latestCheckpoint
    evaluation = before.evaluation
    if progress:
        progress_fields.update(progress_of(progress).model_dump(exclude_unset=True))
        if progress.get("checkpoint"):
            latest_checkpoint = str(progress["checkpoint"])
        evaluation = evaluation_of(progress) or evaluation
    produced = (
        ModelRef(uri=model_uri, adapter=True, baseModel=adapter_base)
        if adapter_base
        else ModelRef(uri=model_uri)
    )
    model = produced if verdict.phase == "Succeeded" else before.model
    status = FineTuneJobStatus(
        phase=verdict.phase,
        observedGeneration=generation,
        rayJobName="" if invalid else ray_job_name,
        dashboardURL=st.get("dashboardURL") or before.dashboardURL,
        startTime=start_time,
        completionTime=completion_time,
        progress=Progress.model_validate(progress_fields),
        latestCheckpoint=latest_checkpoint,
        **({"evaluation": evaluation} if evaluation is not None else {}),
        model=ModelRef.model_validate(
            model.model_dump(include={"uri"} | model.model_fields_set)
        ),  # uri even when empty; adapter and baseModel for an adapter
        conditions=conditions(
            before.conditions,
            [
                ("Running", verdict.phase == "Running", verdict.reason, verdict.message),
                ("Succeeded", verdict.phase == "Succeeded", verdict.reason, verdict.message),
                ("Failed", verdict.phase == "Failed", verdict.reason, verdict.message),
            ],
            now=now,
            generation=generation,
        )
        + _wont_fit(before.conditions, wont_fit, now=now, generation=generation),
    )
    return dump(status)


def _wont_fit(
    previous: Sequence[Condition], wont_fit: tuple[bool, str] | None, *, now: str, generation: int
) -> list[Condition]:
    """The WontFit condition: a prediction, never a failure (InvalidSpec is for certainties)."""
    if wont_fit is None:
        old = condition(previous, "WontFit")
        return [] if old is None else [old]
    misses, message = wont_fit
    reason = "WontFit" if misses else "Fits"
    return conditions(
        previous, [("WontFit", misses, reason, message)], now=now, generation=generation
    )


def dump(status: FineTuneJobStatus | LLMDeploymentStatus) -> dict[str, Any]:
    """A status as JSON: the fields this pass set (progress keys never reported stay out)."""
    return status.model_dump(mode="json", exclude_unset=True)


# --- LLMDeployment <- RayService (or the referenced FineTuneJob) ------------------------


def rayservice_verdict(rs_status: dict[str, Any] | None) -> Verdict:
    """Phase of an LLMDeployment from its RayService's `status`."""
    st = rs_status or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}

    def true(type_: str) -> bool:
        return conds.get(type_, {}).get("status") == "True"

    ready = conds.get("Ready", {})
    apps = (st.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    pending_apps = (st.get("pendingServiceStatus") or {}).get("applicationStatuses") or {}
    for name, app in {**apps, **pending_apps}.items():
        if app.get("status") == "DEPLOY_FAILED":
            return Verdict("Failed", "DeployFailed", deploy_failure(name, app))
    if true("Suspended") or true("Suspending"):
        return Verdict("Pending", "Suspended" if true("Suspended") else "Suspending")
    if true("Ready") or (not ready and st.get("serviceStatus") == "Running"):
        return Verdict("Ready", ready.get("reason") or "Ready", ready.get("message", ""))
    if ready.get("reason") in ("ValidationFailed", "InitializingTimeout"):
        return Verdict("Failed", ready["reason"], ready.get("message", ""))
    unhealthy = [
        f"{n}: {a.get('message', '')}" for n, a in apps.items() if a.get("status") == "UNHEALTHY"
    ]
    if unhealthy:
        return Verdict("Deploying", "Unhealthy", "; ".join(unhealthy))
    return Verdict("Deploying", ready.get("reason") or "Initializing", ready.get("message", ""))


def deploy_failure(name: str, app: dict[str, Any]) -> str:
    """Why an application failed. Serve's own message says only "Failed to update the
    deployments ['llm']." (the KubeRay replay showed it): the reason is the last line of the
    failed deployment's message (the replica's exception), so that goes in too."""
    parts = [f"application {name}: {app.get('message', '')}".rstrip()]
    for deployment, st in (app.get("serveDeploymentStatuses") or {}).items():
        if st.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") and st.get("message"):
            parts.append(f"deployment {deployment}: {_last_line(st['message'])}")
    return " ".join(parts)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def llmdeployment_status(
    *,
    previous: dict[str, Any],
    generation: int,
    now: str,
    verdict: Verdict,
    ray_service_name: str = "",
    model_uri: str = "",
    endpoint: str = "",
    rs_status: dict[str, Any] | None = None,
    adapters: Sequence[AdapterArgs] = (),
) -> dict[str, Any]:
    """The whole LLMDeployment status for a verdict (from the RayService, or a waiting /
    failed model reference). The endpoint is published once the service is Ready.
    `adapters`: spec.adapters resolved; with any, status.adapters and the AdaptersReady
    condition say which are served and why the others are not (the base model serves on)."""
    before = LLMDeploymentStatus.model_validate(previous)
    st = rs_status or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    upgrading = any(
        conds.get(t, {}).get("status") == "True"
        for t in ("UpgradeInProgress", "RollbackInProgress")
    )
    ready = verdict.phase == "Ready"
    model_ok = verdict.phase != "WaitingForModel" and verdict.reason not in _MODEL_REFUSED
    status = LLMDeploymentStatus(
        phase=verdict.phase,
        observedGeneration=generation,
        rayServiceName=ray_service_name,
        modelUri=model_uri,
        # Published once Ready; kept while the RayService exists (e.g. during an upgrade).
        endpoint=endpoint if ready else (before.endpoint if ray_service_name else ""),
        conditions=conditions(
            before.conditions,
            [
                ("Ready", ready, verdict.reason, verdict.message),
                (
                    "ModelAvailable",
                    model_ok,
                    "ModelAvailable" if model_ok else verdict.reason,
                    "" if model_ok else verdict.message,
                ),
                ("Upgrading", upgrading, "UpgradeInProgress" if upgrading else "NoUpgrade", ""),
                ("Failed", verdict.phase == "Failed", verdict.reason, verdict.message),
                *([adapters_condition(adapters)] if adapters else []),
            ],
            now=now,
            generation=generation,
        ),
    )
    out = dump(status)
    if adapters:
        out["adapters"] = [
            AdapterStatus(
                name=a.name, ready=a.ready, uri=a.uri, reason=a.reason, message=a.message
            ).model_dump(mode="json")
            for a in adapters
        ]
    return out


# Reasons that need the user (a wrong base, a failed job, not an adapter) before ones that
# only need time (a job still running): the condition's reason is the most pressing one.
_ADAPTER_REASONS = (BASE_MISMATCH, NOT_AN_ADAPTER, FAILED, NOT_FOUND, BELOW_MIN, NO_SCORE)


def adapters_condition(adapters: Sequence[AdapterArgs]) -> tuple[str, bool, str, str]:
    """AdaptersReady: True when every adapter is served; else the most pressing reason and
    each waiting adapter with its message."""
    waiting = [a for a in adapters if not a.ready]
    if not waiting:
        return ("AdaptersReady", True, "AdaptersReady", f"{len(adapters)} adapter(s) served")
    reasons = [a.reason for a in waiting]
    reason = next((r for r in _ADAPTER_REASONS if r in reasons), reasons[0])
    message = "; ".join(f"{a.name}: {a.message}" for a in waiting)
    return ("AdaptersReady", False, reason, message)


# --- conditions ------------------------------------------------------------------------


def conditions(
    previous: Sequence[Condition],
    wanted: list[tuple[str, bool, str, str]],
    *,
    now: str,
    generation: int,
) -> list[Condition]:
    """metav1.Condition list; lastTransitionTime moves only when a condition's status does."""
    out = []
    for type_, is_true, reason, message in wanted:
        status = "True" if is_true else "False"
        old = condition(previous, type_)
        out.append(
            Condition(
                type=type_,
                status=status,
                reason=reason or type_,
                message=message,
                lastTransitionTime=old.lastTransitionTime
                if old is not None and old.status == status and old.lastTransitionTime
                else now,
                observedGeneration=generation,
            )
        )
    return out
