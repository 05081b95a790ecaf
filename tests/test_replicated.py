"""Replicated data parallel with fp32 masters (engines/torch_native/replicated.py): the optimizer step on
the device, the reference swap without a stash, checkpoints shared with FSDP."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import model_cfg, pretrained, right_padded_batch
from nemo_aligner.config.schema import Precision, TrainerConfig
from nemo_aligner.engines.torch_native.replicated import ReplicatedParameters
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.utils.distributed import init_distributed

BF16 = TrainerConfig(devices=1, precision=Precision.bf16)


def _sft(batch: dict[str, torch.Tensor]) -> functools.partial:
    return functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum())


def _replicated(fused: bool) -> tuple[nn.Module, ReplicatedParameters, torch.optim.AdamW]:
    init_distributed()
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    replicated = ReplicatedParameters(module, dist.group.WORLD, compute_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(replicated.optimizer_parameters(), lr=0.1, fused=fused)
    return module, replicated, optimizer


def _backward(module: nn.Module, replicated: ReplicatedParameters, scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    out = module(torch.randn(4, 6, generator=generator, dtype=torch.bfloat16))
    (out.float().square().sum() * scale).backward()
    replicated.accumulate_gradients()


@pytest.mark.parametrize("max_norm", [0.0, 0.05, 1e9])
def test_fused_step_on_the_device_equals_the_host_checked_step(max_norm: float) -> None:
    """The CUDA path (fused AdamW, clip factor and non-finite skip on the device), run here with the CPU's
    fused AdamW, gives the masters and compute weights of the host-checked foreach path."""
    results = []
    for fused in (False, True):
        module, replicated, optimizer = _replicated(fused)
        _backward(module, replicated, 1.0)
        norm = replicated.step(optimizer, max_norm)
        results.append((norm, [m.detach().clone() for m in replicated.masters]))
        for param, master in zip(replicated.params, replicated.masters):
            assert param.dtype == torch.bfloat16 and torch.equal(param, master.to(torch.bfloat16))
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-6)
    for host_checked, on_device in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(on_device, host_checked, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_a_non_finite_gradient_changes_nothing_and_clears_the_buffers(fused: bool) -> None:
    module, replicated, optimizer = _replicated(fused)
    _backward(module, replicated, 1.0)
    replicated.step(optimizer, 1.0)  # a real step first: state exists
    masters = [m.detach().clone() for m in replicated.masters]
    state = {id(m): {k: v.clone() for k, v in optimizer.state[m].items()} for m in replicated.masters}
    _backward(module, replicated, float("inf"))
    norm = replicated.step(optimizer, 1.0)
    assert not torch.isfinite(norm)
    for master, before in zip(replicated.masters, masters):
        assert torch.equal(master, before)
        for key, value in optimizer.state[master].items():
            assert torch.equal(value, state[id(master)][key]), key
    assert not replicated.flat_grad.any()


def test_gradients_of_several_micro_batches_are_summed_in_fp32() -> None:
    module, replicated, _ = _replicated(False)
    _backward(module, replicated, 1.0)
    once = replicated.flat_grad.clone()
    _backward(module, replicated, 1.0)
    assert replicated.flat_grad.dtype == torch.float32 and torch.equal(replicated.flat_grad, 2 * once)
    assert all(p.grad is None for p in replicated.params)  # the bf16 gradients are freed


def test_reference_swap_rebuilds_the_training_weights_from_the_masters_without_a_stash(llama_dir: str) -> None:
    model = GPTModel(model_cfg(), pretrained(llama_dir), BF16)
    model.setup_optimizer(max_steps=4)
    engine = model.engine
    reference = engine.allocate_weights("host")
    engine.copy_weights_to(reference)
    batch = right_padded_batch(4, 9, 48, seed=3)
    model.forward_backward(batch, _sft(batch))
    model.optimizer_step(1.0)
    masters = [m.detach().clone() for m in engine.replicated.masters]
    trained = {name: p.detach().clone() for name, p in engine.module.named_parameters()}
    with engine.swapped_weights(reference):
        for name, p in engine.module.named_parameters():
            assert torch.equal(p, reference[name]), name
    assert engine._stashes == {}  # the training weights never left for a stash
    for name, p in engine.module.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert all(torch.equal(m, before) for m, before in zip(engine.replicated.masters, masters))


@pytest.mark.parametrize("saved,loaded", [("replicate", "fsdp"), ("fsdp", "replicate")])
def test_checkpoints_move_between_replicated_and_fsdp_sharding(llama_dir: str, tmp_path, saved: str, loaded: str) -> None:
    """The fp32 training weights and AdamW state survive the move exactly: the next step's loss and
    weights are the same as without it."""
    models = {}
    for sharding in (saved, loaded):
        models[sharding] = GPTModel(model_cfg(data_parallel_sharding=sharding), pretrained(llama_dir), BF16)
        models[sharding].setup_optimizer(max_steps=4)
    batch = right_padded_batch(4, 9, 48, seed=4)
    source = models[saved]
    source.forward_backward(batch, _sft(batch))
    source.optimizer_step(1.0)
    source.save(str(tmp_path / "ckpt"))
    target = models[loaded]
    target.load(str(tmp_path / "ckpt"))
    expected, got = _training_weights(source), _training_weights(target)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    losses = [m.forward_backward(batch, _sft(batch))["loss"].item() for m in (source, target)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


def _training_weights(model: GPTModel) -> dict[str, torch.Tensor]:
    """The fp32 weights the optimizer updates: the masters (replicated) or the parameters (FSDP)."""
    engine = model.engine
    pairs = (zip(engine.replicated.names, engine.replicated.masters) if engine.replicated
             else engine.module.named_parameters())
    return {name: (w.full_tensor() if hasattr(w, "full_tensor") else w).detach() for name, w in pairs}
