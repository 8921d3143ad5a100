"""Intel Extension for PyTorch: training with `compute.ipex: true` (its own environment).

IPEX 2.8 needs torch 2.8, so these run in `.venv-ipex` (`make test-ipex`, docs/ipex.md), not
in CI's torch 2.13 environment, where `test_trainer_units` checks the clear error instead.
"""

from __future__ import annotations

import pytest

from tests.test_finetune import assert_loss_falls, assert_model_generates, finetune, write_job

ipex = pytest.importorskip("intel_extension_for_pytorch")
pytestmark = [pytest.mark.ipex, pytest.mark.integration]


def test_ipex_is_the_release_for_this_torch() -> None:
    import torch

    assert ipex.__version__.split(".")[:2] == torch.__version__.split(".")[:2]


@pytest.mark.parametrize(
    ("precision", "strategy"),
    [
        ("fp32", {"type": "ddp"}),
        ("bf16", {"type": "ddp"}),
        ("fp32", {"type": "deepspeed", "zeroStage": 2}),
    ],
    ids=["ddp-fp32", "ddp-bf16", "zero2-fp32"],
)
def test_ipex_training_loss_falls(
    ray_session, tmp_path, tiny_model, small_data, precision, strategy
):
    # bf16 runs emulated (slowly) on CPUs without AMX / AVX-512 BF16: a few steps only.
    job = write_job(
        tmp_path,
        f"ipex-{precision}-{strategy['type']}",
        tiny_model,
        small_data,
        compute={"workers": 2, "ipex": True},
        strategy=strategy,
        hyperparameters={"precision": precision, "maxSteps": 8},
    )
    result = finetune(job)
    assert [r["step"] for r in result.steps] == list(range(1, 9))
    assert_loss_falls(result, factor=0.9)
    assert_model_generates(result.model_uri)


async def test_ipex_serving_engine_generates(tiny_model) -> None:
    from llmray_serve.engine import SamplingParams, collect
    from llmray_serve.hf_engine import TransformersEngine

    engine = TransformersEngine(tiny_model, ipex=True)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0)
    first = await collect(engine.generate("Hello there", greedy))
    again = await collect(engine.generate("Hello there", greedy))
    assert first.text and first.text == again.text
    assert 0 < first.usage.completion_tokens <= 8
