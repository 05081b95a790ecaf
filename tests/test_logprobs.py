"""Tests for logprobs_from_logits against a naive fp64 log_softmax reference, on one process and on TP=2 (gloo)."""

import os
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nemo_aligner.utils.logprobs import linear_logprobs, logprobs_from_logits


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Naive log p(label) in fp64: [..., V] x [...] -> [...]."""
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _make_inputs(shape: tuple[int, ...], vocab: int, *, scale: float = 3.0, offset: float = 0.0, seed: int = 0):
    """Returns seeded fp32 logits [*shape, vocab], int64 labels [*shape] and an upstream grad [*shape]."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=generator) * scale + offset
    labels = torch.randint(0, vocab, shape, generator=generator)
    grad_out = torch.randn(shape, generator=generator)
    return logits, labels, grad_out


def _value_and_grad(fn, logits: torch.Tensor, labels: torch.Tensor, grad_out: torch.Tensor):
    """Returns fn(logits, labels) and d(sum(fn * grad_out)) / d logits."""
    leaf = logits.detach().requires_grad_(True)
    out = fn(leaf, labels)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), leaf.grad


@pytest.mark.parametrize(
    ("shape", "vocab", "chunk_size"),
    [
        ((4, 7), 33, 1024),  # chunk larger than the token count
        ((4, 7), 33, 5),  # 28 tokens, not divisible by the chunk
        ((3, 5), 17, 1),
        ((13,), 8, 4),
        ((2, 3, 4), 50, 7),  # several leading dims
    ],
)
def test_matches_reference_fp32(shape, vocab, chunk_size):
    logits, labels, grad_out = _make_inputs(shape, vocab)
    out, grad = _value_and_grad(partial(logprobs_from_logits, chunk_size=chunk_size), logits, labels, grad_out)
    ref_out, ref_grad = _value_and_grad(_reference, logits.double(), labels, grad_out)

    assert out.shape == shape and out.dtype == torch.float32
    assert grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6)


def test_bf16_input():
    logits, labels, grad_out = _make_inputs((6, 9), 64, seed=1)
    logits = logits.bfloat16()
    out, grad = _value_and_grad(partial(logprobs_from_logits, chunk_size=8), logits, labels, grad_out)
    ref_out, ref_grad = _value_and_grad(_reference, logits.double(), labels, grad_out)

    assert out.dtype == torch.float32
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-2)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("scale", "offset"),
    [
        (1e4, 0.0),  # spread of ~1e4: a near one-hot softmax and log-probs down to ~-1e4
        (3.0, 1e4),  # all logits near 1e4 (exp would overflow), with an ordinary, non-trivial softmax
    ],
)
def test_stable_for_huge_logits(dtype, scale, offset):
    logits, labels, grad_out = _make_inputs((5, 6), 40, scale=scale, offset=offset, seed=2)
    logits = logits.to(dtype)
    labels[0] = logits[0].float().argmax(dim=-1)  # some log-probs near 0, not only very negative ones
    out, grad = _value_and_grad(partial(logprobs_from_logits, chunk_size=4), logits, labels, grad_out)
    ref_out, ref_grad = _value_and_grad(_reference, logits.double(), labels, grad_out)

    assert torch.isfinite(out).all() and torch.isfinite(grad.float()).all()
    # fp32 holds ~7 significant digits, so a log-prob of -1e4 is only known to ~1e-3.
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-6, atol=1e-5)
    grad_atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=grad_atol)


def test_saves_only_input_logits_for_backward():
    logits, labels, _ = _make_inputs((4, 5), 16)
    logits = logits.bfloat16().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logprobs_from_logits(logits, labels, chunk_size=3)

    vocab_sized = [t for t in saved if t.numel() == logits.numel()]
    assert len(vocab_sized) == 1
    assert vocab_sized[0].dtype == torch.bfloat16
    assert vocab_sized[0].data_ptr() == logits.data_ptr()
    assert all(t.numel() <= labels.numel() for t in saved if t is not vocab_sized[0])


def test_bad_shape_raises():
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 3, 10\)"):
        logprobs_from_logits(logits, torch.zeros(2, 4, dtype=torch.long))


