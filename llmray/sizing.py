"""Memory sizing: the one place for what a FineTuneJob needs, per worker and for rank 0.

`plan(spec, shape)` predicts each worker's peak host RAM and accelerator memory in the three
phases of a run (load, train, export), split into weights, gradients, optimizer states,
activations and buffers, and says whether the job fits `resourcesPerWorker.memory` and
`rank0.memory`. Pure (no torch, no I/O): `llmray plan`, `llmray validate` and the operator call
it; the trainer renders DeepSpeed's config from the same facts (`zero_tuning`).

Model states per worker, P parameters, T of them trained, W workers, weights of w bytes (2 for
bf16 / fp16 under DeepSpeed, else 4: DDP trains fp32 weights under autocast):

    ddp        weights w*P, gradients 4*T + 4*T (DDP's all-reduce buckets), Adam 8*T
    ZeRO-1/2   weights w*P, gradients w*T/W, fp32 master + gradients + Adam 16*T/W
    ZeRO-3     weights w*P/W, fp32 master + gradients + Adam 16*T/W, and the gathered
               parameters: 2*w*(largest module) plus the live-parameter / prefetch limits,
               plus a gradient partition w*T/W (buffers: the estimator leaves it out)

which for bf16 are DeepSpeed's own estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`: 2P + 18P/W and 4L + 18P/W; tests/test_plan.py holds
them equal). Offload moves the optimizer states (and ZeRO-3's weights) from the accelerator to
host RAM; on a CPU both are host RAM. Activations: Korthikanti et al. 2022, s*b*h*(34 + 5*a*s/h)
bytes at 16 bits per layer (one layer plus every layer's input with gradient checkpointing),
plus the fp32 logits. Export (rank 0): the training state still held, plus one gathered module
and one output shard (EXPORT_SHARD_BYTES): the final model is streamed, never held whole.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from llmray.api.finetunejob import FineTuneJobSpec, ZeroTuning
from llmray.api.quantity import parse_quantity
from llmray.model_shape import ModelShape

GIB = 2**30
# Bytes per weight of each precision.
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_BYTES = 8  # two fp32 moments per trained parameter
# DeepSpeed's per-trained-parameter fp32 state: master copy 4 + gradient 4 + Adam 8.
ZERO_FP32_STATE_BYTES = 16
# The final model is written as safetensors shards of at most this size; rank 0 holds one.
EXPORT_SHARD_BYTES = 1 * GIB
# A training worker before the model: Python, torch, Ray Train, transformers, DeepSpeed
# (measured on CPU: benchmarks/train_memory.py, BENCHMARKS.md). Accelerators add their
# runtime's host memory (CUDA context, kernels).
RUNTIME_HOST_BYTES = {"cpu": int(0.55 * GIB), "cuda": int(2.5 * GIB), "xpu": int(2.5 * GIB)}
# What the device's own runtime takes of its memory before any tensor (CUDA context).
RUNTIME_ACCELERATOR_BYTES = {"cpu": 0, "cuda": int(0.5 * GIB), "xpu": int(0.5 * GIB)}
# Share of the memory-mapped checkpoint that shows in a process's RSS while the model loads
# under DDP / ZeRO-1/2 (measured: a third, for 134M and 480M fp32 models; BENCHMARKS.md,
# "Training memory"); ZeRO-3's rank 0 touches all of it.
CHECKPOINT_RESIDENT = 1 / 3
# Transient allocator slack on top of the sum of tensors (fragmentation, temporaries).
SLACK = 1.10
# Preemption (a SIGTERM to a worker pod: eviction, a spot node draining): the checkpoint is
# written at the next step boundary, so the pods' terminationGracePeriodSeconds must cover
# finishing the current step and agreeing to stop (PREEMPTION_BASE_SECONDS), then each pod
# writing its share of the checkpoint to the run's storage at CHECKPOINT_WRITE_BYTES_PER_S.
# 100 MiB/s per pod is conservative for an object store or a network volume written by one
# pod (pods write in parallel, each its own files); a slower store needs
# checkpointing.preemptionGracePeriodSeconds.
CHECKPOINT_WRITE_BYTES_PER_S = 100 * 2**20
PREEMPTION_BASE_SECONDS = 60
# The grace when the model's size is unknown (no config.json, no baseModel.parameters).
DEFAULT_PREEMPTION_GRACE_SECONDS = 300


def weights_precision(spec: FineTuneJobSpec) -> str:
    """The dtype the model is loaded and trained in: DeepSpeed keeps 16-bit weights (its fp32
    master copy lives in the optimizer); DDP trains fp32 weights under autocast."""
    precision = spec.hyperparameters.precision
    return precision if spec.strategy.type == "deepspeed" else "fp32"


def zero_tuning(tuning: ZeroTuning | None, hidden_size: int) -> dict[str, int]:
    """ZeRO's buckets and stage-3 limits in elements: the spec's values, else from the hidden
    size h as transformers' DeepSpeed integration does for "auto" (buckets h*h and 0.9*h*h,
    persistence 10*h), and two decoder layers (24*h*h) of live parameters / reuse distance:
    DeepSpeed's own defaults (1e9, 5e8) keep a sub-1B model gathered whole and its gradient
    in one bucket (issue 13's measurement)."""
    t = tuning or ZeroTuning()
    h2 = hidden_size * hidden_size

    def pick(value: int | None, default: float) -> int:
        return int(default if value is None else value)

    return {
        "reduce_bucket_size": pick(t.reduceBucketSize, h2),
        "stage3_prefetch_bucket_size": pick(t.prefetchBucketSize, 0.9 * h2),
        "stage3_param_persistence_threshold": pick(t.paramPersistenceThreshold, 10 * hidden_size),
        "stage3_max_live_parameters": pick(t.maxLiveParameters, 24 * h2),
        "stage3_max_reuse_distance": pick(t.maxReuseDistance, 24 * h2),
    }


def trainable_parameters(spec: FineTuneJobSpec, shape: ModelShape) -> int:
    """T: every parameter for full fine-tuning; LoRA's A and B matrices (rank r on each target
    module), plus whole embeddings and head when special tokens are added (they train)."""
    if spec.method == "full":
        return shape.parameters
    rank = spec.lora.rank if spec.lora else 8
    targets = spec.lora.targetModules if spec.lora else ["q_proj", "v_proj"]
    total = 0
    for name in targets:
        dims = shape.linear(name)
        if dims is not None:
            total += rank * (dims[0] + dims[1]) * max(1, shape.linears_per_layer(name))
    if spec.dataset.specialTokens:
        total += 2 * shape.embedding_parameters
    return total


@dataclass
class Phase:
    """Bytes one worker holds in one phase, by kind."""

    runtime: int = 0
    weights: int = 0
    gradients: int = 0
    optimizerStates: int = 0
    gathered: int = 0  # ZeRO-3: the largest module gathered, weights and gradients
    activations: int = 0
    buffers: int = 0  # ZeRO-3 live / prefetched parameters, gradient buckets, the export shard

    @property
    def model_states(self) -> int:
        """What DeepSpeed's estimators count: weights, gradients, optimizer states, gathered."""
        return self.weights + self.gradients + self.optimizerStates + self.gathered

    @property
    def total(self) -> int:
        return self.runtime + round(SLACK * (self.model_states + self.activations + self.buffers))

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "totalBytes": self.total}


