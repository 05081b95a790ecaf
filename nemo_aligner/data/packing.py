"""Sequence packing: the rows of a right-padded micro-batch laid end to end in one row without padding.

A packed micro-batch keeps its rows (`input_ids`, `attention_mask`, `loss_mask`, ... [B, T]: what the
loss reads) and adds the network's packed input (the layout is in nemo_aligner/types.py): the rows' real
tokens end to end, position ids restarting at every row (transformers then builds a document mask, so
attention keeps each sequence to itself), their loss masks, and the index that unpacks log-probs.

N is the real token count rounded up to a multiple of `multiple_of`, so that a run sees a bounded set of
shapes; the filler is one more sequence (positions 0, 1, ...) that nothing scores. A packed target whose
position id is 0 starts a sequence, so it is never scored: no log-prob crosses a boundary.
"""

from __future__ import annotations

import torch

from nemo_aligner.types import Batch

def pack_micro_batch(mb: Batch, *, pad_token_id: int, multiple_of: int) -> Batch:
    """`mb` (right-padded rows, on the host) with its packed layout added (see the module docstring)."""
    lengths = mb["attention_mask"].sum(dim=1).tolist()
    rows, width = mb["input_ids"].shape
    loss_mask = mb["loss_mask"] if "loss_mask" in mb else mb["attention_mask"]
    real = sum(lengths)
    total = -(-real // multiple_of) * multiple_of
    ids = torch.full((total,), pad_token_id, dtype=mb["input_ids"].dtype)
    positions = torch.arange(total) - real  # the filler's positions: 0, 1, ...
    scored = torch.zeros(total, dtype=loss_mask.dtype)
    unpack = torch.full((rows, width - 1), -1, dtype=torch.long)
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist(), total], dtype=torch.int32)  # the filler last
    offset = 0
    for row, length in enumerate(lengths):
        ids[offset:offset + length] = mb["input_ids"][row, :length]
        positions[offset:offset + length] = torch.arange(length)
        scored[offset:offset + length] = loss_mask[row, :length]
        unpack[row, :max(length - 1, 0)] = torch.arange(offset, offset + max(length - 1, 0))
        offset += length
    return {**mb, "packed_input_ids": ids[None], "packed_position_ids": positions[None], "packed_loss_mask": scored[None],
            "packed_cu_seqlens": bounds, "unpack_index": unpack}
