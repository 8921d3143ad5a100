"""FineTuneJob (short name `ftj`): fine-tune a base model on a dataset, export HF format.

Field names are the public contract (DESIGN.md): add fields where users need them, never
rename these.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator

from llmray.api.common import (
    API_VERSION,
    CONDITIONS_LIST_MAP,
    ENV_MAX_ITEMS,
    IMAGE_MAX_LENGTH,
    TOLERATIONS_MAX_ITEMS,
    Accelerator,
    Condition,
    EnvVar,
    Model,
    NodeSelector,
    ObjectMeta,
    Quantity,
    Resources,
    SecretRef,
    Toleration,
    Uri,
)

KIND = "FineTuneJob"
PLURAL = "finetunejobs"  # e.g. kubectl get finetunejobs
SHORT_NAME = "ftj"

DatasetFormat = Literal["instruction", "text", "chat"]
Method = Literal["full", "lora", "qlora"]
Precision = Literal["bf16", "fp16", "fp32"]
LrScheduler = Literal["linear", "cosine", "constant", "constant_with_warmup"]
StrategyType = Literal["ddp", "deepspeed"]
Phase = Literal["Pending", "Running", "Succeeded", "Failed"]
# DeepSpeed's ZeRO stage when strategy.type is deepspeed and zeroStage is unset.
DEFAULT_ZERO_STAGE = 2
# A token or module name, e.g. "<ASSISTANT>" or "q_proj".
ShortString = Annotated[str, Field(max_length=256)]
# spec.evaluation.metrics: the built-in metrics by name (a metric with `regex` may take any
# other name, e.g. answer). Generation metrics compare the model's output with the reference;
# loss and perplexity come from the reference's tokens under the model (no generation).
GENERATION_METRICS = ("exactMatch", "contains")
LOSS_METRICS = ("loss", "perplexity")
BUILTIN_METRICS = GENERATION_METRICS + LOSS_METRICS
# status.evaluation.baseline holds the base model's scores: no metric may take that name.
BASELINE_KEY = "baseline"
EVAL_MAX_NEW_TOKENS = 256  # evaluation: {maxNewTokens: 256}


class BaseModelSource(Model):
    """Where the base model comes from."""

    uri: Uri = Field(
        description="hf://ORG/NAME, s3://BUCKET/PATH, gs://BUCKET/PATH, pvc://CLAIM/PATH or "
        "file:///PATH: a Hugging Face model folder, or a single .gguf file (dequantized and "
        "converted to HF format once, in the run's work dir)."
    )
    revision: str | None = Field(
        default=None,
        max_length=256,
        description="Branch, tag or commit of an hf:// model. Default main.",
    )
    secretRef: SecretRef | None = Field(
        default=None,
        description="Secret with credentials for the model source (e.g. HF_TOKEN, "
        "AWS_ACCESS_KEY_ID); its keys become environment variables of the training pods.",
    )
    parameters: int | None = Field(
        default=None,
        ge=1,
        description="Parameter count of the model, e.g. 6738415616: a hint for `llmray plan` "
        "and the operator's memory sizing when the model's config.json cannot be read.",
    )


class Dataset(Model):
    """Training (and evaluation) data: JSON lines, JSON or Parquet, one example a record."""

    train: Uri = Field(description="Training data file (.jsonl, .json or .parquet); URI or path.")
    eval: Uri | None = Field(
        default=None, description="Evaluation data file in the same format. Optional."
    )
    evalFraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Share of the training data held out for evaluation when eval is unset.",
    )
    format: DatasetFormat = Field(
        default="instruction",
        description='instruction: {"instruction", "context", "response"}; text: {"input"}; '
        'chat: {"messages": [{"role", "content"}]} rendered with the tokenizer\'s chat '
        "template (or llmray's default template when the tokenizer has none).",
    )
    specialTokens: list[ShortString] = Field(
        default_factory=list,
        max_length=1024,
        description="Tokens added to the tokenizer (embeddings resized), e.g. <ASSISTANT>.",
    )
    maxSeqLength: int = Field(
        default=512, ge=8, le=131072, description="Examples are truncated to this many tokens."
    )
    maskPrompt: bool = Field(
        default=True,
        description="Compute the loss on response tokens only (instruction and chat formats).",
    )


class Lora(Model):
    """LoRA adapter settings (method lora or qlora)."""

    rank: int = Field(default=8, ge=1, le=1024, description="Rank r of the update matrices.")
    alpha: int = Field(default=16, ge=1, description="Scaling alpha (update scaled by alpha/r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    targetModules: list[ShortString] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=256,
        description="Names of the modules that get adapters, e.g. q_proj, v_proj.",
    )


class Hyperparameters(Model):
    """Optimisation settings."""

    epochs: int = Field(default=1, ge=1, description="Passes over the training data.")
    maxSteps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    learningRate: float = Field(default=2.0e-5, gt=0, description="Peak learning rate (AdamW).")
    batchSizePerWorker: int = Field(default=8, ge=1, description="Micro-batch size per worker.")
    gradientAccumulationSteps: int = Field(
        default=1, ge=1, description="Micro-batches accumulated per optimizer step."
    )
    warmupRatio: float = Field(
        default=0.0, ge=0, lt=1, description="Share of the total steps spent warming up."
    )
    weightDecay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    lrScheduler: LrScheduler = Field(
        default="cosine", description="linear, cosine, constant or constant_with_warmup."
    )
    seed: int = Field(
        default=42,
        ge=0,
        description="Seed for init, shuffling and dropout: same seed, same losses.",
    )
    precision: Precision = Field(
        default="fp32",
        description="bf16, fp16 or fp32. On CPUs without bf16 hardware (no AMX / AVX-512 BF16) "
        "bf16 is ~10x slower than fp32: a warning is logged.",
    )
    gradientCheckpointing: bool = Field(
        default=False, description="Recompute activations in backward to save memory."
    )
    torchCompile: bool = Field(
        default=False,
        description="torch.compile the model: faster steady state after a compile pause "
        "(measured on CPU: ~3x after ~50 s). ddp only.",
    )
    logEverySteps: int = Field(default=1, ge=1, description="Report progress every N steps.")


class ZeroTuning(Model):
    """ZeRO's communication buckets and stage-3 memory limits, in parameters (elements).

    Unset values come from the model's hidden size h, as transformers' DeepSpeed integration
    does for "auto": reduce bucket h*h, stage-3 prefetch bucket 0.9*h*h, parameters under 10*h
    never partitioned; stage-3 live parameters and reuse distance: two decoder layers (24*h*h).
    """

    reduceBucketSize: int | None = Field(
        default=None, ge=1, description="Gradients reduced per bucket. Unset: h*h."
    )
    prefetchBucketSize: int | None = Field(
        default=None, ge=1, description="ZeRO-3: parameters fetched ahead. Unset: 0.9*h*h."
    )
    paramPersistenceThreshold: int | None = Field(
        default=None,
        ge=0,
        description="ZeRO-3: parameters smaller than this stay whole on every rank. Unset: 10*h.",
    )
    maxLiveParameters: int | None = Field(
        default=None,
        ge=1,
        description="ZeRO-3: gathered parameters kept at once per rank. Unset: 24*h*h.",
    )
    maxReuseDistance: int | None = Field(
        default=None,
        ge=0,
        description="ZeRO-3: a gathered parameter reused within this many parameters is kept. "
        "Unset: 24*h*h.",
    )


class Strategy(Model):
    """How the model is spread over the workers."""

    type: StrategyType = Field(
        default="ddp", description="ddp (gloo on CPU, nccl on GPU) or deepspeed (ZeRO)."
    )
    zeroStage: Literal[1, 2, 3] | None = Field(
        default=None,
        description="DeepSpeed ZeRO stage 1, 2 or 3 (deepspeed only; default "
        f"{DEFAULT_ZERO_STAGE}).",
    )
    offloadOptimizer: bool = Field(
        default=False, description="ZeRO: keep optimizer state in host memory (deepspeed only)."
    )
    offloadParameters: bool = Field(
        default=False, description="ZeRO-3: keep parameters in host memory (zeroStage 3 only)."
    )
    zeroTuning: ZeroTuning | None = Field(
        default=None,
        description="DeepSpeed ZeRO bucket sizes and stage-3 limits; each unset one is derived "
        "from the model's hidden size (deepspeed only).",
    )

    def zero_stage(self) -> int:
        """The ZeRO stage this strategy runs: 0 under ddp, zeroStage (default
        DEFAULT_ZERO_STAGE) under deepspeed."""
        return (self.zeroStage or DEFAULT_ZERO_STAGE) if self.type == "deepspeed" else 0


class Rank0(Model):
    """Placement of world rank 0, which writes the final model (one gathered shard at a time)."""

    nodeSelector: NodeSelector = Field(
        default_factory=dict,
        description="Node labels for rank 0's pod, e.g. llmray.io/memory-class: large; also set "
        "as a Ray node label so Ray Train places rank 0 there.",
    )
    memory: Quantity | None = Field(
        default=None,
        description="Memory request of rank 0's pod; unset: rank 0's peak host memory as "
        "`llmray plan` predicts it (training plus the streamed export of the final model).",
    )


class Compute(Model):
    """The workers: how many, on which hardware."""

    accelerator: Accelerator = Field(default="cpu", description="cpu, nvidia-gpu or intel-gpu.")
    ipex: bool = Field(
        default=False,
        description="Use Intel Extension for PyTorch (cpu or intel-gpu; needs the Intel image).",
    )
    workers: int = Field(default=1, ge=1, le=4096, description="Ray Train workers (world size).")
    resourcesPerWorker: Resources = Field(
        default_factory=Resources, description="Resources of each worker."
    )
    nodeSelector: NodeSelector = Field(
        default_factory=dict, description="Node labels every worker pod must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=TOLERATIONS_MAX_ITEMS,
        description="Tolerations of the worker pods.",
    )
    rank0: Rank0 | None = Field(
        default=None,
        description="Put rank 0 on a dedicated (large-memory) node; unset: anywhere.",
    )


class Checkpointing(Model):
    """When and where checkpoints are written; a re-run of the same job resumes from them."""

    storageUri: Uri | None = Field(
        default=None,
        description="Ray Train storage_path (s3://, gs://, pvc://, file:// or a path). Unset: "
        "~/.llmray/runs locally, the run's ConfigMap-resolved default on a cluster.",
    )
    everySteps: int | None = Field(
        default=None, ge=1, description="Checkpoint every N optimizer steps."
    )
    everyEpoch: bool = Field(default=True, description="Checkpoint at the end of each epoch.")
    keep: int = Field(default=2, ge=1, description="Checkpoints kept (latest ones).")
    preemptionGracePeriodSeconds: int | None = Field(
        default=None,
        ge=1,
        le=604800,
        description="terminationGracePeriodSeconds of the worker pods: a worker told to stop "
        "(SIGTERM: eviction, a spot node draining) checkpoints at the next step boundary and "
        "exits within it. Unset: 60 s plus the largest rank's checkpoint share at 100 MiB/s "
        "(`llmray plan`), or 300 s when the model's size is unknown.",
    )


class Output(Model):
    """Where the final model goes."""

    uri: Uri | None = Field(
        default=None,
        description="Destination of the final model in Hugging Face format, with tokenizer. "
        "Unset: the run's folder under checkpointing.storageUri.",
    )
    mergeLora: bool = Field(
        default=True,
        description="lora / qlora: merge the adapter into the base weights on export; false: "
        "the output is the adapter alone (PEFT format, with the tokenizer if training changed "
        "it), served on the base model through an LLMDeployment's spec.adapters.",
    )


class EvalMetric(Model):
    """One score of spec.evaluation: a built-in metric, or a regex compared on its first group."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z][A-Za-z0-9_]*$",
        description="exactMatch (output == reference, whitespace-trimmed), contains (the "
        "reference appears in the output), loss (mean loss per reference token), perplexity "
        "(exp of it); any other name needs regex. The key in status.evaluation.",
    )
    regex: str | None = Field(
        default=None,
        max_length=1024,
        description='A Python regular expression with a group, e.g. "#### (\\d+)": the first '
        "group found in the output is compared with the one found in the reference (the whole "
        "reference when it has no match).",
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("needs a group, e.g. #### (\\d+): its first group is compared")
        return value


class Sampling(Model):
    """How evaluation generates: greedy unless a temperature is set."""

    temperature: float = Field(
        default=0.0, ge=0, le=2, description="0: greedy decoding (the default, reproducible)."
    )
    topP: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling top_p.")
    seed: int = Field(default=0, ge=0, description="Seed of the sampling (temperature > 0).")


class Evaluation(Model):
    """Scores of the exported model on held-out data, by Ray Data batch inference after export.

    Prompts are rendered as in training (instruction: the instruction and context; chat: the
    messages before the last assistant turn, whose content is the reference). The predictions
    (prompt, reference, output, each metric's result) go to predictions.jsonl in the model's
    folder, the scores to status.evaluation.
    """

    dataset: Uri | None = Field(
        default=None,
        description="Evaluation records in spec.dataset.format (.jsonl, .json or .parquet). "
        "Unset: the eval split (spec.dataset.eval or evalFraction).",
    )
    maxNewTokens: int = Field(
        default=EVAL_MAX_NEW_TOKENS, ge=1, le=32768, description="Tokens generated per prompt."
    )
    batchSize: int = Field(
        default=8, ge=1, le=4096, description="Prompts generated together per worker."
    )
    sampling: Sampling = Field(default_factory=Sampling, description="Greedy by default.")
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: [{"name": "exactMatch"}],
        validate_default=True,
        min_length=1,
        max_length=32,
        description="What is scored; default exactMatch.",
    )
    baseline: bool = Field(
        default=False,
        description="Also score the base model on the same records (status.evaluation.baseline).",
    )


