"""The trainer's resolved configuration: a FineTuneJob plus where it runs.

The same JSON drives both paths: `llmray finetune` builds it from a YAML file and runs it on an
embedded Ray; the operator builds it (pure, no I/O) into a ConfigMap that the RayJob's
entrypoint `python -m llmray_trainer --config FILE` reads. Secrets never appear here: pods get
them as environment variables by reference.
"""

from __future__ import annotations

import posixpath

from pydantic import BaseModel, ConfigDict, Field

from llmray.api.finetunejob import FineTuneJob, FineTuneJobSpec, ModelRef

# Ray node label that marks the node for world rank 0, e.g. llmray.io/rank0: "true". The
# operator puts it on the rank-0 worker group's `labels:`; the trainer asks Ray Train to
# place bundle 0 there and checks it at start.
RANK0_LABEL_KEY = "llmray.io/rank0"
RANK0_LABEL_VALUE = "true"


class TrainerConfig(BaseModel):
    """Everything the trainer reads; nothing comes from globals."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Run name = FineTuneJob name; reusing it resumes the run.")
    namespace: str = ""
    spec: FineTuneJobSpec
    base_dir: str = Field(description="Folder that relative paths in the spec are relative to.")
    storage_path: str = Field(description="Ray Train storage_path for checkpoints.")
    output_uri: str = Field(description="Where the final model goes.")
    cache_dir: str = Field(description="Downloads and converted GGUF models.")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPU cores per worker.")
    rank0_label: dict[str, str] = Field(
        default_factory=dict, description="Ray node label rank 0 must run on; empty: anywhere."
    )
    progress_file: str = Field(
        default="", description="Append progress records (JSON lines) here; empty: none."
    )
    run_id: str = Field(
        default="",
        description="One run across KubeRay's retries (the FineTuneJob's uid; a new one for "
        "each `llmray finetune`): spec.maxRetries counts its restarts; empty: per driver.",
    )


def default_rank0_label(job: FineTuneJob) -> dict[str, str]:
    """The Ray node label for rank 0: set only when the spec asks for a rank-0 placement."""
    return {RANK0_LABEL_KEY: RANK0_LABEL_VALUE} if job.spec.compute.rank0 is not None else {}


def resolve_trainer_config(
    job: FineTuneJob,
    *,
    base_dir: str,
    default_storage: str,
    cache_dir: str,
    cpus_per_worker: float,
    rank0_label: dict[str, str] | None = None,
    progress_file: str = "",
    run_id: str = "",
) -> TrainerConfig:
    """Fill what the spec leaves open. Pure: every environment fact is an argument."""
    spec = job.spec
    storage = spec.checkpointing.storageUri or default_storage
    output = spec.output.uri or f"{storage.rstrip('/')}/{job.metadata.name}/model"
    return TrainerConfig(
        name=job.metadata.name,
        namespace=job.metadata.namespace or "",
        spec=spec,
        base_dir=base_dir,
        storage_path=storage,
        output_uri=output,
        cache_dir=cache_dir,
        cpus_per_worker=cpus_per_worker,
        rank0_label=default_rank0_label(job) if rank0_label is None else rank0_label,
        progress_file=progress_file,
        run_id=run_id,
    )


def adapter_output(spec: FineTuneJobSpec) -> bool:
    """The job's output is the adapter alone: lora / qlora with output.mergeLora false."""
    return spec.method in ("lora", "qlora") and not spec.output.mergeLora


def base_model_uri(cfg: TrainerConfig) -> str:
    """Where a server finds an adapter's base: the job's baseModel.uri, a relative path made
    absolute against the job's folder (the trainer's own download of it is no place a server
    can read). Pure: recorded in adapter_config.json and in status.model.baseModel alike."""
    uri = cfg.spec.baseModel.uri
    if "://" in uri or posixpath.isabs(uri):
        return uri
    return posixpath.normpath(posixpath.join(cfg.base_dir, uri))


def produced_model(cfg: TrainerConfig) -> ModelRef:
    """status.model of a job run with `cfg`, once it succeeded: where its model is and, for an
    adapter, the model it applies to."""
    if adapter_output(cfg.spec):
        return ModelRef(uri=cfg.output_uri, adapter=True, baseModel=base_model_uri(cfg))
    return ModelRef(uri=cfg.output_uri)
