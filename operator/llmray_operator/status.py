"""Status as an API: our phase and conditions, computed from the children's status (pure).

Every KubeRay status value has a row here (see tests/test_operator_status.py); an unknown
future value maps to a non-terminal phase with its name as the reason, never to a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TERMINAL = ("Succeeded", "Failed")


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
    progress: dict[str, Any] | None = None,
    invalid: str | None = None,
) -> dict[str, Any]:
    """The whole FineTuneJob status. `invalid`: the message of a spec the cluster cannot run.

    Never regresses: a terminal phase stays, times and progress are kept when a child no
    longer reports them (KubeRay deletes the Ray cluster after the job, not the RayJob).
    """
    prev_phase = previous.get("phase") or "Pending"
    st = ray_status or {}
    if invalid is not None:
        verdict = Verdict("Failed", "InvalidSpec", invalid)
    elif prev_phase in TERMINAL:
        kept = condition(previous, prev_phase)
        verdict = Verdict(prev_phase, kept.get("reason") or prev_phase, kept.get("message") or "")
    else:
        verdict = rayjob_verdict(ray_status)
    out: dict[str, Any] = {
        "phase": verdict.phase,
        "observedGeneration": generation,
        "rayJobName": "" if invalid else ray_job_name,
        "dashboardURL": st.get("dashboardURL") or previous.get("dashboardURL", ""),
        "startTime": previous.get("startTime") or st.get("startTime") or "",
        "completionTime": previous.get("completionTime") or "",
        "progress": dict(previous.get("progress") or {}),
        "latestCheckpoint": previous.get("latestCheckpoint", ""),
        "model": dict(previous.get("model") or {"uri": ""}),
    }
    if verdict.phase != "Pending" and not out["startTime"]:
        out["startTime"] = now
    if verdict.phase in TERMINAL and not out["completionTime"]:
        out["completionTime"] = st.get("endTime") or now
    if progress:
        out["progress"].update(
            {k: progress[k] for k in _PROGRESS_KEYS if progress.get(k) is not None}
        )
        if progress.get("checkpoint"):
            out["latestCheckpoint"] = progress["checkpoint"]
    if verdict.phase == "Succeeded":
        out["model"] = {"uri": model_uri}
    running = verdict.phase == "Running"
    out["conditions"] = conditions(
        previous.get("conditions") or [],
        [
            ("Running", running, verdict.reason, verdict.message),
            ("Succeeded", verdict.phase == "Succeeded", verdict.reason, verdict.message),
            ("Failed", verdict.phase == "Failed", verdict.reason, verdict.message),
        ],
        now=now,
        generation=generation,
    )
    return out


_PROGRESS_KEYS = ("epoch", "step", "totalSteps", "trainLoss", "evalLoss", "tokensPerSecond")


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    """The condition of `type_` in a status, or {}."""
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


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
            return Verdict(
                "Failed", "DeployFailed", f"application {name}: {app.get('message', '')}"
            )
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
) -> dict[str, Any]:
    """The whole LLMDeployment status for a verdict (from the RayService, or a waiting /
    failed model reference). The endpoint is published once the service is Ready."""
    st = rs_status or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    upgrading = any(
        conds.get(t, {}).get("status") == "True"
        for t in ("UpgradeInProgress", "RollbackInProgress")
    )
    ready = verdict.phase == "Ready"
    model_ok = verdict.phase not in ("WaitingForModel",) and verdict.reason != "ModelFailed"
    return {
        "phase": verdict.phase,
        "observedGeneration": generation,
        "rayServiceName": ray_service_name,
        "modelUri": model_uri,
        # Published once Ready; kept while the RayService exists (e.g. during an upgrade).
        "endpoint": endpoint
        if ready
        else (previous.get("endpoint", "") if ray_service_name else ""),
        "conditions": conditions(
            previous.get("conditions") or [],
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
            ],
            now=now,
            generation=generation,
        ),
    }


# --- conditions ------------------------------------------------------------------------


def conditions(
    previous: list[dict[str, Any]],
    wanted: list[tuple[str, bool, str, str]],
    *,
    now: str,
    generation: int,
) -> list[dict[str, Any]]:
    """metav1.Condition list; lastTransitionTime moves only when a condition's status does."""
    before = {c.get("type"): c for c in previous}
    out = []
    for type_, is_true, reason, message in wanted:
        status = "True" if is_true else "False"
        old = before.get(type_)
        changed = old is None or old.get("status") != status
        out.append(
            {
                "type": type_,
                "status": status,
                "reason": reason or type_,
                "message": message,
                "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
                "observedGeneration": generation,
            }
        )
    return out
