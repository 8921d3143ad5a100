"""What the operator takes from `llmray plan` (llmray/sizing.py, the one place for sizing):
rank 0's memory request when `rank0.memory` is unset, and the `WontFit` verdict it reports
before creating the RayJob.

The operator reads no model files (it has neither the job's credentials nor its volumes): the
model's size is `spec.baseModel.parameters`. Without it there is no plan; rank 0 then gets the
workers' memory, as any worker (`llmray plan` on a machine that can read the model's
config.json says more).
"""

from __future__ import annotations

from llmray.api.finetunejob import FineTuneJob
from llmray.api.quantity import parse_quantity
from llmray.model_shape import from_parameters
from llmray.sizing import Plan, gib_quantity, plan, preemption_grace_seconds


def job_plan(job: FineTuneJob) -> Plan | None:
    hint = job.spec.baseModel.parameters
    if hint is None:
        return None
    return plan(job.spec, from_parameters(hint, "spec.baseModel.parameters"))


def rank0_memory(job: FineTuneJob, p: Plan | None) -> str | None:
    """rank0.memory when set; else the plan's rank-0 peak rounded up to Gi, never below a
    worker's memory; the worker's memory (or None) when there is no plan."""
    compute = job.spec.compute
    if compute.rank0 is not None and compute.rank0.memory is not None:
        return str(compute.rank0.memory)
    worker = compute.resourcesPerWorker.memory
    if p is None:
        return None if worker is None else str(worker)
    need = gib_quantity(p.rank0.peak_host)
    if worker is not None and parse_quantity(worker) >= parse_quantity(need):
        return str(worker)
    return need


def wont_fit(p: Plan | None) -> str | None:
    """The plan's misses as one message (which worker, what it needs, its limit), or None."""
    if p is None or p.fits:
        return None
    misses = [r.removeprefix("does not fit: ") for r in p.reasons if r.startswith("does not")]
    return "; ".join(misses) + " (llmray plan: peak host memory in load, train and export)"


def preemption_grace(job: FineTuneJob) -> int:
    """terminationGracePeriodSeconds of the training pods: checkpointing.
    preemptionGracePeriodSeconds, else from the plan's checkpoint size (a default without)."""
    p = job_plan(job)
    return preemption_grace_seconds(job.spec, p.checkpoint_bytes if p is not None else None)