class FineTuneJobSpec(Model):
    """What to fine-tune, on what, how, and where the result goes."""

    baseModel: BaseModelSource = Field(description="The model to start from.")
    dataset: Dataset = Field(description="Training and evaluation data.")
    method: Method = Field(
        default="full", description="full, lora (peft adapters) or qlora (4-bit, nvidia-gpu)."
    )
    lora: Lora | None = Field(default=None, description="LoRA settings (method lora/qlora).")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Optimisation settings."
    )
    strategy: Strategy = Field(default_factory=Strategy, description="ddp or DeepSpeed ZeRO.")
    compute: Compute = Field(default_factory=Compute, description="Workers and hardware.")
    checkpointing: Checkpointing = Field(
        default_factory=Checkpointing, description="Checkpoints and resume."
    )
    output: Output = Field(default_factory=Output, description="The exported model.")
    evaluation: Evaluation | None = Field(
        default=None,
        description="Score the exported model on held-out data (batch inference); unset: none.",
    )
    maxRetries: int = Field(
        default=1,
        ge=0,
        description="Restarts after a failure (a worker, the driver or the Ray cluster lost), "
        "counted together, each resuming from the latest checkpoint; preemptions do not count.",
    )
    activeDeadlineSeconds: int | None = Field(
        default=None, ge=1, description="Fail the job after this many seconds."
    )
    image: str = Field(
        default="",
        max_length=IMAGE_MAX_LENGTH,
        description="Trainer image override; empty: the default.",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=ENV_MAX_ITEMS,
        description="Extra environment variables of the training pods (e.g. S3 credentials "
        "valueFrom a Secret).",
    )


