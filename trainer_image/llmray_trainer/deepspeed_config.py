"""Render DeepSpeed's JSON config from the spec and the model, so users never write one.

Example (strategy {type: deepspeed, zeroStage: 3, offloadOptimizer: true}, precision bf16,
batchSizePerWorker 4, gradientAccumulationSteps 2, 6 workers, hidden size 4096)::

    {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
     "train_batch_size": 48, "gradient_clipping": 1.0, "bf16": {"enabled": true},
     "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", ...},
                           "reduce_bucket_size": 16777216,
                           "stage3_max_live_parameters": 402653184, ...}}

The bucket sizes and stage-3 limits come from `llmray.sizing.zero_tuning` (the plan predicts
memory from the same numbers).
"""

from __future__ import annotations

from typing import Any

from llmray.api.finetunejob import FineTuneJobSpec
from llmray.sizing import zero_tuning


def render_deepspeed_config(
    spec: FineTuneJobSpec, world_size: int, hidden_size: int
) -> dict[str, Any]:
    hp = spec.hyperparameters
    stage = spec.strategy.zero_stage()
    zero: dict[str, Any] = {
        "stage": stage,
        # DeepSpeed's CPU accelerator has no streams (`Stream()` is None, `stream()` a no-op
        # context): on CPU nothing overlaps and the gradient bucket is only doubled. Not
        # measured on GPU, where it could overlap the reduction with the backward pass.
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if spec.strategy.offloadOptimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    tuning = zero_tuning(spec.strategy.zeroTuning, hidden_size)
    zero["reduce_bucket_size"] = tuning["reduce_bucket_size"]
    if stage < 3:
        zero["allgather_bucket_size"] = tuning["reduce_bucket_size"]
    else:
        zero.update({k: v for k, v in tuning.items() if k.startswith("stage3_")})
        # The final model is streamed out module by module (export.py), never consolidated
        # whole: no 16-bit gather on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if spec.strategy.offloadParameters:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": hp.batchSizePerWorker,
        "gradient_accumulation_steps": hp.gradientAccumulationSteps,
        "train_batch_size": hp.batchSizePerWorker * hp.gradientAccumulationSteps * world_size,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        # We pass our own torch AdamW; with offload DeepSpeed would otherwise insist on its
        # CPU Adam op (a C++ build of minutes on first use).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if hp.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif hp.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
