"""DPO training throughput on synthetic preference pairs with a randomly initialised model.

    torchrun --nproc_per_node 1 benchmarks/dpo_throughput.py --shape qwen2.5-0.5b --seq-len 1024 \
        --global-pairs 64 --micro-pairs 4 --steps 8

Each step does what DPOTrainer does with an online reference (--reference resident: a compute-dtype copy on the
device; swap: the weights exchanged with a host copy): reference log-probs, the policy's forward/backward over
micro-batches of whole pairs, one AdamW step. The precomputed reference (DPO's default) is measured against TRL by
dpo_vs_trl.py; this script is for scaling across GPUs and layouts. Prints tokens/s,
pairs/s, step time, model FLOPs utilisation against a bf16 matmul peak measured in the same run,
and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from nemo_aligner.config.dpo import DPOLossConfig, DPOModelConfig, PreferenceDataConfig
from nemo_aligner.config.schema import (OptimConfig, Precision, PretrainedCheckpointConfig, ReferenceConfig,
                                        ReferenceStrategy, TrainerConfig)
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.types import ROWS_PER_PAIR, chosen_rows, rejected_rows

SHAPES = {
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny": dict(model_type="llama", vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
}


def forward_flops_per_token(shape: dict, seq_len: int) -> float:
    """2 x (parameters in matmuls, LM head included) + 4 x layers x seq_len x attention width.

    The attention term counts QK^T and AV over all seq_len keys (the PaLM convention: causal
    masking's halving is not credited). Embedding lookups are free.
    """
    h, layers, ffn, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * ffn  # q, k, v, o, gate/up/down
    matmul_params = layers * per_layer + h * vocab
    return 2 * matmul_params + 4 * layers * seq_len * h


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_bf16_peak(device: torch.device, n: int, reps: int = 20) -> float:
    """Achieved bf16 matmul FLOP/s on random data (median of timed repeats after warm-up)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def report(result: dict, out: str | None) -> None:
    """Print one `name value` line per result on rank 0, and write them as JSON to `out` if given."""
    if dist.get_rank() != 0:
        return
    for key, value in result.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)


def synthetic_pairs(pairs: int, seq_len: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Pair-layout rows of full length; the first half of each row is the prompt."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (ROWS_PER_PAIR * pairs, seq_len), generator=gen)
    rejected_rows(ids)[:, : seq_len // 2] = chosen_rows(ids)[:, : seq_len // 2]  # a pair shares its prompt
    loss_mask = torch.zeros(ROWS_PER_PAIR * pairs, seq_len)
    loss_mask[:, seq_len // 2 :] = 1
    rewards = torch.zeros(ROWS_PER_PAIR * pairs)
    chosen_rows(rewards)[:] = 1.0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask, "rewards": rewards}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--global-pairs", type=int, default=64)
    parser.add_argument("--micro-pairs", type=int, default=4)
    parser.add_argument("--ref-micro-pairs", type=int, default=8)
    parser.add_argument("--engine", choices=["torch_native", "megatron"], default="torch_native")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="bf16")
    parser.add_argument("--reference", choices=["resident", "swap"], default="resident")
    parser.add_argument("--tokenizer", default="examples/tiny/model", help="only its pad/eos ids are used")
    parser.add_argument("--packing", action="store_true", help="model.data.packing=true (default: padded rows, as measured)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    shape = SHAPES[args.shape]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = DPOModelConfig(engine=args.engine, micro_batch_size=args.micro_pairs, global_batch_size=args.global_pairs,
                         tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                         encoder_seq_length=args.seq_len,
                         optim=OptimConfig(lr=1e-6), data=PreferenceDataConfig(packing=args.packing),
                         dpo=DPOLossConfig(log_prob_forward_micro_batch_size=args.ref_micro_pairs,
                                           reference=ReferenceConfig(strategy=ReferenceStrategy(args.reference))))
    policy = GPTDPOModel(cfg, PretrainedCheckpointConfig(restore_from_path=None, model_config=shape, tokenizer_path=args.tokenizer),
                         TrainerConfig(devices=world, precision=Precision(args.precision)))
    policy.setup_optimizer(max_steps=args.steps + args.warmup)
    local_pairs = args.global_pairs // policy.data_parallel.size
    batch = synthetic_pairs(local_pairs, args.seq_len, shape["vocab_size"], seed=policy.data_parallel.rank)
    on_gpu = policy.device.type == "cuda"
    peak = measure_bf16_peak(policy.device, n=8192 if on_gpu else 512)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    times = []
    for step in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        policy.loss_and_metrics(batch, forward_only=False)
        policy.optimizer_step(1.0)
        sync()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)

    step_time = statistics.median(times)
    tokens = ROWS_PER_PAIR * args.global_pairs * args.seq_len
    # policy forward + backward (3 forward-equivalents) and the reference forward (1)
    flops = 4 * tokens * forward_flops_per_token(shape, args.seq_len)
    result = {
        "shape": args.shape, "engine": policy.engine.describe(), "parameters": policy.engine.num_parameters(), "gpus": world,
        "tp": args.tp, "pp": args.pp,
        "precision": args.precision, "reference": args.reference, "seq_len": args.seq_len, "global_pairs": args.global_pairs,
        "micro_pairs": args.micro_pairs, "step_time_s": step_time, "tokens_per_s": tokens / step_time,
        "pairs_per_s": args.global_pairs / step_time, "model_tflops_per_step": flops / 1e12,
        "achieved_tflops_per_gpu": flops / step_time / world / 1e12, "measured_bf16_peak_tflops": peak / 1e12,
        "mfu": flops / step_time / world / peak, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else float("nan"),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
    }
    report(result, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