def _linear_inputs(tokens: int, hidden: int, vocab: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, hidden, generator=generator), torch.randn(vocab, hidden, generator=generator) * 0.3,
            torch.randint(0, vocab, (tokens,), generator=generator), torch.randn(tokens, generator=generator))


def _linear_value_and_grads(fn, hidden, weight, labels, grad_out):
    """fn(hidden, weight, labels) and the gradients of sum(fn * grad_out) w.r.t. hidden and weight."""
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    out = fn(h, w, labels)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), h.grad, w.grad


def _linear_reference(hidden, weight, labels):
    return _reference(hidden.double() @ weight.double().T, labels)


@pytest.mark.parametrize("chunk_size", [1024, 5, 1])
def test_linear_logprobs_match_full_logits(chunk_size):
    hidden, weight, labels, grad_out = _linear_inputs(13, 8, 29, seed=3)
    out, grad_h, grad_w = _linear_value_and_grads(partial(linear_logprobs, chunk_size=chunk_size), hidden, weight, labels,
                                                  grad_out)
    ref_out, ref_h, ref_w = _linear_value_and_grads(_linear_reference, hidden.double(), weight.double(), labels, grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_h.double(), ref_h, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=0, atol=1e-5)


def test_linear_logprobs_keep_no_vocab_sized_tensor():
    hidden, weight, labels, _ = _linear_inputs(40, 8, 64, seed=4)
    hidden.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        linear_logprobs(hidden, weight, labels, chunk_size=4)
    assert max(t.numel() for t in saved) == max(hidden.numel(), weight.numel())  # no [N, V] logits


# --- TP=2 over gloo: one spawned launch checks every case below. -------------------------------------------

# (name, leading shape, vocab, rank-0 shard size, chunk_size, logit offset)
_TP_CASES = [
    ("even_10", (3, 4), 10, 5, 5, 0.0),
    ("uneven_11", (2, 7), 11, 6, 4, 0.0),
    ("chunk_1", (5,), 16, 8, 1, 0.0),
    ("huge_logits", (4, 3), 12, 6, 1024, 1e4),
]


def _tp_inputs():
    """Builds the full (unsharded) inputs of each TP case; deterministic, so parent and children agree."""
    cases = []
    for seed, (name, shape, vocab, split, chunk_size, offset) in enumerate(_TP_CASES):
        logits, labels, grad_out = _make_inputs(shape, vocab, offset=offset, seed=10 + seed)
        # Force labels into both shards so the masked local gather is exercised on each rank.
        labels.view(-1)[0] = 0
        labels.view(-1)[1] = vocab - 1
        cases.append((name, logits, labels, grad_out, split, chunk_size))
    return cases


