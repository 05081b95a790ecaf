"""One SPIN step on a randomly initialised model: the generation of the rejected responses and the training
step, timed apart, so the rollout phase's share of a step shows (issue 13).

    python benchmarks/spin_step.py --shape qwen2.5-0.5b --prompts 64 --prompt-len 256 --response-len 256

Every prompt generates exactly --response-len tokens (min_length = max_length) with the reference weights
(resident), temperature 1; the training step is the SPIN loss on the 64 (actual, generated) pairs in
micro-batches of --micro-pairs. `--compare-eager` repeats it with the decode step run eagerly
(model.torch_compile=false: no CUDA graph) in the same invocation. Median of --steps steps after --warmup
steps, and the warm-up steps' own times: step 0 compiles the layers and captures the decode graph; step 1's
optimizer-state offload pins host buffers for Adam's moments, which first exist after step 0's update
(utils.offload.HostOffload keeps every buffer from then on), which costs seconds on the 0.5B shape once per run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo_throughput import SHAPES, report, sync  # noqa: E402

from nemo_aligner.config.schema import OptimConfig, Precision, PretrainedCheckpointConfig, TrainerConfig  # noqa: E402
from nemo_aligner.config.spin import SPINConfig, SPINModelConfig  # noqa: E402
from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel  # noqa: E402
from nemo_aligner.types import LengthParams, SamplingParams  # noqa: E402


def time_steps(args: argparse.Namespace, compile_layers: bool) -> dict:
    shape = SHAPES[args.shape]
    cfg = SPINModelConfig(micro_batch_size=args.micro_pairs, global_batch_size=args.prompts,
                          encoder_seq_length=args.prompt_len + args.response_len, torch_compile=compile_layers,
                          optim=OptimConfig(lr=1e-6),
                          spin=SPINConfig(ref_policy_kl_penalty=0.1, rollout_micro_batch_size=args.rollout_batch,
                                          sampling_params=SamplingParams(),
                                          length_params=LengthParams(max_length=args.response_len,
                                                                     min_length=args.response_len)))
    policy = GPTSPINModel(cfg, PretrainedCheckpointConfig(restore_from_path=None, model_config=shape,
                                                          tokenizer_path=args.tokenizer),
                          TrainerConfig(devices=1, precision=Precision(args.precision)))
    policy.setup_optimizer(max_steps=args.warmup + args.steps)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, shape["vocab_size"], (args.prompt_len,), generator=gen) for _ in range(args.prompts)]
    actual = [torch.randint(3, shape["vocab_size"], (args.response_len,), generator=gen) for _ in range(args.prompts)]
    generation, training = [], []
    for _ in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        generated = policy.generate_rejected(prompts)
        sync()
        middle = time.perf_counter()
        policy.loss_and_metrics(policy.pair_batch(prompts, actual, generated))
        policy.optimizer_step(1.0)
        sync()
        generation.append(middle - start)
        training.append(time.perf_counter() - middle)
    generation_s, training_s = statistics.median(generation[args.warmup:]), statistics.median(training[args.warmup:])
    return {"warmup_generation_s": generation[:args.warmup], "warmup_training_s": training[:args.warmup],
            "step_s": generation_s + training_s, "generation_s": generation_s, "training_s": training_s,
            "rollout_share": generation_s / (generation_s + training_s),
            "new_tokens_per_s": args.prompts * args.response_len / generation_s, "engine": policy.engine.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--micro-pairs", type=int, default=8)
    parser.add_argument("--rollout-batch", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compare-eager", action="store_true", help="also time it with the decode step eager")
    parser.add_argument("--tokenizer", default="examples/tiny/model", help="only its pad/eos ids are used")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = {"shape": args.shape, "prompts": args.prompts, "prompt_len": args.prompt_len,
              "response_len": args.response_len, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    runs = {"default": torch.cuda.is_available()} | ({"eager_decode": False} if args.compare_eager else {})
    for name, compile_layers in runs.items():
        result.update({f"{name}_{k}": v for k, v in time_steps(args, compile_layers).items()})
    report(result, args.out)


if __name__ == "__main__":
    main()
