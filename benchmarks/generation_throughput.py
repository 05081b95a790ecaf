"""Generation throughput of GPTModel.generate (static KV cache; CUDA-graphed decode step on one GPU)
against transformers' own generate() on the same model and prompts, in one invocation.

    torchrun --nproc_per_node 1 benchmarks/generation_throughput.py --shape qwen2.5-0.5b \
        --batch 64 --prompt-len 256 --new-tokens 256

Every row generates exactly --new-tokens tokens (min_length = max_length, so EOS cannot end a
row early). Prints new tokens/s, time per decode step and the weight-read bandwidth a decode step
implies (bf16 weights read once per step: the memory-bound floor of batched decoding). On one process
it then times transformers' generate() (its default dynamic cache, the same weights, prompts and
sampling settings) and prints the ratio, and compares greedy outputs over --agreement-tokens tokens: the
share of rows whose tokens are identical and the mean share before the first difference. The same
comparison between transformers' greedy tokens for the batch and for its two halves shows the floor that
a randomly initialised model sets: its next-token logits are nearly flat, so in bf16 the order in which
a kernel sums flips near-ties whatever the implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo_throughput import SHAPES, report, sync  # noqa: E402

from nemo_aligner.config.schema import ModelConfig, Precision, PretrainedCheckpointConfig, TrainerConfig  # noqa: E402
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel  # noqa: E402
from nemo_aligner.types import Generations, LengthParams, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--batch", type=int, default=64, help="prompts per generate call on each data-parallel rank")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--greedy", action="store_true", help="greedy instead of temperature-1 sampling")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tokenizer", default="examples/tiny/model", help="only its pad/eos ids are used")
    parser.add_argument("--agreement-tokens", type=int, default=64, help="greedy tokens compared with transformers")
    parser.add_argument("--no-baseline", action="store_true", help="skip transformers' generate()")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // args.tp
    cfg = ModelConfig(micro_batch_size=args.batch, global_batch_size=args.batch * dp, tensor_model_parallel_size=args.tp,
                      encoder_seq_length=args.prompt_len + args.new_tokens)
    policy = GPTModel(cfg, PretrainedCheckpointConfig(restore_from_path=None, model_config=shape, tokenizer_path=args.tokenizer),
                      TrainerConfig(devices=world, precision=Precision(args.precision)))
    gen = torch.Generator().manual_seed(policy.data_parallel.rank)
    prompts = torch.randint(3, shape["vocab_size"], (args.batch, args.prompt_len), generator=gen).to(policy.device)
    mask = torch.ones_like(prompts)
    sampling = SamplingParams(use_greedy=args.greedy)
    length = LengthParams(max_length=args.new_tokens, min_length=args.new_tokens)
    policy.generate(prompts, mask, sampling, length)  # warm-up: compiles and captures the decode step
    if policy.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, elapsed = timed(lambda: policy.generate(prompts, mask, sampling, length), args.repeats)
    assert int(out.response_lengths.min()) == args.new_tokens
    new_tokens = args.batch * args.new_tokens * dp
    weight_bytes = policy.engine.num_parameters() * (2 if args.precision == "bf16" else 4)
    result = {
        "shape": args.shape, "parameters": policy.engine.num_parameters(), "gpus": world, "tp": args.tp,
        "precision": args.precision, "batch_per_rank": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "seconds": elapsed, "new_tokens_per_s": new_tokens / elapsed,
        "ms_per_decode_step": 1000 * elapsed / args.new_tokens,
        "implied_weight_read_GBps": weight_bytes * args.new_tokens / elapsed / 1e9,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if policy.device.type == "cuda" else float("nan"),
        "device": torch.cuda.get_device_name() if policy.device.type == "cuda" else "cpu",
    }
    report(result, args.out)  # ours first: a run stopped during the baseline keeps them
    if world == 1 and not args.no_baseline:
        baseline = transformers_baseline(policy, prompts, mask, args, new_tokens / elapsed)
        report(baseline, None)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**result, **baseline}, f, indent=2)
    dist.destroy_process_group()


def timed(run: Callable[[], Generations], repeats: int) -> tuple[Generations, float]:
    """The last output and the median seconds of `repeats` synchronised runs."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = run()
        sync()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def transformers_baseline(policy: GPTModel, prompts: torch.Tensor, mask: torch.Tensor, args: argparse.Namespace,
                          ours_tokens_per_s: float) -> dict:
    """transformers' generate() on a copy of the same weights (the compute dtype), prompts and sampling
    settings: its new tokens/s, our ratio to it, and the share of rows whose greedy tokens agree."""
    from transformers import AutoModelForCausalLM

    module = policy.engine.module
    hf = AutoModelForCausalLM.from_config(module.config, dtype=next(module.parameters()).dtype).to(policy.device).eval()
    hf.load_state_dict(module.state_dict())
    tokenizer = policy.tokenizer
    common = dict(attention_mask=mask, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        hf.generate(prompts, max_new_tokens=8, min_new_tokens=8, do_sample=not args.greedy, **common)  # warm-up
        _, elapsed = timed(lambda: hf.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                               do_sample=not args.greedy, top_k=0, **common), args.repeats)
        n = args.agreement_tokens
        greedy = lambda ids, attend: hf.generate(ids, attention_mask=attend, max_new_tokens=n,  # noqa: E731
                                                 min_new_tokens=n, do_sample=False, pad_token_id=common["pad_token_id"],
                                                 eos_token_id=common["eos_token_id"])
        theirs = greedy(prompts, mask)
        half = prompts.shape[0] // 2  # the same prompts, two calls of half the batch
        theirs_halves = torch.cat([greedy(prompts[:half], mask[:half]), greedy(prompts[half:], mask[half:])])
    ours = policy.generate(prompts, mask, SamplingParams(use_greedy=True), LengthParams(max_length=n, min_length=n))
    tokens_per_s = prompts.shape[0] * args.new_tokens / elapsed
    return {"transformers_new_tokens_per_s": tokens_per_s, "transformers_ms_per_decode_step": 1000 * elapsed / args.new_tokens,
            "speedup_vs_transformers": ours_tokens_per_s / tokens_per_s,
            "greedy_compared_tokens": n,
            **{f"greedy_{name}_{what}": value for name, other in (("ours", ours.tokens), ("transformers_halves", theirs_halves))
               for what, value in agreement(other[:, prompts.shape[1]:], theirs[:, prompts.shape[1]:]).items()}}


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far greedy `tokens` [B, n] follow `reference`: the share of rows identical throughout, and the
    mean share of tokens before a row's first difference (after it, the two continue different texts)."""
    same = (tokens == reference).long()
    agreed_prefix = same.cumprod(dim=1).sum(dim=1).float() / same.shape[1]
    return {"rows_identical_share": float((agreed_prefix == 1).float().mean()), "prefix_share": float(agreed_prefix.mean())}


if __name__ == "__main__":
    main()
