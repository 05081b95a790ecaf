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


def _chunk_forward(chunk: torch.Tensor, labels: torch.Tensor, vocab_start_index: int,
                   group: dist.ProcessGroup | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log p(label), row max, log-sum-exp after the max) of one chunk of logits [C, V_local]."""
    local_labels, in_shard = _localize_labels(labels, vocab_start_index, chunk.shape[-1])
    # max is a selection, so taking it before the upcast is exact.
    chunk_max = chunk.max(dim=-1).values.float()
    _all_reduce(chunk_max, dist.ReduceOp.MAX, group)
    sum_exp = _fused(_shifted_sum_exp, chunk)(chunk, chunk_max)
    _all_reduce(sum_exp, dist.ReduceOp.SUM, group)
    target = chunk.gather(1, local_labels[:, None]).squeeze(1).float().masked_fill_(~in_shard, 0.0)
    _all_reduce(target, dist.ReduceOp.SUM, group)
    chunk_lse = sum_exp.log_()
    # Subtracting max before adding the small log-sum lets the large terms cancel first (stable at ~1e4).
    return (target - chunk_max) - chunk_lse, chunk_max, chunk_lse


def _shifted_sum_exp(chunk: torch.Tensor, chunk_max: torch.Tensor) -> torch.Tensor:
    """sum_v exp(x_v - max) per row of [C, V_local], in fp32. Eagerly, the one fp32 [C, V_local] temporary
    lives for this statement; copy=True keeps an fp32 input untouched by the in-place ops."""
    return chunk.to(torch.float32, copy=True).sub_(chunk_max[:, None]).exp_().sum(dim=-1)


def _softmax_grad(chunk: torch.Tensor, local_labels: torch.Tensor, in_shard: torch.Tensor, row_max: torch.Tensor,
                  shifted_lse: torch.Tensor, grad_output: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """grad_output x (onehot(label) - softmax(x)) for [C, V_local], computed in fp32 (eagerly in one fp32
    temporary), returned in out_dtype."""
    grad = chunk.to(torch.float32, copy=True)
    grad.sub_(row_max[:, None]).sub_(shifted_lse[:, None]).exp_().neg_()
    grad.scatter_add_(1, local_labels[:, None], in_shard[:, None].to(grad.dtype))
    return grad.mul_(grad_output[:, None]).to(out_dtype)


_COMPILED: dict = {}


def _fused(fn, like: torch.Tensor):  # noqa: ANN001, ANN202
    """`fn` compiled into one kernel on CUDA, where the [C, V_local] elementwise passes are memory-bound (one
    read of the logits instead of an fp32 copy and several passes over it); `fn` as is elsewhere. The same
    code either way, so the eager path on CPU is the reference the compiled one is tested against."""
    if like.device.type != "cuda":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def _chunk_grad(chunk: torch.Tensor, labels: torch.Tensor, row_max: torch.Tensor, shifted_lse: torch.Tensor,
                grad_output: torch.Tensor, vocab_start_index: int, out_dtype: torch.dtype) -> torch.Tensor:
    """d(grad_output . log p(label)) / d logits for one chunk [C, V_local], computed in fp32.

    No collective: d logp / d x_v = onehot_v - exp(x_v - logsumexp), and the logsumexp saved in the
    forward is already global, so each rank's shard of the gradient is exact using only its own logits.
    The per-token logsumexp is kept as row_max + shifted_lse: subtracting row_max first stays exact for
    huge logits, where one rounded logsumexp would not.
    """
    local_labels, in_shard = _localize_labels(labels, vocab_start_index, chunk.shape[-1])
    return _fused(_softmax_grad, chunk)(chunk, local_labels, in_shard, row_max, shifted_lse, grad_output, out_dtype)


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
        stats = [_chunk_forward(logits[start:start + chunk_size], labels[start:start + chunk_size], vocab_start_index, group)
                 for start in range(0, logits.shape[0], chunk_size)]
        logprobs, row_max, shifted_lse = (torch.cat(part) for part in zip(*stats))
        ctx.save_for_backward(logits, labels, row_max, shifted_lse)
        ctx.vocab_start_index = vocab_start_index
        ctx.chunk_size = chunk_size
        return logprobs

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, None, None, None, None]:
        logits, labels, row_max, shifted_lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        # The output (and so grad_output) is replicated across the TP group, as the forward all-reduces it.
        for start in range(0, logits.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            grad_logits[start:end] = _chunk_grad(logits[start:end], labels[start:end], row_max[start:end],
                                                 shifted_lse[start:end], grad_output[start:end], ctx.vocab_start_index,
                                                 logits.dtype)
        return grad_logits, None, None, None, None


class _LinearVocabParallelLogprobs(torch.autograd.Function):
    """log p(label) from hidden states and the (vocab-sharded) output projection: [N, H] x [V_local, H] x [N]
    -> [N] fp32, one chunk of logits at a time in the forward and again in the backward (recomputed), so
    no [N, V] tensor is ever kept: memory is O(chunk x V_local) whatever N is."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        group: dist.ProcessGroup | None,
        vocab_start_index: int,
        chunk_size: int,
    ) -> torch.Tensor:
        stats = [_chunk_forward(hidden[start:start + chunk_size] @ weight.T, labels[start:start + chunk_size],
                                vocab_start_index, group)
                 for start in range(0, hidden.shape[0], chunk_size)]
        logprobs, row_max, shifted_lse = (torch.cat(part) for part in zip(*stats))
        ctx.save_for_backward(hidden, weight, labels, row_max, shifted_lse)
        ctx.group, ctx.vocab_start_index, ctx.chunk_size = group, vocab_start_index, chunk_size
        return logprobs

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, None, None, None, None]:
        hidden, weight, labels, row_max, shifted_lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            grad = _chunk_grad(hidden[start:end] @ weight.T, labels[start:end], row_max[start:end], shifted_lse[start:end],
                               grad_output[start:end], ctx.vocab_start_index, weight.dtype)
            grad_hidden[start:end] = grad @ weight
            grad_weight.add_(grad.T @ hidden[start:end])  # the matmul in the compute dtype, the sum in fp32
            del grad
        # Each rank's vocab shard contributes part of d/d hidden; the hidden states are replicated.
        _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.group)
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


