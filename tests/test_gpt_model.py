"""GPTModel on one process against plain PyTorch / transformers references."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, FP32, accumulated_grads, model_cfg, pretrained, right_padded_batch
from nemo_aligner.config.schema import Precision, PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _reference_logprobs(ref: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = ref(input_ids=ids).logits.double()
    return torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)


def _sft(batch: dict[str, torch.Tensor]) -> functools.partial:
    return functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum())


@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_grads_and_adamw_step_match_plain_pytorch(family: str, sharding: str, family_dir) -> None:
    path = family_dir(family)
    model = GPTModel(model_cfg(data_parallel_sharding=sharding), pretrained(path), FP32)
    model.setup_optimizer(max_steps=10)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = right_padded_batch(4, 11, ref.config.vocab_size, seed=1)

    ref_logprobs = _reference_logprobs(ref, batch["input_ids"])
    scored = batch["loss_mask"][:, 1:].double()  # log-probs are computed where the loss is (0 elsewhere)
    torch.testing.assert_close(model.get_logprobs(batch).double(), ref_logprobs * scored, atol=1e-5, rtol=0)
    every_token = {**batch, "loss_mask": batch["attention_mask"].float()}
    torch.testing.assert_close(model.get_logprobs(every_token).double(), ref_logprobs * every_token["loss_mask"][:, 1:],
                               atol=1e-5, rtol=0)

    metrics = model.forward_backward(batch, _sft(batch))
    mask = batch["loss_mask"][:, 1:]
    ref_loss = -(ref_logprobs.float() * mask).sum() / mask.sum()
    ref_loss.backward()
    assert metrics["loss"].item() == pytest.approx(ref_loss.item(), abs=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, grad in accumulated_grads(model).items():
        torch.testing.assert_close(grad, ref_params[name].grad, atol=1e-6, rtol=1e-4, msg=name)

    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm=0.05)
    grad_norm, lr = model.optimizer_step(max_grad_norm=0.05)
    assert grad_norm == pytest.approx(ref_norm.item(), rel=1e-5) and grad_norm > 0.05  # clipping engaged
    assert lr == pytest.approx(1e-2)
    params = [p for p in ref.parameters()]
    torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                      lr=1e-2, betas=(0.9, 0.98), eps=1e-4).step()
    for name, param in model.engine.module.named_parameters():
        torch.testing.assert_close(_full(param.data), ref_params[name].data, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_accumulation_equals_one_big_micro_batch(llama_dir: str) -> None:
    batch = right_padded_batch(4, 9, 48, seed=2)
    grads = []
    for micro in (1, 4):
        model = GPTModel(model_cfg(micro_batch_size=micro, global_batch_size=4), pretrained(llama_dir), FP32)
        loss = model.forward_backward(batch, _sft(batch))["loss"]
        grads.append((loss, {n: g.clone() for n, g in accumulated_grads(model).items()}))
    assert grads[0][0].item() == pytest.approx(grads[1][0].item(), abs=1e-6)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-6, rtol=1e-5)


def test_nan_loss_raises_before_any_step(llama_dir: str) -> None:
    model = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    model.setup_optimizer(max_steps=2)
    batch = right_padded_batch(4, 8, 48, seed=3)
    nan_loss = functools.partial(sft_loss_fn, global_num_tokens=torch.tensor(float("nan")))
    with pytest.raises(FloatingPointError, match="loss is nan"):
        model.forward_backward(batch, nan_loss)


@pytest.mark.parametrize("precision", [Precision.fp32, Precision.bf16])
def test_optimizer_state_offload_round_trip_is_bit_exact(llama_dir: str, precision: Precision) -> None:
    """bf16 keeps fp32 masters (leaves that require grad) beside the optimizer state: they move too, outside
    autograd, whether or not the caller is under no_grad."""
    model = GPTModel(model_cfg(), pretrained(llama_dir), TrainerConfig(devices=1, num_nodes=1, precision=precision))
    model.setup_optimizer(max_steps=4)
    batch = right_padded_batch(4, 8, 48, seed=4)
    model.forward_backward(batch, _sft(batch))
    model.optimizer_step(1.0)
    states = [v.to_local() if hasattr(v, "to_local") else v for s in model.engine.optimizer.state.values() for v in s.values()]
    if model.engine.replicated:
        states += model.engine.replicated.training_tensors()
    before = [t.clone() for t in states]
    model.engine.offload_optimizer_state()
    freed = [t for t in states if t.dim() > 0]
    assert freed and all(t.untyped_storage().size() == 0 for t in freed)
    model.engine.onload_optimizer_state()
    assert all(torch.equal(a, b) for a, b in zip(before, states))
    model.forward_backward(batch, _sft(batch))
    model.optimizer_step(1.0)  # training goes on with the restored state
    host_buffers = [t.data_ptr() for t in model.engine._offload.host_buffers]
    before = [t.clone() for t in states]
    model.engine.offload_optimizer_state()  # the next offload reuses the host buffers: no new (pinned) allocation
    assert [t.data_ptr() for t in model.engine._offload.host_buffers] == host_buffers
    model.engine.onload_optimizer_state()
    assert all(torch.equal(a, b) for a, b in zip(before, states))


def test_missing_model_directory_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GPTModel(model_cfg(), pretrained(str(tmp_path / "nope")), FP32)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GPTModel(model_cfg(), pretrained(str(tmp_path)), FP32)


def test_tp_size_must_divide_heads(llama_dir: str) -> None:
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=3 must divide num_attention_heads=4.*valid sizes for this model: \[1, 2\]"):
        GPTModel(model_cfg(tensor_model_parallel_size=3), pretrained(llama_dir), FP32)


def test_tensor_parallel_is_refused_for_families_without_a_plan(gpt2_dir: str) -> None:
    with pytest.raises(ValueError, match=r"tensor_model_parallel_size=2 is not supported for model_type 'gpt2'"):
        GPTModel(model_cfg(tensor_model_parallel_size=2), pretrained(gpt2_dir), FP32)


def test_global_batch_must_split_into_micro_batches(llama_dir: str) -> None:
    with pytest.raises(ValueError, match=r"global_batch_size=5 must be a multiple of model.micro_batch_size \(2\)"):
        GPTModel(model_cfg(global_batch_size=5), pretrained(llama_dir), FP32)


def test_left_padded_training_batch_is_rejected(llama_dir: str) -> None:
    model = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    batch = right_padded_batch(4, 8, 48, seed=5)
    batch["attention_mask"] = batch["attention_mask"].flip(-1)
    with pytest.raises(ValueError, match="right-padded"):
        model.get_logprobs(batch)
    with pytest.raises(ValueError, match="right-padded"):  # DPO and SPIN move their batch first: checked there
        model.on_device(batch)


def test_devices_must_match_the_launched_processes(llama_dir: str) -> None:
    from nemo_aligner.config.schema import TrainerConfig

    with pytest.raises(ValueError, match=r"trainer.devices \(2\) x trainer.num_nodes \(1\) = 2, but 1 processes were launched"):
        GPTModel(model_cfg(), pretrained(llama_dir), TrainerConfig(devices=2, precision=FP32.precision))


def test_attention_implementation_is_a_config_choice_with_a_per_family_default(family_dir) -> None:
    defaults = {family: GPTModel(model_cfg(), pretrained(family_dir(family)), FP32).engine.module.config._attn_implementation
                for family in ("llama", "gemma2")}
    # SDPA with grouped decode steps; Gemma2's soft-capped attention has no SDPA path
    assert defaults == {"llama": "sdpa_grouped_decode", "gemma2": "eager"}
    eager = GPTModel(model_cfg(attn_implementation="eager"), pretrained(family_dir("llama")), FP32)
    assert eager.engine.module.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"model_config.attn_implementation is not read; set model.attn_implementation=eager"):
        GPTModel(model_cfg(), PretrainedCheckpointConfig(restore_from_path=None, tokenizer_path=family_dir("llama"),
                                                         model_config={"model_type": "llama", "attn_implementation": "eager"}),
                 FP32)


def _saved_activation_bytes(model: GPTModel, batch: dict[str, torch.Tensor]) -> int:
    """Bytes the autograd graph of one forward keeps for its backward, parameters not counted."""
    params = {p.data_ptr() for p in model.engine.module.parameters()}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_backward(batch, _sft(batch))
    return sum(saved)


@pytest.mark.parametrize("compiled", [False, True])
def test_checkpointed_layers_keep_only_their_inputs_and_change_nothing(llama_dir: str, compiled: bool) -> None:
    """Activation checkpointing (alone or inside each compiled layer's graph) gives the plain loss and
    gradients, keeps a fraction of the activations (fewer with more layers checkpointed), and every
    checkpointed layer shares one compiled graph: a second step of the same shape compiles nothing."""
    import torch._dynamo

    batch = right_padded_batch(4, 11, 48, seed=1)
    results, saved = {}, {}
    for layers in ("none", 1, "all"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        checkpointing = dict(activations_checkpoint_granularity="full",
                             activations_checkpoint_num_layers=None if layers == "all" else layers)
        model = GPTModel(model_cfg(torch_compile=compiled, **({} if layers == "none" else checkpointing)),
                         pretrained(llama_dir), FP32)
        loss = model.forward_backward(batch, _sft(batch))["loss"]
        results[layers] = (loss, {n: g.clone() for n, g in accumulated_grads(model).items()})
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert graphs == (0 if not compiled else 2 if layers == 1 else 1)  # one per distinct layer class
        saved[layers] = _saved_activation_bytes(model, batch)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert saved["all"] < saved[1] < saved["none"]
    assert saved["all"] < 0.5 * saved["none"]
    for layers in (1, "all"):
        assert list(results[layers][1]) == list(results["none"][1])  # parameter names unchanged by the wrappers
        assert results[layers][0].item() == pytest.approx(results["none"][0].item(), abs=1e-6)
        for name, grad in results["none"][1].items():
            torch.testing.assert_close(results[layers][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_pure_bf16_keeps_weights_and_optimizer_state_in_bf16_and_trains(llama_dir: str) -> None:
    from nemo_aligner.config.schema import Precision, TrainerConfig

    batch = right_padded_batch(4, 11, 48, seed=2)
    losses = {}
    for precision in (Precision.bf16, Precision.bf16_pure):
        model = GPTModel(model_cfg(), pretrained(llama_dir), TrainerConfig(devices=1, precision=precision))
        model.setup_optimizer(max_steps=2)
        losses[precision] = [model.forward_backward(batch, _sft(batch))["loss"].item()]
        model.optimizer_step(1.0)
        losses[precision].append(model.forward_backward(batch, _sft(batch))["loss"].item())
        optimizer = model.engine.optimizer
        masters = [p for group in optimizer.param_groups for p in group["params"]]
        states = {v.dtype for s in optimizer.state.values() for v in s.values() if v.dim() > 0}
        expected = torch.bfloat16 if precision is Precision.bf16_pure else torch.float32
        assert {p.dtype for p in masters} == {expected} and states == {expected}, precision
        # the forward computes with bf16 weights in both: under bf16, rounded copies of the fp32 masters
        assert {p.dtype for p in model.engine.module.parameters()} == {torch.bfloat16}
        for param, master in zip(model.engine.replicated.params, model.engine.replicated.masters):
            assert torch.equal(param, master.to(torch.bfloat16))
    assert losses[Precision.bf16_pure][0] == pytest.approx(losses[Precision.bf16][0], abs=2e-2)  # bf16 compute both
    assert losses[Precision.bf16_pure][1] < losses[Precision.bf16_pure][0]  # it trains
