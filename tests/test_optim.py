"""The training optimizer: fused AdamW where torch has the kernel, and its state survives a
checkpoint round trip (issue 19 item 5)."""

from __future__ import annotations

import copy

import pytest
import torch

from llmray_trainer.optim import make_optimizer


def params(dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, dtype=dtype, device=device)) for _ in range(2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_on_cpu(dtype):
    opt = make_optimizer(params(dtype), lr=1e-3, weight_decay=0.1)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["fused"] is True
    assert opt.param_groups[0]["weight_decay"] == 0.1


def test_not_fused_where_torch_has_no_kernel():
    # A meta tensor stands in for an unsupported device; IPEX brings its own fused step.
    assert not make_optimizer(params(device="meta"), lr=1e-3).param_groups[0]["fused"]
    assert not make_optimizer(params(), lr=1e-3, ipex=True).param_groups[0]["fused"]


def step(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter]) -> None:
    for p in ps:
        p.grad = p.detach().clone()
    opt.step()


def test_fused_matches_unfused_and_resumes_from_state_dict():
    fused_ps, plain_ps = params(), params()
    fused = make_optimizer(fused_ps, lr=1e-2, weight_decay=0.1)
    plain = torch.optim.AdamW(plain_ps, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        step(fused, fused_ps)
        step(plain, plain_ps)
    for a, b in zip(fused_ps, plain_ps, strict=True):
        torch.testing.assert_close(a, b)

    # save -> new optimizer on copied parameters -> load: the next step matches continuing.
    state = copy.deepcopy(fused.state_dict())
    resumed_ps = [torch.nn.Parameter(p.detach().clone()) for p in fused_ps]
    resumed = make_optimizer(resumed_ps, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(state)
    step(fused, fused_ps)
    step(resumed, resumed_ps)
    for a, b in zip(fused_ps, resumed_ps, strict=True):
        torch.testing.assert_close(a, b)

    # A checkpoint from before the optimizer was fused still loads (its groups say unfused).
    old_ps = [torch.nn.Parameter(p.detach().clone()) for p in plain_ps]
    old = make_optimizer(old_ps, lr=1e-2, weight_decay=0.1)
    old.load_state_dict(copy.deepcopy(plain.state_dict()))
    step(old, old_ps)
    step(plain, plain_ps)
    for a, b in zip(old_ps, plain_ps, strict=True):
        torch.testing.assert_close(a, b)