def _sharding_group(tp_group: dist.ProcessGroup | None, chunk_size: int) -> dist.ProcessGroup | None:
    """The group the vocab is sharded over (None when not sharded), after checking chunk_size."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None


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
    group = _sharding_group(tp_group, chunk_size)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    logprobs = _VocabParallelLogprobs.apply(flat_logits, flat_labels, group, vocab_start_index, chunk_size)
    return logprobs.view(labels.shape)


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, *, tp_group: dist.ProcessGroup | None,
                        vocab_start_index: int, chunk_size: int) -> torch.Tensor:
    """[B, T-1] log p(input_ids[:, t+1]) from the logits [B, T, V_local] of every position (vocab possibly
    sharded, as logprobs_from_logits). All T positions are scored, the last against a dummy label and then
    dropped: slicing the logits to T-1 positions instead would copy the whole [B, T, V] tensor."""
    labels = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return logprobs_from_logits(logits, labels, tp_group=tp_group, vocab_start_index=vocab_start_index,
                                chunk_size=chunk_size)[:, :-1]


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """log p(label) under softmax(hidden @ weight.T), never holding more than one chunk of logits.

    The matmul runs in the inputs' dtype (bf16 under mixed precision), the log-sum-exp in fp32; the
    backward recomputes each chunk's logits instead of saving them.

    Args:
        hidden: [N, H] final hidden states of the positions to score (e.g. response tokens only).
        weight: [V_local, H] this rank's rows of the output projection (lm_head).
        labels: [N] int64 token ids in the global vocab.
        tp_group: group over which the vocab dim is sharded; None (or size 1) means not sharded. The
            hidden states must be the same on every rank of it.
        vocab_start_index: first global vocab id of this rank's rows.
        chunk_size: tokens whose logits exist at once.

    Returns:
        [N] fp32 log-probabilities, the same on every rank of ``tp_group``.
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels {tuple(labels.shape)} "
                         "must be [N, H], [V_local, H] and [N]")
    group = _sharding_group(tp_group, chunk_size)
    return _LinearVocabParallelLogprobs.apply(hidden, weight, labels, group, vocab_start_index, chunk_size)


def scored_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    *,
    scored_index: torch.Tensor | None = None,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start_index: int = 0,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """[B, T-1] fp32 log p(input_ids[:, t+1]) at the `targets` [B, T-1] positions, 0 elsewhere, from the
    hidden states [B, T-1, H] that predict them: only the scored rows meet the output projection
    (linear_logprobs), so prompts cost no output-layer work. `scored_index` (types.with_scored_index)
    names those rows without the device-to-host wait that finding them in `targets` costs."""
    index = scored_index if scored_index is not None else targets.reshape(-1).nonzero().squeeze(1)
    scored = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]).index_select(0, index), weight,
                             input_ids[:, 1:].reshape(-1).index_select(0, index), tp_group=tp_group,
                             vocab_start_index=vocab_start_index, chunk_size=chunk_size)
    return torch.zeros(targets.numel(), dtype=torch.float32, device=hidden.device).index_copy(
        0, index, scored).view(targets.shape)
