"""Checkpoints: exact resume, atomic save, top-k rotation, Hugging Face export."""

from __future__ import annotations

import functools
import json
import os
from unittest.mock import Mock

import pytest
import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import FP32, model_cfg, pretrained, right_padded_batch
from nemo_aligner.config.schema import Precision, TrainerConfig
from nemo_aligner.engines.torch_native import checkpoint as engine_checkpoint
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.utils.checkpoint import CheckpointManager


def _policy(path: str, max_steps: int = 6, trainer: TrainerConfig = FP32, sharding: str = "auto") -> GPTModel:
    model = GPTModel(model_cfg(data_parallel_sharding=sharding), pretrained(path), trainer)
    model.setup_optimizer(max_steps=max_steps)
    return model


def _steps(model: GPTModel, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        batch = right_padded_batch(4, 9, 48, seed=step)
        loss = model.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum()))["loss"]
        model.optimizer_step(1.0)
        losses.append(loss.item())
    return losses


def _manager(tmp_path, k: int = 2) -> CheckpointManager:
    return CheckpointManager(str(tmp_path / "checkpoints"), save_top_k=k, monitor="val_loss", mode="min")


@pytest.mark.parametrize("precision,sharding", [("fp32", "replicate"), ("bf16", "replicate"), ("bf16", "fsdp")])
def test_resume_gives_the_same_losses_and_rng(llama_dir: str, tmp_path, precision: str, sharding: str) -> None:
    """Bit for bit, also with bf16 weights whose fp32 masters live in the optimizer."""
    trainer = TrainerConfig(devices=1, precision=Precision(precision))
    model = _policy(llama_dir, trainer=trainer, sharding=sharding)
    _steps(model, 0, 2)
    path = _manager(tmp_path).save(2, model, {"policy": model}, {"consumed_samples": 8, "epoch": 0})
    expected_rng = torch.rand(3)
    uninterrupted = _steps(model, 2, 5)

    resumed = _policy(llama_dir, trainer=trainer, sharding=sharding)
    state = _manager(tmp_path).load(_manager(tmp_path).latest(), resumed, {"policy": resumed})
    assert state["step"] == 2 and state["consumed_samples"] == 8 and path.endswith("step_2")
    assert torch.equal(torch.rand(3), expected_rng)
    assert resumed.engine.scheduler.last_epoch == 2
    assert _steps(resumed, 2, 5) == uninterrupted


@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_consecutive_asynchronous_saves_reuse_their_host_buffers_and_each_holds_its_step(llama_dir: str, tmp_path,
                                                                                         sharding: str) -> None:
    """Two asynchronous saves with training between them, the second started at once: it waits for the first
    write before staging into the same host buffers, and each checkpoint resumes to its own step's losses.
    The stager is closed after the first save, as torch 2.11's async_save does to the stager it is given."""
    model = _policy(llama_dir, sharding=sharding)
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    _steps(model, 0, 1)
    writes = [model.save(first, asynchronous=True)]
    stager = model.engine._checkpoint_stager
    stager.close()
    buffers = [t.untyped_storage().data_ptr() for t in _tensors(stager.staged)]
    waited = []
    model.engine._async_write = Mock(wraps=writes[0], result=lambda: waited.append(1) or writes[0].result())
    after_first = _steps(model, 1, 3)
    writes.append(model.save(second, asynchronous=True))
    assert model.engine._checkpoint_stager is stager and waited == [1]  # the second staged after the first write
    assert [t.untyped_storage().data_ptr() for t in _tensors(stager.staged)] == buffers and buffers
    after_second = _steps(model, 3, 5)
    writes[1].result()
    for path, start, expected in ((first, 1, after_first), (second, 3, after_second)):
        resumed = _policy(llama_dir, sharding=sharding)
        resumed.load(path)
        resumed.engine.scheduler.last_epoch = start  # the LR schedule's position (the trainer state's job)
        assert _steps(resumed, start, start + 2) == expected


def _tensors(state: object) -> list[torch.Tensor]:
    """The tensors of a nested state dict, depth first (a DTensor's local shard for a DTensor)."""
    if isinstance(state, torch.Tensor):
        return [state.to_local() if isinstance(state, DTensor) else state]
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [t for value in values for t in _tensors(value)]


