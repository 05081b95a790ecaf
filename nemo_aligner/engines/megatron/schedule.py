"""A loss over micro-batches through megatron-core's schedules: 1F1B across pipeline stages, a plain loop
with one stage; per-token log-probs of the scored positions from the last stage's final hidden states
through the (vocabulary-parallel) output layer."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from nemo_aligner.engines.megatron.build import cuda_placements_on_cpu
from nemo_aligner.types import Batch, LossFn, scored_positions
from nemo_aligner.utils.logprobs import scored_linear_logprobs


def forward_backward(model_chunks: list[torch.nn.Module], micro_batches: Sequence[Batch], loss_fn: LossFn, *,
                     forward_only: bool, tp_group: dist.ProcessGroup | None, vocab_start_index: int,
                     chunk_size: int, loss_multiplier: float = 1.0,
                     sequence_parallel: bool = False) -> dict[str, torch.Tensor]:
    """Run `loss_fn` (types.LossFn: a micro-batch's share of the global loss) on each micro-batch's per-token
    log-probs [rows, T-1] (0 where not scored) and, unless `forward_only`, backpropagate it (times
    `loss_multiplier`: e.g. the data-parallel size where the gradient reduction averages) into the
    parameters' gradients. Returns the loss and metric sums over the micro-batches on the last pipeline
    stage, {} on the others. Micro-batches must share one shape (pipeline sends are sized once)."""
    shapes = {tuple(mb["input_ids"].shape) for mb in micro_batches}
    if len(shapes) != 1:
        raise ValueError(f"megatron's schedules need micro-batches of one shape, got {sorted(shapes)}")
    rows, length = shapes.pop()
    totals: dict[str, torch.Tensor] = {}

    def forward_step(batches, model):  # noqa: ANN001, ANN202 (megatron's forward_step_func)
        mb = next(batches)
        gpt = model.module if hasattr(model, "module") else model  # megatron's DDP wraps the GPTModel
        last_stage = gpt.post_process
        gpt.post_process = False  # the last stage returns its final hidden states, not every position's logits
        try:
            hidden = model(input_ids=mb["input_ids"], position_ids=None, attention_mask=None)
        finally:
            gpt.post_process = last_stage

        def loss_func(hidden: torch.Tensor) -> tuple[torch.Tensor, dict]:
            logprobs = _scored_logprobs(gpt, hidden, mb, tp_group=tp_group, vocab_start_index=vocab_start_index,
                                        chunk_size=chunk_size, sequence_parallel=sequence_parallel)
            loss, metrics = loss_fn(logprobs, mb)
            for name, value in {"loss": loss, **metrics}.items():
                value = value.detach().float()
                totals[name] = totals[name] + value if name in totals else value
            # megatron divides by the number of micro-batches; ours is already a share
            return loss * (len(micro_batches) * loss_multiplier), {}

        return hidden, loss_func

    with cuda_placements_on_cpu():
        # an interleaved (virtual) pipeline runs every micro-batch through each chunk: an iterator per chunk
        batches = [iter(micro_batches) for _ in model_chunks] if len(model_chunks) > 1 else iter(micro_batches)
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=batches,
                                    model=model_chunks, num_microbatches=len(micro_batches), seq_length=length,
                                    micro_batch_size=rows, forward_only=forward_only)
    return totals


def _scored_logprobs(gpt: torch.nn.Module, hidden: torch.Tensor, mb: Batch, *, tp_group: dist.ProcessGroup | None,
                     vocab_start_index: int, chunk_size: int, sequence_parallel: bool) -> torch.Tensor:
    """[B, T-1] fp32 log-probs at the scored positions (0 elsewhere) from the last stage's final hidden
    states [T(/tp), B, H]: only the scored positions go through the (vocabulary-parallel) output layer, a
    chunk of logits at a time (utils.logprobs.linear_logprobs), so prompts cost no output-layer work and
    memory does not grow with tokens x vocabulary. Under sequence parallelism the sequence is gathered
    first (its backward keeps this rank's share of a gradient linear_logprobs has already summed)."""
    if sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    weight = (gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights
              else gpt.output_layer.weight)
    # [B, T-1, H]: the state that predicts each next token
    return scored_linear_logprobs(hidden.transpose(0, 1)[:, :-1], weight, mb["input_ids"], scored_positions(mb),
                                  scored_index=mb.get("scored_index"), tp_group=tp_group,
                                  vocab_start_index=vocab_start_index, chunk_size=chunk_size)


def same_length(micro_batches: Sequence[Batch], pad_token_id: int, multiple: int = 1) -> list[Batch]:
    """The micro-batches right-padded to the longest one's length rounded up to `multiple` (sequence
    parallelism splits the sequence evenly), as megatron's pipeline schedules need; padding is neither
    attended to by the real tokens before it nor scored. A scored_index, which locates targets by the old
    length, is dropped (the log-probs here come from the whole logits)."""
    width = -(-max(mb["input_ids"].shape[1] for mb in micro_batches) // multiple) * multiple
    out = []
    for mb in micro_batches:
        pad = width - mb["input_ids"].shape[1]
        if pad == 0:
            out.append(mb)
            continue
        padded = {}
        for name, value in mb.items():
            if name == "scored_index":
                continue
            if value.dim() == 2 and value.shape[1] == width - pad:
                value = torch.nn.functional.pad(value, (0, pad), value=pad_token_id if name == "input_ids" else 0)
            padded[name] = value
        out.append(padded)
    return out
