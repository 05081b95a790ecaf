"""A loss over micro-batches through megatron-core's schedules: 1F1B across pipeline stages, a plain loop
with one stage; per-token log-probs from the last stage's (vocabulary-parallel) logits."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_aligner.engines.megatron.build import cuda_placements_on_cpu
from nemo_aligner.types import Batch, LossFn, scored_positions
from nemo_aligner.utils.logprobs import next_token_logprobs


def forward_backward(model_chunks: list[torch.nn.Module], micro_batches: Sequence[Batch], loss_fn: LossFn, *,
                     forward_only: bool, tp_group: dist.ProcessGroup | None, vocab_start_index: int,
                     chunk_size: int, loss_multiplier: float = 1.0) -> dict[str, torch.Tensor]:
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
        logits = model(input_ids=mb["input_ids"], position_ids=None, attention_mask=None)

        def loss_func(logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
            logprobs = next_token_logprobs(logits, mb["input_ids"], tp_group=tp_group,
                                           vocab_start_index=vocab_start_index, chunk_size=chunk_size) * scored_positions(mb)
            loss, metrics = loss_fn(logprobs, mb)
            for name, value in {"loss": loss, **metrics}.items():
                value = value.detach().float()
                totals[name] = totals[name] + value if name in totals else value
            # megatron divides by the number of micro-batches; ours is already a share
            return loss * (len(micro_batches) * loss_multiplier), {}

        return logits, loss_func

    with cuda_placements_on_cpu():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                                    model=model_chunks, num_microbatches=len(micro_batches), seq_length=length,
                                    micro_batch_size=rows, forward_only=forward_only)
    return totals


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