@dataclass
class Worker:
    """Peak host RAM and accelerator memory of one worker, and the phases they come from."""

    host: dict[str, Phase] = field(default_factory=dict)
    accelerator: dict[str, Phase] = field(default_factory=dict)

    @property
    def peak_host(self) -> int:
        return max(p.total for p in self.host.values())

    @property
    def peak_accelerator(self) -> int:
        return max((p.total for p in self.accelerator.values()), default=0)

    def to_json(self) -> dict[str, Any]:
        return {
            "peakHostBytes": self.peak_host,
            "peakAcceleratorBytes": self.peak_accelerator,
            "host": {name: p.to_json() for name, p in self.host.items()},
            "accelerator": {name: p.to_json() for name, p in self.accelerator.items()},
        }


@dataclass
class Plan:
    shape: ModelShape
    trainable: int
    workers: int
    per_worker: Worker
    rank0: Worker
    worker_limit: int | None
    rank0_limit: int | None
    reasons: list[str]
    checkpoint_bytes: int = 0  # the largest share of one checkpoint a single rank writes
    preemption_grace_seconds: int = DEFAULT_PREEMPTION_GRACE_SECONDS

    @property
    def fits(self) -> bool:
        return not [r for r in self.reasons if r.startswith("does not fit")]

    def to_json(self) -> dict[str, Any]:
        s = self.shape
        return {
            "model": {
                "parameters": s.parameters,
                "trainableParameters": self.trainable,
                "hiddenSize": s.hidden_size,
                "layers": s.layers,
                "vocabSize": s.vocab_size,
                "source": s.source,
            },
            "workers": self.workers,
            "perWorker": self.per_worker.to_json(),
            "rank0": self.rank0.to_json(),
            "limits": {
                "workerMemoryBytes": self.worker_limit,
                "rank0MemoryBytes": self.rank0_limit,
            },
            "checkpoint": {
                "largestRankBytes": self.checkpoint_bytes,
                "preemptionGracePeriodSeconds": self.preemption_grace_seconds,
            },
            "fits": self.fits,
            "reasons": list(self.reasons),
        }


