"""Per-token log-probabilities of labels from (optionally vocab-parallel) logits, computed in fp32 chunks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp, group: dist.ProcessGroup | None) -> None:
    """All-reduces ``tensor`` in place over ``group``; does nothing when ``group`` is None."""
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)


def _localize_labels(
    labels: torch.Tensor, vocab_start_index: int, local_vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps global label ids onto this rank's shard.

    Args:
        labels: [C] int64 global token ids.
        vocab_start_index: First global id held by this shard.
        local_vocab: Number of ids held by this shard.

    Returns:
        local_labels: [C] ids in ``[0, local_vocab)``; 0 where the label lies outside the shard.
        in_shard: [C] bool, True where the label lies inside the shard.
    """
    local_labels = labels - vocab_start_index
    in_shard = (local_labels >= 0) & (local_labels < local_vocab)
    return local_labels.masked_fill(~in_shard, 0), in_shard


class _VocabParallelLogprobs(torch.autograd.Function):
    """log p(label) from vocab-sharded logits: [N, V_local] x [N] -> [N] fp32 (Megatron-style cross-entropy)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        group: dist.ProcessGroup | None,
        vocab_start_index: int,
        chunk_size: int,
    ) -> torch.Tensor:
        num_tokens, local_vocab = logits.shape
        logprobs = torch.empty(num_tokens, dtype=torch.float32, device=logits.device)
        row_max = torch.empty_like(logprobs)
        shifted_lse = torch.empty_like(logprobs)
        for start in range(0, num_tokens, chunk_size):
            end = start + chunk_size
            chunk = logits[start:end]
            local_labels, in_shard = _localize_labels(labels[start:end], vocab_start_index, local_vocab)

            # max is a selection, so taking it before the upcast is exact.
            chunk_max = chunk.max(dim=-1).values.float()
            _all_reduce(chunk_max, dist.ReduceOp.MAX, group)

            # The only [C, V_local] fp32 temporary, freed at the end of the statement; copy=True keeps an fp32
            # input untouched by the in-place ops.
            sum_exp = chunk.to(torch.float32, copy=True).sub_(chunk_max[:, None]).exp_().sum(dim=-1)
            _all_reduce(sum_exp, dist.ReduceOp.SUM, group)

            target = chunk.gather(1, local_labels[:, None]).squeeze(1).float().masked_fill_(~in_shard, 0.0)
            _all_reduce(target, dist.ReduceOp.SUM, group)

            chunk_lse = sum_exp.log_()
            # Subtracting max before adding the small log-sum lets the large terms cancel first (stable at ~1e4).
            logprobs[start:end] = (target - chunk_max) - chunk_lse
            row_max[start:end] = chunk_max
            shifted_lse[start:end] = chunk_lse

        # The per-token logsumexp is kept as row_max + shifted_lse rather than one sum: the backward then
        # subtracts row_max first, which stays exact for huge logits, instead of a rounded logsumexp.
        ctx.save_for_backward(logits, labels, row_max, shifted_lse)
        ctx.vocab_start_index = vocab_start_index
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None]:
        logits, labels, row_max, shifted_lse = ctx.saved_tensors
        num_tokens, local_vocab = logits.shape
        chunk_size = ctx.chunk_size
        grad_logits = torch.empty_like(logits)
        # No collective here: d logp / d x_v = onehot_v - exp(x_v - logsumexp), and the logsumexp saved in the
        # forward is already global, so each rank's shard of the gradient is exact using only its own logits.
        # The output (and so grad_output) is replicated across the TP group, as the forward all-reduces it.
        for start in range(0, num_tokens, chunk_size):
            end = start + chunk_size
            local_labels, in_shard = _localize_labels(labels[start:end], ctx.vocab_start_index, local_vocab)
            grad = logits[start:end].to(torch.float32, copy=True)
            grad.sub_(row_max[start:end, None]).sub_(shifted_lse[start:end, None]).exp_().neg_()
            grad.scatter_add_(1, local_labels[:, None], in_shard[:, None].to(grad.dtype))
            grad_logits[start:end] = grad.mul_(grad_output[start:end, None])
            del grad  # free this chunk's fp32 temporary before the next one is allocated
        return grad_logits, None, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Returns log p(label) under softmax(logits), with the vocab optionally sharded over a TP group.

    Works chunk by chunk in fp32, so at most one fp32 [chunk_size, V_local] temporary exists at a time; the
    backward saves only the input logits (in their own dtype), the labels and the per-token logsumexp, and
    recomputes the softmax per chunk.

    Args:
        logits: [..., V_local] logits of this rank's vocab shard, any float dtype.
        labels: [...] int64 token ids in the global vocab; every id must lie in some rank's shard (not checked).
        tp_group: Group over which the vocab dim is sharded; None (or a group of size 1) means not sharded.
        vocab_start_index: First global vocab id held in this rank's shard.
        chunk_size: Number of tokens processed at once in fp32.

    Returns:
        [...] fp32 log-probabilities of ``labels``, the same on every rank of ``tp_group``.

    Raises:
        ValueError: If ``labels.shape != logits.shape[:-1]`` or ``chunk_size < 1``.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape {tuple(logits.shape)} without its last dim"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    logprobs = _VocabParallelLogprobs.apply(flat_logits, flat_labels, group, vocab_start_index, chunk_size)
    return logprobs.view(labels.shape)
