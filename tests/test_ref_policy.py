"""The reference policy: CPU copy of the weights and the swap context manager."""

from __future__ import annotations

import functools

import pytest
import torch

from helpers import FP32, model_cfg, pretrained, right_padded_batch
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.utils.utils import cpu_weight_swap, retrieve_model_state_dict_in_cpu


def _train(model: GPTModel, steps: int) -> None:
    model.setup_optimizer(max_steps=steps)
    for step in range(steps):
        batch = right_padded_batch(4, 9, 48, seed=10 + step)
        model.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum()))
        model.optimizer_step(1.0)


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_swap_gives_reference_logprobs_and_restores_bit_for_bit(llama_dir: str) -> None:
    policy = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    reference = retrieve_model_state_dict_in_cpu(policy)
    assert all(t.device.type == "cpu" for t in reference.values())
    assert "lm_head.weight" not in reference  # tied to the embedding: stored once
    _train(policy, steps=2)
    trained = retrieve_model_state_dict_in_cpu(policy)
    assert not _equal(trained, reference)  # the copy did not follow the training updates

    probe = right_padded_batch(4, 10, 48, seed=99)
    separately_loaded = GPTModel(model_cfg(), pretrained(llama_dir), FP32).get_logprobs(probe)
    trained_logprobs = policy.get_logprobs(probe)
    with cpu_weight_swap(policy, reference):
        torch.testing.assert_close(policy.get_logprobs(probe), separately_loaded, atol=0, rtol=0)
    assert _equal(retrieve_model_state_dict_in_cpu(policy), trained)
    torch.testing.assert_close(policy.get_logprobs(probe), trained_logprobs, atol=0, rtol=0)

    with pytest.raises(RuntimeError, match="boom"):
        with cpu_weight_swap(policy, reference):
            raise RuntimeError("boom")
    assert _equal(retrieve_model_state_dict_in_cpu(policy), trained)


def test_swap_rejects_a_state_dict_of_another_model(llama_dir: str, qwen2_dir: str) -> None:
    llama = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    qwen_state = retrieve_model_state_dict_in_cpu(GPTModel(model_cfg(), pretrained(qwen2_dir), FP32))
    before = retrieve_model_state_dict_in_cpu(llama)
    with pytest.raises(KeyError, match="do not match the model"):
        with cpu_weight_swap(llama, qwen_state):
            pass
    assert _equal(retrieve_model_state_dict_in_cpu(llama), before)


def test_training_after_a_swap_continues_as_if_no_swap_happened(llama_dir: str) -> None:
    """A forward inside the swap leaves FSDP's root gathered; the swap must still restore the
    sharded weights the optimizer updates (otherwise embeddings would train from the reference)."""
    swapped = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    plain = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    reference = retrieve_model_state_dict_in_cpu(swapped)
    probe = right_padded_batch(4, 10, 48, seed=99)
    _train(swapped, steps=2)
    with cpu_weight_swap(swapped, reference):
        swapped.get_logprobs(probe)
    swapped.forward_backward(probe, functools.partial(sft_loss_fn, global_num_tokens=probe["loss_mask"][:, 1:].sum()))
    swapped.optimizer_step(1.0)
    _train(plain, steps=2)
    plain.forward_backward(probe, functools.partial(sft_loss_fn, global_num_tokens=probe["loss_mask"][:, 1:].sum()))
    plain.optimizer_step(1.0)
    assert _equal(retrieve_model_state_dict_in_cpu(swapped), retrieve_model_state_dict_in_cpu(plain))


def test_training_after_generation_continues_as_if_no_generation_happened(llama_dir: str) -> None:
    """generate keeps FSDP units gathered while decoding; afterwards the sharded weights must be
    the only live copy again, so the next training step is the same as without generation."""
    from nemo_aligner.types import LengthParams, SamplingParams

    generated = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    plain = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    _train(generated, steps=1)
    generated.generate(torch.tensor([[1, 5, 9], [0, 1, 7]]), torch.tensor([[1, 1, 1], [0, 1, 1]]),
                       SamplingParams(temperature=1.0), LengthParams(max_length=4))
    _train(plain, steps=1)
    probe = right_padded_batch(4, 10, 48, seed=99)
    for model in (generated, plain):
        model.forward_backward(probe, functools.partial(sft_loss_fn, global_num_tokens=probe["loss_mask"][:, 1:].sum()))
        model.optimizer_step(1.0)
    assert _equal(retrieve_model_state_dict_in_cpu(generated), retrieve_model_state_dict_in_cpu(plain))


def test_streamed_swap_copies_each_weight_once_in_forward_order(llama_dir: str) -> None:
    """The layer-by-layer swap (GPU: each layer's copy overlaps the previous layer's forward) groups the
    weights as a forward needs them: embeddings, final norm and head first, then layer 0, 1, ..."""
    from nemo_aligner.engines.torch_native.fsdp import decoder_layers
    from nemo_aligner.engines.torch_native.weights import forward_order_groups

    module = GPTModel(model_cfg(), pretrained(llama_dir), FP32).engine.module
    names = [name for name, _ in module.named_parameters()]
    groups = forward_order_groups(module, decoder_layers(module), names)
    assert sorted(sum(groups, [])) == sorted(names)  # each weight exactly once
    assert groups[0] == [n for n in names if ".layers." not in n] and "model.embed_tokens.weight" in groups[0]
    assert len(groups) == 3 and all(groups[1 + i] == [n for n in names if f".layers.{i}." in n] for i in range(2))
