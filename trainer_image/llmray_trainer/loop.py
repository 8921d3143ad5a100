"""The per-worker training recipe: setup -> resume -> train -> checkpoint -> export.

Runs inside each Ray Train worker (`TorchTrainer(train_func, ...)`); everything it reads
comes from the `TrainerConfig` in its config dict.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from functools import partial
from typing import Any

import ray
import ray.train
import torch
import torch.distributed as dist

from llmray.api.finetunejob import Progress
from llmray.hardware import Profile, profile
from llmray.trainer_config import TrainerConfig
from llmray_trainer import hardware, preemption
from llmray_trainer.checkpoint import TrainState, checkpoint_uri, restore, save_and_report
from llmray_trainer.data import collate, count_tokens
from llmray_trainer.deepspeed_config import render_deepspeed_config
from llmray_trainer.export import export_model
from llmray_trainer.inputs import load_splits
from llmray_trainer.modeling import (
    build_model,
    hidden_size,
    load_tokenizer,
    register_zero3,
    resolve_base_model,
    weights_dtype,
)
from llmray_trainer.optim import make_optimizer

log = logging.getLogger("llmray.trainer")

# DDP's 25 MB buckets are sized for GPUs, where each bucket's all-reduce overlaps with the
# rest of the backward pass: kept there. On CPU workers whose cores are all busy computing,
# gloo's thread only takes time from them: fewer, larger all-reduces cost less (measured, 2
# gloo ranks on 2 cores, 14.6M fp32 gradients: 31 ms in one all-reduce, 48 ms in four).
# Gradients as views of the buckets save copying every gradient into its bucket and back.
DDP_KWARGS = {"gradient_as_bucket_view": True}
DDP_CPU_KWARGS = {**DDP_KWARGS, "bucket_cap_mb": 100}


def train_func(config: dict[str, Any]) -> dict[str, int] | None:
    """Returns {"preempted": step} when told to stop (preemption.py): the driver runs it again,
    resuming from the checkpoint of that step; None when the model was exported."""
    started = time.perf_counter()
    cfg = TrainerConfig.model_validate(config["trainer"])
    sink = config.get("progress_sink")
    spec, hp = cfg.spec, cfg.spec.hyperparameters
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    hw = profile(spec.compute.accelerator, spec.compute.ipex)
    hardware.pin_threads(int(cfg.cpus_per_worker))
    hardware.check_method(hw, spec.method)
    if rank == 0:
        check_rank0_node(cfg.rank0_label)
        hardware.check_precision(hw, hp.precision)
    torch.manual_seed(hp.seed)
    stop = preemption.install()  # a SIGTERM from now on stops at the next step boundary

    # --- model, tokenizer, data ---
    import_done = time.perf_counter()
    model_dir = resolve_base_model(cfg)
    tokenizer, added = load_tokenizer(model_dir, spec.dataset.format, spec.dataset.specialTokens)
    ds_config, zero3_registration = None, None
    if spec.strategy.type == "deepspeed":
        ds_config = render_deepspeed_config(spec, world, hidden_size(model_dir))
        if ds_config["zero_optimization"]["stage"] == 3:
            # Built inside zero.Init, partitioned as the weights arrive (kept for the run).
            zero3_registration = register_zero3(ds_config, hw.dist_backend)
    zero3 = zero3_registration is not None
    torch.manual_seed(hp.seed)  # same init of new embeddings / LoRA weights on every run
    model = build_model(cfg, model_dir, tokenizer, added, dtype=weights_dtype(cfg))
    model_done = time.perf_counter()
    train_set, eval_set = load_splits(cfg, tokenizer)
    if rank == 0:
        log.info(
            "worker setup: %.1f s checks, %.1f s model, %.1f s data",
            import_done - started,
            model_done - import_done,
            time.perf_counter() - model_done,
        )
    device = ray.train.torch.get_device()
    if not zero3:  # ZeRO-3's partitions are placed by DeepSpeed
        model.to(device)

    pad_id = tokenizer.pad_token_id
    train_loader = make_loader(
        train_set, hp.batchSizePerWorker, pad_id, rank, world, hp.seed, shuffle=True
    )
    eval_loader = (
        make_loader(eval_set, hp.batchSizePerWorker, pad_id, rank, world, hp.seed, shuffle=False)
        if eval_set
        else None
    )
    accum = hp.gradientAccumulationSteps
    steps_per_epoch = len(train_loader) // accum
    if steps_per_epoch == 0:
        raise ValueError(
            f"spec.dataset.train: {len(train_set)} examples are fewer than one optimizer step "
            f"(batchSizePerWorker {hp.batchSizePerWorker} x gradientAccumulationSteps {accum} "
            f"x workers {world})"
        )
    total_steps = hp.maxSteps or steps_per_epoch * hp.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)

    # --- optimizer, schedule, strategy ---
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(
        params, lr=hp.learningRate, weight_decay=hp.weightDecay, ipex=hw.ipex
    )
    if hw.ipex:
        # IPEX returns new model / optimizer objects: everything after refers to those.
        model, optimizer = hardware.ipex_optimize(
            model, optimizer, hp.precision, deepspeed=spec.strategy.type == "deepspeed"
        )
        params = [p for p in model.parameters() if p.requires_grad]
    scheduler = make_scheduler(
        hp.lrScheduler, optimizer, round(hp.warmupRatio * total_steps), total_steps
    )
    engine = None
    if ds_config is not None:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        model = engine
    else:
        if hp.torchCompile:
            model.compile()  # in place: state-dict keys stay free of `_orig_mod.`
        model = ray.train.torch.prepare_model(
            model,
            move_to_device=False,
            parallel_strategy_kwargs=DDP_CPU_KWARGS if device.type == "cpu" else DDP_KWARGS,
        )

    resumed = restore(model=model, optimizer=optimizer, scheduler=scheduler, engine=engine)
    state = resumed[0] if resumed else TrainState()
    report = ProgressReporter(sink, rank, total_steps)
    # Model, data and optimizer are ready: training starts (the pid: rank 0's process, for
    # whoever watches its memory, e.g. benchmarks/train_memory.py).
    report.event("setup", state, pid=os.getpid())
    if resumed:
        report.event("resumed", state, checkpoint=resumed[1])
        log.info("rank %d resumed from %s at step %d", rank, resumed[1], state.step)

    # --- train ---
    ckpt = spec.checkpointing
    last_saved = state.step if resumed else -1
    persist = partial(
        save_and_report,
        rank=rank,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        engine=engine,
    )

    def save(state: TrainState, reported: dict[str, Any]) -> None:
        persist(state, reported)
        # status.latestCheckpoint: where this checkpoint went (the KubeRay replay found it
        # was only ever reported on a resume).
        uri = checkpoint_uri(cfg.storage_path, cfg.name, state.step)
        report.event("checkpoint", state, checkpoint=uri)

    window = Window()
    model.train()
    stopped = stop.agreed(world, device)  # told during setup (a long model load)
    while not stopped and state.step < total_steps and state.epoch < epochs:
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(state.epoch)
        skip = state.micro_batches_in_epoch
        for i, batch in enumerate(train_loader):
            if i < skip:
                continue  # consumed before the checkpoint we resumed from
            if i >= steps_per_epoch * accum or state.step >= total_steps:
                break
            boundary = (i + 1) % accum == 0
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = forward_backward(model, engine, batch, hw, hp.precision, accum, boundary)
            window.add(loss, count_tokens(batch))
            state.micro_batches_in_epoch = i + 1
            if not boundary:
                continue
            if engine is None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if state.step % hp.logEverySteps == 0 or state.step == total_steps:
                state.train_loss, tokens, tps = window.flush(world)
                state.tokens += tokens
                report.step(state, tps, lr=scheduler.get_last_lr()[0])
            if ckpt.everySteps and state.step % ckpt.everySteps == 0:
                save(state, metrics(state))
                last_saved = state.step
            if stop.agreed(world, device):
                stopped = True
                break
        if stopped:
            break
        if state.micro_batches_in_epoch >= steps_per_epoch * accum:
            state.epoch += 1
            state.micro_batches_in_epoch = 0
            if eval_loader is not None:
                state.eval_loss = evaluate(model, eval_loader, device, hw, hp.precision, world)
                report.step(state, 0.0, event="eval")
            if ckpt.everyEpoch and last_saved != state.step:
                save(state, metrics(state))
                last_saved = state.step

    stop.active = False  # from here a SIGTERM ends the worker (a retry re-exports)
    if stopped:
        if last_saved != state.step:
            save(state, metrics(state))  # every rank: the step the next attempt starts after
        report.event("preempted", state)
        log.info("rank %d stopped at step %d, checkpoint saved", rank, state.step)
        return {"preempted": state.step}
    if eval_loader is not None and state.eval_loss is None:
        state.eval_loss = evaluate(model, eval_loader, device, hw, hp.precision, world)
    if last_saved != state.step:
        save(state, metrics(state))  # the final state: a retry after this only re-exports
    export_model(cfg, model, engine, tokenizer, model_dir, added, rank)
    report.event("exported", state, model=cfg.output_uri)
    del zero3_registration  # the model is done with: transformers may forget the config
    return None


def forward_backward(
    model: Any,
    engine: Any,
    batch: dict[str, torch.Tensor],
    hw: Profile,
    precision: str,
    accum: int,
    boundary: bool,
) -> float:
    if engine is not None:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()  # DeepSpeed accumulates and steps its optimizer at the boundary itself
        return float(loss.detach())
    # DDP: only all-reduce gradients on the micro-batch that ends an accumulation window.
    sync = (
        model.no_sync()
        if (not boundary and hasattr(model, "no_sync"))
        else contextlib.nullcontext()
    )
    with sync:
        with hardware.autocast(hw, precision):
            loss = model(**batch).loss
        (loss / accum).backward()
    return float(loss.detach())


@torch.no_grad()
def evaluate(
    model: Any, loader: Any, device: Any, hw: Profile, precision: str, world: int
) -> float:
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with hardware.autocast(hw, precision):
            loss = model(**batch).loss
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += torch.tensor([float(loss) * n, n], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    return float(total[0] / max(total[1], 1))


class Window:
    """Loss and tokens since the last log line, averaged over all workers."""

    def __init__(self) -> None:
        self.loss_sum, self.count, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int) -> None:
        self.loss_sum += loss
        self.count += 1
        self.tokens += tokens

    def flush(self, world: int) -> tuple[float, int, float]:
        totals = torch.tensor([self.loss_sum, self.count, self.tokens], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(totals)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss = float(totals[0] / max(totals[1], 1))
        tokens = int(totals[2])
        self.__init__()  # type: ignore[misc]
        return loss, tokens, tokens / elapsed


class ProgressReporter:
    """Rank 0 pushes records to the driver's sink; other ranks stay silent."""

    def __init__(self, sink: Any, rank: int, total_steps: int) -> None:
        self.sink = sink if rank == 0 else None
        self.total_steps = total_steps

    def step(self, state: TrainState, tps: float, event: str = "step", **extra: Any) -> None:
        progress = Progress(
            epoch=state.epoch,
            step=state.step,
            totalSteps=self.total_steps,
            trainLoss=state.train_loss,
            evalLoss=state.eval_loss,
            tokensPerSecond=tps,
        )
        self._push({"event": event, **progress.model_dump(), **extra})

    def event(self, event: str, state: TrainState, **extra: Any) -> None:
        self.step(state, 0.0, event=event, **extra)

    def _push(self, record: dict[str, Any]) -> None:
        record["time"] = time.time()
        if self.sink is not None:
            self.sink.push.remote(record)