def test_interrupted_save_leaves_previous_checkpoint_latest(llama_dir: str, tmp_path, monkeypatch) -> None:
    model = _policy(llama_dir)
    manager = _manager(tmp_path)
    manager.save(1, model, {"policy": model}, {"consumed_samples": 4})

    def crash_midway(path: str) -> None:
        os.makedirs(path)
        open(os.path.join(path, "__0_0.distcp"), "w").close()  # a partial shard, then the job dies
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(model, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, model, {"policy": model}, {"consumed_samples": 8})
    assert os.path.isdir(tmp_path / "checkpoints" / "step_2.tmp")
    assert manager.latest() == str(tmp_path / "checkpoints" / "step_1")
    fresh = _policy(llama_dir)
    assert manager.load(manager.latest(), fresh, {"policy": fresh})["consumed_samples"] == 4


def test_save_top_k_keeps_the_best_and_the_latest(llama_dir: str, tmp_path) -> None:
    model = _policy(llama_dir)
    manager = _manager(tmp_path, k=2)
    for step, metric in [(1, 0.9), (2, 0.5), (3, 0.7), (4, 0.8), (5, None)]:
        manager.save(step, model, {"policy": model}, {}, metric=metric)
    kept = sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("step_"))
    assert kept == ["step_2", "step_3", "step_5"]  # best two (0.5, 0.7) + the latest
    assert manager.latest().endswith("step_5")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_export_loads_in_transformers_with_identical_logits(family: str, request, tmp_path, monkeypatch) -> None:
    path = request.getfixturevalue(f"{family}_dir")
    model = _policy(path)
    _steps(model, 0, 1)
    monkeypatch.setattr(engine_checkpoint, "MAX_SHARD_BYTES", 40_000)  # force a sharded export with an index
    out = str(tmp_path / "hf")
    model.export_hf(out)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert not os.path.exists(out + ".tmp")
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["architectures"] == [model.engine.architecture]
    names = set()
    for shard in set(json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"].values()):
        with safe_open(os.path.join(out, shard), "pt") as f:
            names |= set(f.keys())
    assert ("lm_head.weight" in names) == (family == "qwen2")  # tied weights are written once

    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert AutoTokenizer.from_pretrained(out).eos_token_id == model.tokenizer.eos_token_id
    batch = right_padded_batch(4, 8, 48, seed=42)
    ids = batch["input_ids"]
    hf_logprobs = torch.log_softmax(hf(input_ids=ids).logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(model.get_logprobs(batch), hf_logprobs * batch["loss_mask"][:, 1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision,resume_sharding", [("fp32", "replicate"), ("bf16", "fsdp")])
def test_safetensors_checkpoints_resume_exactly_and_their_consolidated_directory_serves(
        llama_dir: str, tmp_path, precision: str, resume_sharding: str) -> None:
    """model_save_format=safetensors: the weights are HF safetensors (full tensors, training dtype), the
    optimizer DCP; a resume (also into the other sharding) continues bit for bit, and save_consolidated's
    directory loads in transformers as is, with the logits of the trained model's own export."""
    trainer = TrainerConfig(devices=1, precision=Precision(precision))
    manager = lambda: CheckpointManager(str(tmp_path / "checkpoints"), save_top_k=2, monitor="val_loss",  # noqa: E731
                                        mode="min", model_save_format="safetensors", save_consolidated=True)
    model = _policy(llama_dir, trainer=trainer)
    _steps(model, 0, 2)
    path = manager().save(2, model, {"policy": model}, {"consumed_samples": 8})
    with safe_open(os.path.join(path, "model", "weights", "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float32}  # the masters, for exact resume
    model.export_hf(str(tmp_path / "export"))
    uninterrupted = _steps(model, 2, 5)

    resumed = _policy(llama_dir, trainer=trainer, sharding=resume_sharding)
    manager().load(manager().latest(), resumed, {"policy": resumed})
    assert _steps(resumed, 2, 5) == uninterrupted

    ids = torch.randint(3, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    served, exported = (AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32) for p in
                        (os.path.join(path, "hf"), str(tmp_path / "export")))
    assert torch.equal(served(input_ids=ids).logits, exported(input_ids=ids).logits)