def plan(spec: FineTuneJobSpec, shape: ModelShape) -> Plan:
    """The memory plan of `spec` for a model of `shape`."""
    from llmray.hardware import profile

    hw = profile(spec.compute.accelerator, spec.compute.ipex)
    on_cpu = hw.device_type == "cpu"
    world = spec.compute.workers
    strategy = spec.strategy
    stage = strategy.zero_stage()
    P, T = shape.parameters, trainable_parameters(spec, shape)
    w: float = WEIGHT_BYTES[weights_precision(spec)]
    if spec.method == "qlora":
        w = 0.5  # NF4 base weights (bitsandbytes), the adapters in 16 bits
    tune = zero_tuning(strategy.zeroTuning, shape.hidden_size)
    largest = shape.largest_module_parameters

    # --- training: model states ---
    train = Phase(activations=_activations(spec, shape))
    if stage == 0:
        train.weights, train.gradients, train.optimizerStates = int(w * P), 8 * T, ADAM_BYTES * T
    else:
        sharded_weights = stage == 3
        train.weights = int(w * P / world) if sharded_weights else int(w * P)
        train.gradients = 0 if stage == 3 else int(w * T / world)
        train.optimizerStates = ZERO_FP32_STATE_BYTES * T // world
        if stage == 3:
            train.gathered = int(2 * w * largest)
            live = min(P, max(largest, tune["stage3_max_live_parameters"]))
            prefetch = min(P, tune["stage3_prefetch_bucket_size"])
            # + the gradient partition in the weights' dtype, which DeepSpeed's estimator
            # leaves out (measured: BENCHMARKS.md, "Training memory").
            train.buffers = int(w * (live - largest + prefetch) + w * T / world)
        train.buffers += int(4 * min(T, tune["reduce_bucket_size"]))
    host_train, accel_train = _split(train, hw.device_type, strategy, stage)

    # --- load: the model built once, in the weights' dtype, then DeepSpeed's engine ---
    # Two moments, the higher counts: reading the checkpoint (its memory-mapped pages: every
    # rank under DDP / ZeRO-1/2, rank 0 alone under ZeRO-3, which scatters it), and the
    # engine's start (fp32 master partition; ZeRO-3 also its fp32 gradient partition).
    weights = int(w * P / world) if stage == 3 else int(w * P)
    gathered = int(w * largest) if stage == 3 else 0  # one module while its weights arrive
    pages = int(CHECKPOINT_RESIDENT * w * P)
    read = Phase(weights=weights, gathered=gathered, buffers=pages if stage != 3 else 0)
    # ZeRO-3's rank 0 reads every weight to scatter it: the whole checkpoint is resident.
    read0 = Phase(weights=weights, gathered=gathered, buffers=int(w * P) if stage == 3 else pages)
    init = Phase(weights=weights, gathered=gathered)
    if stage:
        init.optimizerStates = (8 if stage == 3 else 4) * T // world
    load, rank0_load = (max(read, init, key=_tensors), max(read0, init, key=_tensors))
    host_load, accel_load = _split(load, hw.device_type, strategy, stage, loading=True)
    host_load0, accel_load0 = _split(rank0_load, hw.device_type, strategy, stage, loading=True)

    # --- export: training state still held; rank 0 also fills one output shard ---
    model_bytes = int(w * P) if spec.method != "qlora" else 4 * P
    adapter_only = spec.method in ("lora", "qlora") and not spec.output.mergeLora
    shard = min(EXPORT_SHARD_BYTES, model_bytes) if not adapter_only else 4 * T
    rebuilt = 4 * P if spec.method == "qlora" and not adapter_only else 0
    # (the 4-bit base is rebuilt in fp32 on rank 0 to merge the adapters into)
    export = Phase(**{**asdict(host_train), "activations": 0})
    # After the last step the gradients are freed (DDP keeps its buckets; ZeRO-3 its
    # partitions, in its optimizer states).
    export.gradients = 4 * T if stage == 0 else 0
    if stage == 3:  # no live / prefetched parameters, no 16-bit gradient partition now
        export.buffers = 0
    export0 = Phase(**asdict(export))
    export0.buffers += shard + rebuilt

    def worker(load_h: Phase, load_a: Phase, exp: Phase) -> Worker:
        runtime_h = RUNTIME_HOST_BYTES[hw.device_type]
        runtime_a = RUNTIME_ACCELERATOR_BYTES[hw.device_type]
        for p in (load_h, host_train, exp):
            p.runtime = runtime_h
        host = {"load": load_h, "train": host_train, "export": exp}
        if on_cpu:
            return Worker(host=host)
        for p in (load_a, accel_train):
            p.runtime = runtime_a
        return Worker(host=host, accelerator={"load": load_a, "train": accel_train})

    per_worker = worker(host_load, accel_load, export)
    rank0 = worker(host_load0, accel_load0, export0)

    res = spec.compute.resourcesPerWorker
    worker_limit = int(parse_quantity(res.memory)) if res.memory is not None else None
    r0 = spec.compute.rank0
    if r0 is None:
        rank0_limit = worker_limit  # rank 0 is one of the workers
    else:  # its own pod: rank0.memory, or (unset) sized from this plan by the operator
        rank0_limit = int(parse_quantity(r0.memory)) if r0.memory is not None else None
    reasons = _verdict(per_worker, rank0, worker_limit, rank0_limit, r0 is not None, on_cpu)
    ckpt = checkpoint_rank_bytes(spec, shape)
    return Plan(
        shape,
        T,
        world,
        per_worker,
        rank0,
        worker_limit,
        rank0_limit,
        reasons,
        checkpoint_bytes=ckpt,
        preemption_grace_seconds=preemption_grace_seconds(spec, ckpt),
    )


