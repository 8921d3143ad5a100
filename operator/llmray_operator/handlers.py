"""kopf wiring: every trigger runs the same level-based pass (`reconcile.Reconciler`).

    FineTuneJob    create / update / resume                  -> pass on it
    LLMDeployment  create / update / resume                  -> pass on it
    RayJob         any event (label managed-by=llmray)       -> pass on its FineTuneJob
    RayService     any event (label managed-by=llmray)       -> pass on its LLMDeployment
    FineTuneJob    any event                                 -> pass on LLMDeployments using it
                                                                (as their model or an adapter)
    resync task    every LLMRAY_PROGRESS_SECONDS / LLMRAY_RESYNC_SECONDS
                                                             -> running jobs / all deployments

No deletion handler, timer or daemon, and so no finalizer (kopf puts one on objects with
timers): children go with their parent through ownerReferences (garbage collection), and
deleting a CR never waits for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import Any

import kopf

from llmray_operator.kube import ApiError, KubeApi
from llmray_operator.metrics import PHASES
from llmray_operator.names import FINETUNEJOB_LABEL, LLMDEPLOYMENT_LABEL, MANAGED_BY, PREFIX
from llmray_operator.reconcile import Reconciler
from llmray_operator.resources import FINETUNEJOBS, LLMDEPLOYMENTS, RAYJOBS, RAYSERVICES
from llmray_operator.settings import Settings
from llmray_operator.status import TERMINAL

FTJ = FINETUNEJOBS.gvr  # e.g. ("llmray.io", "v1alpha1", "finetunejobs")
LLMD = LLMDEPLOYMENTS.gvr
# A pass that failed (API unreachable, throttled, a server error) is retried after this long,
# not at once; after a conflict (someone else wrote first) sooner.
RETRY_SECONDS = 10
CONFLICT_RETRY_SECONDS = 1
log = logging.getLogger("llmray.operator")


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # kopf's own bookkeeping under our prefix, in annotations, never in status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    # Only the events we post explicitly (phase transitions, children created).
    settings.posting.loggers = False
    # Serve exactly the namespaces given (or all) and the resources present at start: no
    # list/watch of Namespaces and CRDs, so namespaced installs need no cluster-wide role.
    # KubeRay's CRDs must exist before the operator starts (restart it after installing them).
    settings.scanning.disabled = True
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    current = Settings.from_env(os.environ)
    api = await KubeApi.connect()
    memo.reconciler = Reconciler(api, current, emit=_emit)
    # Objects seen on the watch streams, for the periodic passes: {(namespace, name): phase}.
    memo.jobs = {}
    memo.deployments = {}
    memo.resync = asyncio.create_task(_resync(memo, current))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    memo.resync.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await memo.resync


async def _resync(memo: kopf.Memo, settings: Settings) -> None:
    """The level-based safety net: running jobs every progress interval (their progress
    lives in a pod log, which sends no event), every deployment every resync interval."""
    tick = min(settings.progress_seconds, settings.resync_seconds)
    elapsed = 0.0
    while True:
        await asyncio.sleep(tick)
        elapsed += tick
        due = list(memo.jobs.items())
        for (namespace, name), phase in due:
            if phase not in TERMINAL:
                await _guarded(memo.reconciler.finetunejob(namespace, name))
        if elapsed >= settings.resync_seconds:
            elapsed = 0.0
            for namespace, name in list(memo.deployments):
                await _guarded(memo.reconciler.llmdeployment(namespace, name))


async def _guarded(pass_) -> None:
    try:
        await pass_
    except Exception as exc:  # a periodic pass must never end the loop
        log.warning("periodic pass failed: %s", exc)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """KUBECONFIG when set (a laptop, the tests), else the pod's service account. Explicit,
    because kopf picks its built-in login once, at import, from what is installed then."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def _emit(body: dict[str, Any], type_: str, reason: str, message: str) -> None:
    kopf.event(body, type=type_, reason=reason, message=message[:1024])


