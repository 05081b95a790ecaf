"""Per-token log-probs of a training batch from the HF module, at the scored (response) positions only.

For families whose logits are just `lm_head(final hidden state)` the log-probs come from the final
hidden states of the scored positions through linear_logprobs: one chunk of logits at a time, bf16
matmul with fp32 log-sum-exp, vocab-parallel under tensor parallelism, so memory does not grow with
tokens x vocab and prompt positions cost no LM-head work. Other families (e.g. Gemma2, which soft-caps
its logits) score the full logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig

from nemo_aligner.types import Batch, is_packed, packed_row, scored_positions, unpack_logprobs
from nemo_aligner.utils.logprobs import next_token_logprobs, scored_linear_logprobs

# Families whose CausalLM computes logits = lm_head(last hidden state), with nothing after it, and the
# final norm whose output that last hidden state is.
PLAIN_HEAD_FAMILIES = {"llama": "model.norm", "qwen2": "model.norm", "qwen3": "model.norm", "mistral": "model.norm",
                       "gemma": "model.norm", "phi3": "model.norm", "gpt2": "transformer.ln_f"}


def batch_logprobs(module: nn.Module, config: PretrainedConfig, mb: Batch, *, tp_group: dist.ProcessGroup,
                   tp_rank: int, tp_size: int, chunk_size: int) -> torch.Tensor:
    """[B, T-1] fp32 log p(input_ids[:, t+1] | input_ids[:, :t+1]) at scored_positions, 0 elsewhere.

    Right padding never influences real tokens under causal attention, so no padding mask is
    passed: SDPA can take its fused causal kernel. A packed micro-batch (data/packing.py) runs its
    packed row, whose position ids keep attention within each sequence, and is unpacked into its rows.
    The scored positions are gathered through the batch's scored_index when it has one (types.py): a
    boolean mask would make the host wait for the forward to learn how many there are, and so stop it
    from queueing the rest of the step while the device computes.
    """
    if is_packed(mb):
        return unpack_logprobs(batch_logprobs(module, config, packed_row(mb), tp_group=tp_group, tp_rank=tp_rank,
                                              tp_size=tp_size, chunk_size=chunk_size), mb["unpack_index"])
    input_ids, targets = mb["input_ids"], scored_positions(mb)
    inputs = _model_inputs(mb)
    vocab_start = tp_rank * -(-config.vocab_size // tp_size)
    if config.model_type in PLAIN_HEAD_FAMILIES:
        hidden = _last_hidden_state(module, PLAIN_HEAD_FAMILIES[config.model_type], inputs)[:, :-1]
        weight = module.get_output_embeddings().weight  # after the root's forward: the gathered weight
        weight = weight.to_local() if isinstance(weight, DTensor) else weight
        return scored_linear_logprobs(hidden, weight, input_ids, targets, scored_index=mb.get("scored_index"),
                                      tp_group=tp_group, vocab_start_index=vocab_start, chunk_size=chunk_size)
    logits = module(**inputs, use_cache=False).logits
    if isinstance(logits, DTensor):
        logits = logits.to_local()
    return next_token_logprobs(logits, input_ids, tp_group=tp_group, vocab_start_index=vocab_start,
                               chunk_size=chunk_size) * targets


def _model_inputs(mb: Batch) -> dict[str, torch.Tensor | int]:
    """The model's keyword inputs: the ids, and for a packed row its position ids and sequence bounds
    (cu_seq_lens, used by the torch_varlen attention; the packed length bounds every sequence's)."""
    inputs: dict[str, torch.Tensor | int] = {"input_ids": mb["input_ids"]}
    if "cu_seqlens" in mb:
        length = mb["input_ids"].shape[1]
        inputs.update(position_ids=mb["position_ids"], cu_seq_lens_q=mb["cu_seqlens"], cu_seq_lens_k=mb["cu_seqlens"],
                      max_length_q=length, max_length_k=length)
    return inputs


def _last_hidden_state(module: nn.Module, final_norm: str, inputs: dict[str, torch.Tensor | int]) -> torch.Tensor:
    """The final norm's output [B, T, H], taken by a forward hook during a forward that computes one
    position's logits. (transformers' output_hidden_states would install its own hooks on every decoder
    layer, inside each compiled layer, where they break the graph.)"""
    captured: list[torch.Tensor] = []
    handle = module.get_submodule(final_norm).register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        module(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]