def checkpoint_rank_bytes(spec: FineTuneJobSpec, shape: ModelShape) -> int:
    """The most bytes one rank writes for one checkpoint (llmray_trainer/checkpoint.py):

    ddp        rank 0 only: the trained weights in fp32 and their Adam moments, 12*T
    ZeRO-1/2   rank 0: the module's weights w*P (frozen ones too) + its optimizer
               partition 12*T/W (fp32 master and moments); the others the partition
    ZeRO-3     every rank its weight partition w*P/W + its optimizer partition 12*T/W
    """
    strategy = spec.strategy
    world = spec.compute.workers
    P, T = shape.parameters, trainable_parameters(spec, shape)
    w: float = WEIGHT_BYTES[weights_precision(spec)]
    if spec.method == "qlora":
        w = 0.5
    # Per trained parameter: its fp32 weight (DDP) or master copy (ZeRO) and two Adam moments.
    states = (4 + ADAM_BYTES) * T
    if strategy.type != "deepspeed":
        return states
    if strategy.zero_stage() == 3:
        return int((w * P + states) / world)
    return int(w * P + states / world)


def preemption_grace_seconds(spec: FineTuneJobSpec, checkpoint_bytes: int | None) -> int:
    """terminationGracePeriodSeconds of the training pods: the spec's
    checkpointing.preemptionGracePeriodSeconds, else the time to finish a step and write the
    largest rank's checkpoint share (None: size unknown, DEFAULT_PREEMPTION_GRACE_SECONDS)."""
    override = spec.checkpointing.preemptionGracePeriodSeconds
    if override is not None:
        return override
    if checkpoint_bytes is None:
        return DEFAULT_PREEMPTION_GRACE_SECONDS
    return PREEMPTION_BASE_SECONDS + math.ceil(checkpoint_bytes / CHECKPOINT_WRITE_BYTES_PER_S)