def _reconciler(memo: kopf.Memo) -> Reconciler:
    return memo.reconciler


async def _pass(pass_) -> None:
    """Run one pass; an API answer worth retrying (a conflict, throttling, a server error)
    becomes kopf's TemporaryError: retried after a delay, logged as one line."""
    try:
        await pass_
    except ApiError as exc:
        if exc.status == 409:
            raise kopf.TemporaryError(str(exc), delay=CONFLICT_RETRY_SECONDS) from exc
        if exc.status in (0, 429) or exc.status >= 500:
            raise kopf.TemporaryError(str(exc), delay=RETRY_SECONDS) from exc
        raise


# --- FineTuneJob ----------------------------------------------------------------------


@kopf.on.resume(*FTJ, backoff=RETRY_SECONDS)
@kopf.on.create(*FTJ, backoff=RETRY_SECONDS)
@kopf.on.update(*FTJ, backoff=RETRY_SECONDS)
async def finetunejob_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _pass(_reconciler(memo).finetunejob(namespace, name))


@kopf.on.event(*RAYJOBS.gvr, labels=MANAGED_BY)
async def rayjob_event(
    namespace: str, labels: dict[str, str], memo: kopf.Memo, event: dict[str, Any], **_: Any
) -> None:
    owner = labels.get(FINETUNEJOB_LABEL)
    if owner and event.get("type") != "DELETED":
        await _pass(_reconciler(memo).finetunejob(namespace, owner))


@kopf.index(*LLMD)
def llmdeployments_by_job(namespace: str, name: str, spec: dict[str, Any], **_: Any):
    """LLMDeployments waiting on (or serving) each FineTuneJob, as their model or as one of
    their adapters: {(ns, job): [deployment]}."""
    refs = [(spec.get("model") or {}).get("fineTuneJobRef") or {}]
    refs += [(a or {}).get("fineTuneJobRef") or {} for a in spec.get("adapters") or []]
    jobs = {ref["name"] for ref in refs if isinstance(ref, dict) and ref.get("name")}
    return {(namespace, job): name for job in sorted(jobs)} or None


@kopf.on.event(*FTJ)
async def finetunejob_event(
    namespace: str,
    name: str,
    status: dict[str, Any],
    event: dict[str, Any],
    memo: kopf.Memo,
    llmdeployments_by_job: kopf.Index,
    **_: Any,
) -> None:
    if event.get("type") == "DELETED":
        memo.jobs.pop((namespace, name), None)
        PHASES.forget("FineTuneJob", namespace, name)
    else:
        memo.jobs[(namespace, name)] = status.get("phase")
    for deployment in llmdeployments_by_job.get((namespace, name), []):
        await _pass(_reconciler(memo).llmdeployment(namespace, deployment))


# --- LLMDeployment --------------------------------------------------------------------


@kopf.on.resume(*LLMD, backoff=RETRY_SECONDS)
@kopf.on.create(*LLMD, backoff=RETRY_SECONDS)
@kopf.on.update(*LLMD, backoff=RETRY_SECONDS)
async def llmdeployment_changed(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    await _pass(_reconciler(memo).llmdeployment(namespace, name))


@kopf.on.event(*RAYSERVICES.gvr, labels=MANAGED_BY)
async def rayservice_event(
    namespace: str, labels: dict[str, str], memo: kopf.Memo, event: dict[str, Any], **_: Any
) -> None:
    owner = labels.get(LLMDEPLOYMENT_LABEL)
    if owner and event.get("type") != "DELETED":
        await _pass(_reconciler(memo).llmdeployment(namespace, owner))


@kopf.on.event(*LLMD)
async def llmdeployment_event(
    namespace: str, name: str, event: dict[str, Any], memo: kopf.Memo, **_: Any
) -> None:
    if event.get("type") == "DELETED":
        memo.deployments.pop((namespace, name), None)
        PHASES.forget("LLMDeployment", namespace, name)
    else:
        memo.deployments[(namespace, name)] = None


logging.getLogger("kr8s").setLevel(logging.WARNING)