def metrics(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "epoch": state.epoch,
        "trainLoss": state.train_loss,
        "evalLoss": state.eval_loss,
    }


def make_loader(
    dataset: list[dict[str, list[int]]],
    batch_size: int,
    pad_id: int,
    rank: int,
    world: int,
    seed: int,
    *,
    shuffle: bool,
) -> torch.utils.data.DataLoader:
    from torch.utils.data import DataLoader, DistributedSampler

    # Each worker reads its own shard (no Ray Data): the datasets llmray targets fit in host
    # memory, and a plain sampler keeps resume-at-micro-batch exact.
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=shuffle
    )
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=partial(collate, pad_id=pad_id)
    )


def make_scheduler(name: str, optimizer: Any, warmup: int, total: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def check_rank0_node(label: dict[str, str]) -> None:
    """Rank 0 gathers the full weights: make sure it really landed on the big node."""
    if not label:
        return
    node_labels = ray.get_runtime_context().get_node_labels()
    for key, want in label.items():
        have = node_labels.get(key)
        values = have if isinstance(have, list) else [have]
        if want not in values:
            raise RuntimeError(
                f"rank 0 runs on a Ray node without the label {key}={want} (node labels: "
                f"{node_labels}); it would gather the full model on a node not sized for it. "
                "Check spec.compute.rank0.nodeSelector and the rank-0 worker group."
            )
    context = ray.get_runtime_context()
    log.info("rank 0 runs on Ray node %s, labelled %s", context.get_node_id(), label)