def _tensors(phase: Phase) -> int:
    return phase.model_states + phase.activations + phase.buffers


def _split(
    phase: Phase, device: str, strategy: Any, stage: int, *, loading: bool = False
) -> tuple[Phase, Phase]:
    """(host part, accelerator part) of a phase: on a CPU all of it is host memory."""
    if device == "cpu":
        return phase, Phase()
    host, accel = Phase(), Phase(**asdict(phase))
    if loading:
        # The checkpoint is read into host memory first: rank 0's memory-mapped shards, and
        # under DDP / ZeRO-1/2 the whole model, built on the CPU before it moves to the device.
        host.buffers, accel.buffers = accel.buffers, 0
        if stage != 3:
            host.weights = accel.weights
    if strategy.offloadOptimizer and not loading:
        host.optimizerStates, accel.optimizerStates = accel.optimizerStates, 0
        if stage in (1, 2):  # the fp32 gradient partition is filled on the host
            host.gradients, accel.gradients = accel.gradients, 0
    if strategy.offloadParameters and stage == 3:
        host.weights, accel.weights = accel.weights, 0
    return host, accel


def _activations(spec: FineTuneJobSpec, shape: ModelShape) -> int:
    hp = spec.hyperparameters
    b, s, h = hp.batchSizePerWorker, spec.dataset.maxSeqLength, shape.hidden_size
    scale = 1 if hp.precision != "fp32" else 2  # the formula counts 16-bit activations
    per_layer = s * b * h * (34 + 5 * shape.heads * s / h) * scale
    if hp.gradientCheckpointing:
        layers = shape.layers * s * b * h * 2 * scale + per_layer
    else:
        layers = shape.layers * per_layer
    logits = 3 * 4 * b * s * shape.vocab_size  # fp32 logits, their softmax and its gradient
    return int(layers + logits)


def _verdict(
    worker: Worker,
    rank0: Worker,
    worker_limit: int | None,
    rank0_limit: int | None,
    rank0_group: bool,
    on_cpu: bool,
) -> list[str]:
    reasons = []
    if worker_limit is None:
        reasons.append("spec.compute.resourcesPerWorker.memory is unset: nothing to check against")
    elif worker.peak_host > worker_limit:
        reasons.append(
            f"does not fit: a worker needs {gib(worker.peak_host)} of host memory, "
            f"spec.compute.resourcesPerWorker.memory is {gib(worker_limit)}"
        )
    field = "spec.compute.rank0.memory" if rank0_group else "spec.compute.resourcesPerWorker.memory"
    if rank0_limit is not None and rank0.peak_host > rank0_limit:
        reasons.append(
            f"does not fit: rank 0 needs {gib(rank0.peak_host)} of host memory, "
            f"{field} is {gib(rank0_limit)}"
        )
    if not on_cpu:
        reasons.append(
            "accelerator memory is predicted, not checked: the spec does not say the device's size"
        )
    return reasons


def gib(n: int | float) -> str:
    """Bytes for people: 3.2Gi, or 640Mi under 1 GiB."""
    return f"{n / 2**20:.0f}Mi" if n < GIB else f"{n / GIB:.1f}Gi"


def gib_quantity(n: int) -> str:
    """A memory request of at least n bytes, in whole Gi, e.g. 3.2 GiB -> "4Gi"."""
    return f"{max(1, math.ceil(n / GIB))}Gi"
