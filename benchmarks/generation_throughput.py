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
a kernel sums flips near-ties whatever the implementation. With --agreement-train-steps N the model is
first trained N steps to continue walks on a random successor map (each token of a 1,024-token subset
has one fixed successor), so that its choices are as confident as a trained model's, and the greedy
comparison runs on prompts of that kind (the training's last loss is reported with it). Periodic rows,
which need attention to continue, left a randomly initialised 0.5B model at the unigram loss after 400
steps; a successor map is learnt in about a hundred, and every step still reads the KV cache, whose
errors would change the hidden states each choice is made from.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo_throughput import SHAPES, report, sync  # noqa: E402

from nemo_aligner.config.schema import ModelConfig, OptimConfig, Precision, PretrainedCheckpointConfig, TrainerConfig  # noqa: E402
from nemo_aligner.losses.sft import sft_loss_fn  # noqa: E402
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
    parser.add_argument("--agreement-train-steps", type=int, default=0,
                        help="before the greedy comparison, train the model this many steps on successor-map walks "
                             "(so that its next-token choices are confident, as a trained model's are) and compare "
                             "on prompts of that kind; 0: the random weights and prompts")
    parser.add_argument("--agreement-lr", type=float, default=5e-4, help="learning rate of that training")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = world // args.tp
    cfg = ModelConfig(micro_batch_size=args.batch, global_batch_size=args.batch * dp, tensor_model_parallel_size=args.tp,
                      encoder_seq_length=args.prompt_len + args.new_tokens, optim=OptimConfig(lr=args.agreement_lr))
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
        hf = hf_copy(policy)
        result.update(transformers_baseline(hf, policy.tokenizer, prompts, mask, args, new_tokens / elapsed))
        if args.agreement_train_steps:
            successor = successor_map(shape["vocab_size"], gen)
            prompts = successor_walks(args.batch, args.prompt_len, successor, gen).to(policy.device)
            result.update(train_on_successor_walks(policy, args.agreement_train_steps, args.prompt_len + args.new_tokens,
                                                   successor, gen))
            hf = hf_copy(policy)  # the trained weights
        result.update(greedy_agreement(policy, hf, prompts, mask, args.agreement_tokens))
        report({k: v for k, v in result.items() if k.startswith(("transformers", "speedup", "greedy", "agreement"))}, None)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
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


def hf_copy(policy: GPTModel):  # noqa: ANN201
    """A transformers model with a copy of the policy's weights (the compute dtype) on its device."""
    from transformers import AutoModelForCausalLM

    module = policy.engine.module
    hf = AutoModelForCausalLM.from_config(module.config, dtype=next(module.parameters()).dtype).to(policy.device).eval()
    hf.load_state_dict(module.state_dict())
    return hf


def transformers_baseline(hf: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: torch.Tensor,
                          mask: torch.Tensor, args: argparse.Namespace, ours_tokens_per_s: float) -> dict:
    """transformers' generate() on `hf` (a copy of our weights) with the same prompts and sampling settings:
    its new tokens/s and our ratio to it."""
    common = dict(attention_mask=mask, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        hf.generate(prompts, max_new_tokens=8, min_new_tokens=8, do_sample=not args.greedy, **common)  # warm-up
        _, elapsed = timed(lambda: hf.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                               do_sample=not args.greedy, top_k=0, **common), args.repeats)
    tokens_per_s = prompts.shape[0] * args.new_tokens / elapsed
    return {"transformers_new_tokens_per_s": tokens_per_s, "transformers_ms_per_decode_step": 1000 * elapsed / args.new_tokens,
            "speedup_vs_transformers": ours_tokens_per_s / tokens_per_s}


def greedy_agreement(policy: GPTModel, hf: torch.nn.Module, prompts: torch.Tensor, mask: torch.Tensor, n: int) -> dict:
    """Our greedy tokens against transformers' greedy generate() on `hf` (a copy of our weights) over `n`
    new tokens (the share of rows identical throughout and the mean share before the first difference),
    and transformers' own tokens for the batch against those for its two halves (the floor that the
    weights' near-ties set)."""
    tokenizer = policy.tokenizer
    greedy = lambda ids, attend: hf.generate(ids, attention_mask=attend, max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                             do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                             eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        theirs = greedy(prompts, mask)
        half = prompts.shape[0] // 2  # the same prompts, two calls of half the batch
        theirs_halves = torch.cat([greedy(prompts[:half], mask[:half]), greedy(prompts[half:], mask[half:])])
    ours = policy.generate(prompts, mask, SamplingParams(use_greedy=True), LengthParams(max_length=n, min_length=n))
    return {"greedy_compared_tokens": n,
            **{f"greedy_{name}_{what}": value for name, other in (("ours", ours.tokens), ("transformers_halves", theirs_halves))
               for what, value in agreement(other[:, prompts.shape[1]:], theirs[:, prompts.shape[1]:]).items()}}


FIRST_TOKEN, WALK_TOKENS = 3, 1024  # the agreement model's training tokens: [3, 3 + 1024) (ids below 3 are special)


def successor_map(vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    """A random permutation of the walk tokens: token FIRST_TOKEN + i is followed by successor[i]."""
    return torch.randperm(min(WALK_TOKENS, vocab_size - FIRST_TOKEN), generator=gen) + FIRST_TOKEN


def successor_walks(rows: int, length: int, successor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """[rows, length] token ids: each row starts at a random walk token and follows the successor map."""
    walks = torch.empty(rows, length, dtype=torch.long)
    walks[:, 0] = torch.randint(len(successor), (rows,), generator=gen) + FIRST_TOKEN
    for position in range(1, length):
        walks[:, position] = successor[walks[:, position - 1] - FIRST_TOKEN]
    return walks


def train_on_successor_walks(policy: GPTModel, steps: int, length: int, successor: torch.Tensor,
                             gen: torch.Generator) -> dict:
    """Train the policy `steps` steps (16 rows each) to continue successor walks, so that its next-token
    choices are confident; returns the last step's loss and exp(−loss), the geometric mean of the
    probability it gives the right token."""
    policy.setup_optimizer(max_steps=steps)
    for _ in range(steps):
        ids = successor_walks(16, length, successor, gen)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
        tokens = torch.tensor(float(16 * (length - 1)))
        loss = policy.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=tokens), micro_batch_size=16)["loss"]
        policy.optimizer_step(1.0)
    nll = float(loss)
    return {"agreement_train_steps": steps, "agreement_train_loss": nll, "agreement_train_token_probability": math.exp(-nll)}


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How far greedy `tokens` [B, n] follow `reference`: the share of rows identical throughout, and the
    mean share of tokens before a row's first difference (after it, the two continue different texts)."""
    same = (tokens == reference).long()
    agreed_prefix = same.cumprod(dim=1).sum(dim=1).float() / same.shape[1]
    return {"rows_identical_share": float((agreed_prefix == 1).float().mean()), "prefix_share": float(agreed_prefix.mean())}


if __name__ == "__main__":
    main()