class Progress(Model):
    """Training progress reported by the trainer."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    epoch: int = Field(default=0, description="Current epoch (0-based).")
    step: int = Field(default=0, description="Optimizer steps done.")
    totalSteps: int = Field(default=0, description="Optimizer steps planned.")
    trainLoss: float = Field(default=0.0, description="Latest training loss.")
    evalLoss: float | None = Field(default=None, description="Latest evaluation loss.")
    tokensPerSecond: float = Field(default=0.0, description="Training tokens per second.")


class ModelRef(Model):
    """Where the produced model is."""

    uri: str = Field(default="", description="URI of the exported model.")
    adapter: bool = Field(
        default=False,
        description="true: uri holds a LoRA adapter only (output.mergeLora false), to serve on "
        "baseModel.",
    )
    baseModel: str = Field(
        default="", description="The base model an adapter goes on (the job's baseModel.uri)."
    )


class EvaluationScores(Model):
    """{metric: score} of spec.evaluation, e.g. {exactMatch: 0.41, answer: 0.37}, and the base
    model's under baseline."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, frozen=True)

    baseline: dict[str, float] | None = Field(
        default=None, description="The base model's scores (spec.evaluation.baseline)."
    )


class FineTuneJobStatus(Model):
    """Observed state, written by the operator (or by `llmray finetune` locally)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    phase: Phase = Field(default="Pending", description="Pending, Running, Succeeded, Failed.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Conditions.", json_schema_extra=CONDITIONS_LIST_MAP
    )
    observedGeneration: int = Field(default=0, description="Generation last reconciled.")
    rayJobName: str = Field(default="", description="The RayJob running this job.")
    dashboardURL: str = Field(default="", description="Ray dashboard of the run.")
    startTime: str = Field(default="", description="RFC 3339 start time.")
    completionTime: str = Field(default="", description="RFC 3339 end time.")
    progress: Progress = Field(default_factory=Progress, description="Training progress.")
    latestCheckpoint: str = Field(default="", description="URI of the latest checkpoint.")
    model: ModelRef = Field(default_factory=ModelRef, description="The produced model.")
    evaluation: EvaluationScores | None = Field(
        default=None,
        description="spec.evaluation's scores, {metric: value}, and the baseline's; what an "
        "LLMDeployment's minEvaluation is checked against.",
    )


class FineTuneJob(Model):
    """A fine-tuning run: `kubectl apply` it, or `llmray finetune FILE.yaml` locally."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    apiVersion: Literal["llmray.io/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneJob"] = KIND
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
