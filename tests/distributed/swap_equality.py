"""On a GPU: the streamed swap (host weights copied in layer by layer on a side stream, each layer's
forward waiting for its own) scores exactly as the resident copy of the same weights, and training
resumes from exactly the weights it had.

    python tests/distributed/swap_equality.py [--shape qwen2.5-0.5b] [--out OUT.json]

A layer reading its weights before their copy landed would mix policy and reference weights; so the
policy is first trained far from the reference (lr 1e-3), and the swap's log-probs must then equal the
resident reference's bit for bit (the same bf16 weights through the same kernels) and the log-probs the
network gave before training, while differing from the trained policy's. CPU tests cover the grouping
and the CPU path (tests/test_ref_policy.py); only a GPU has the streams this checks.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
from dpo_throughput import SHAPES  # noqa: E402

from helpers import finish_check, right_padded_batch  # noqa: E402
from nemo_aligner.config.schema import (ModelConfig, OptimConfig, Precision, PretrainedCheckpointConfig,  # noqa: E402
                                        TrainerConfig)
from nemo_aligner.losses.sft import sft_loss_fn  # noqa: E402
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel  # noqa: E402
from nemo_aligner.reference.weight_copy import WeightCopyReference  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    model = GPTModel(ModelConfig(micro_batch_size=args.rows, global_batch_size=args.rows, encoder_seq_length=args.seq_len,
                                 optim=OptimConfig(lr=1e-3)),
                     PretrainedCheckpointConfig(restore_from_path=None, model_config=shape,
                                                tokenizer_path="examples/tiny/model"),
                     TrainerConfig(devices=1, precision=Precision.bf16))
    model.setup_optimizer(max_steps=10)
    engine = model.engine
    batch = {k: v.to(engine.device) for k, v in right_padded_batch(args.rows, args.seq_len, shape["vocab_size"], seed=0).items()}
    swap, resident = WeightCopyReference(engine, resident=False), WeightCopyReference(engine, resident=True)
    initial = engine.logprobs([batch])
    for step in range(3):
        model.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum()))
        model.optimizer_step(1.0)
    trained = engine.logprobs([batch])
    results = {}
    for round_ in range(2):  # twice: the second swap starts from weights the first one restored
        swapped, kept = swap.logprobs([batch]), resident.logprobs([batch])
        after = engine.logprobs([batch])
        results[f"round{round_}"] = {
            "swap_equals_resident": torch.equal(swapped, kept),
            "swap_equals_initial": torch.equal(swapped, initial),
            "policy_restored": torch.equal(after, trained),
            "policy_moved_max_abs": (trained - initial).abs().max().item(),
        }
    results["passed"] = all(r["swap_equals_resident"] and r["swap_equals_initial"] and r["policy_restored"]
                            and r["policy_moved_max_abs"] > 1e-2 for r in results.values())
    results["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    finish_check(results, args.out)


if __name__ == "__main__":
    main()