def _tp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Runs every TP case on this rank's vocab shard and saves {name: (values, shard grad)} to out_dir."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = {}
        for name, logits, labels, grad_out, split, chunk_size in _tp_inputs():
            bounds = [0, split, logits.shape[-1]]
            shard = logits[..., bounds[rank] : bounds[rank + 1]]
            fn = partial(
                logprobs_from_logits, tp_group=dist.group.WORLD, vocab_start_index=bounds[rank], chunk_size=chunk_size
            )
            results[name] = _value_and_grad(fn, shard, labels, grad_out)
        hidden, weight, labels, grad_out = _linear_inputs(9, 6, 21, seed=5)
        bounds = [0, 10, 21]
        fn = partial(linear_logprobs, tp_group=dist.group.WORLD, vocab_start_index=bounds[rank], chunk_size=4)
        results["linear"] = _linear_value_and_grads(fn, hidden, weight[bounds[rank] : bounds[rank + 1]], labels, grad_out)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    """Returns a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tensor_parallel_matches_single_process(tmp_path):
    world_size = 2
    mp.spawn(_tp_worker, args=(world_size, _free_port(), str(tmp_path)), nprocs=world_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]

    for name, logits, labels, grad_out, _, _ in _tp_inputs():
        ref_out, ref_grad = _value_and_grad(_reference, logits.double(), labels, grad_out)
        # The unsharded implementation is held to the same tolerance as the TP result it is compared with.
        single_out, single_grad = _value_and_grad(logprobs_from_logits, logits, labels, grad_out)
        for rank, results in enumerate(per_rank):
            out, _ = results[name]
            torch.testing.assert_close(out, single_out, rtol=0, atol=1e-6, msg=f"{name}: values on rank {rank}")
            torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5, msg=f"{name}: values vs fp64")
        grad = torch.cat([results[name][1] for results in per_rank], dim=-1)
        torch.testing.assert_close(grad, single_grad, rtol=0, atol=1e-6, msg=f"{name}: gradients")
        torch.testing.assert_close(grad.double(), ref_grad, rtol=0, atol=1e-6, msg=f"{name}: gradients vs fp64")

    hidden, weight, labels, grad_out = _linear_inputs(9, 6, 21, seed=5)
    ref_out, ref_h, ref_w = _linear_value_and_grads(_linear_reference, hidden.double(), weight.double(), labels, grad_out)
    for rank, results in enumerate(per_rank):
        out, grad_h, _ = results["linear"]
        torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5, msg=f"linear: values on rank {rank}")
        torch.testing.assert_close(grad_h.double(), ref_h, rtol=0, atol=1e-5, msg=f"linear: d hidden on rank {rank}")
    grad_w = torch.cat([results["linear"][2] for results in per_rank])
    torch.testing.assert_close(grad_w.double(), ref_w, rtol=0, atol=1e-5, msg="linear: d weight (vocab shards)")


def test_compiled_kernels_equal_eager(monkeypatch):
    """The CUDA path compiles the per-chunk softmax passes; compiled here on CPU, forward and backward of
    linear_logprobs (bf16 and fp32, a ragged last chunk) equal the eager path, and an fp32 input is not mutated."""
    import nemo_aligner.utils.logprobs as logprobs

    compiled = {fn: torch.compile(fn, dynamic=True) for fn in (logprobs._shifted_sum_exp, logprobs._softmax_grad)}
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(23, 16, generator=generator)
    weight = torch.randn(40, 16, generator=generator)
    labels = torch.randint(0, 40, (23,), generator=generator)
    grad_out = torch.randn(23, generator=generator)
    for dtype in (torch.float32, torch.bfloat16):
        results = []
        for fused in (lambda fn, like: fn, lambda fn, like: compiled[fn]):
            monkeypatch.setattr(logprobs, "_fused", fused)
            h, w = (t.to(dtype).clone().requires_grad_(True) for t in (hidden, weight))  # fresh leaves per run
            before = h.detach().clone()
            out = linear_logprobs(h, w, labels, chunk_size=10)
            out.backward(grad_out)
            assert torch.equal(h.detach(), before)
            results.append((out.detach(), h.grad, w.grad))
        for eager, fast in zip(*results):
            assert fast is not None and eager is not None and fast is not eager
            torch.testing.assert_close(fast, eager, rtol=1e-5, atol=1e-5)


def test_scored_linear_logprobs_fill_only_the_scored_targets_and_need_no_index():
    """The response-only head of both engines: each scored target's log-prob under the full logits, 0 at every
    other target; found from the target mask, or given as types' scored_index, the same."""
    from nemo_aligner.types import with_scored_index
    from nemo_aligner.utils.logprobs import scored_linear_logprobs

    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(3, 6, 8, generator=gen), torch.randn(11, 8, generator=gen)
    input_ids = torch.randint(0, 11, (3, 7), generator=gen)
    loss_mask = torch.zeros(3, 7)
    loss_mask[0, 3:], loss_mask[2, 5:] = 1, 1  # row 1 scores nothing
    targets = loss_mask[:, 1:] > 0
    full = torch.log_softmax(hidden @ weight.T, -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    found = scored_linear_logprobs(hidden, weight, input_ids, targets, chunk_size=2)
    torch.testing.assert_close(found, torch.where(targets, full, torch.zeros(())), rtol=1e-5, atol=1e-6)
    index = with_scored_index({"input_ids": input_ids, "attention_mask": torch.ones(3, 7), "loss_mask": loss_mask})
    assert torch.equal(scored_linear_logprobs(hidden, weight, input_ids, targets, scored_index=index["scored_index"],
                                              chunk_size=2), found)
