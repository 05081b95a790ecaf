"""LR schedule against hand-computed values; global grad norm against a flat reference."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_aligner.config.schema import SchedConfig, SchedulerName
from nemo_aligner.engines.torch_native.optim import global_grad_norm
from nemo_aligner.utils.lr_schedule import lr_at


def test_cosine_with_warmup_and_constant_hold() -> None:
    sched = SchedConfig(name=SchedulerName.CosineAnnealing, warmup_steps=4, constant_steps=2, min_lr=1e-5)
    lr = lambda step: lr_at(step, lr=1e-3, sched=sched, max_steps=16)  # noqa: E731
    assert [lr(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lr(4) == lr(5) == pytest.approx(1e-3)  # held for constant_steps
    assert lr(6) == pytest.approx(1e-3)  # decay starts here: cos(0)
    assert lr(11) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert lr(16) == pytest.approx(1e-5) and lr(40) == pytest.approx(1e-5)  # floor at and after max_steps


def test_constant_schedule_keeps_lr_after_warmup() -> None:
    sched = SchedConfig(name=SchedulerName.Constant, warmup_steps=2, min_lr=0.0)
    assert [lr_at(s, lr=0.1, sched=sched, max_steps=5) for s in range(6)] == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_global_grad_norm_of_plain_tensors() -> None:
    params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(2))]
    grads = [torch.randn(3, 4), torch.randn(5), None]
    for p, g in zip(params, grads):
        p.grad = g
    flat = torch.cat([g.flatten() for g in grads if g is not None])
    assert global_grad_norm(params).item() == pytest.approx(flat.norm().item(), rel=1e-6)


@pytest.mark.parametrize("max_norm", [0.0, 0.5, 100.0])
def test_clip_grads_matches_torch_clip_grad_norm(max_norm: float) -> None:
    """min(1, max / norm) on the device: torch's clipping when it engages, the gradients untouched when the
    norm is below the bound or clipping is off."""
    from nemo_aligner.engines.torch_native.optim import clip_grads_

    gen = torch.Generator().manual_seed(1)
    ours, reference = ([torch.nn.Parameter(torch.zeros(n)) for n in (3, 7)] for _ in range(2))
    for a, b in zip(ours, reference):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    before = [p.grad.clone() for p in ours]
    clip_grads_(ours, global_grad_norm(ours), max_norm)
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(reference, max_norm)
    for a, b, original in zip(ours, reference, before):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        if max_norm != 0.5:
            assert torch.equal(a.grad, original)
