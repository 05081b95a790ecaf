"""Print the largest differences between the layouts recorded by layout_checks.py (for GPU reports).

    python tests/distributed/compare_layouts.py WORKDIR
"""

from __future__ import annotations

import json
import os
import sys

import torch


def max_diff(a: list, b: list) -> float:
    return (torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)).abs().max().item()


def main(work: str) -> None:
    single, parallel, resumed = (json.load(open(os.path.join(work, f"{p}.json"))) for p in ("single", "parallel", "resume1"))
    ref = single["steps"]
    rows = [
        ("DP=2 vs 1 process [loss, grad_norm, lr]", parallel["dp2_steps"], ref),
        ("TP=2 vs 1 process", parallel["tp2_steps"], ref),
        ("Qwen2 TP=2 vs 1 process", parallel["qwen2_tp2_steps"], single["qwen2_steps"]),
        ("DP=2 FSDP vs 1 process", parallel["dp2_fsdp_steps"], ref),
        ("DP=2 bf16 vs 1 process bf16", parallel["dp2_bf16_steps"], single["bf16_steps"]),
        ("DP=2 resumed from 1-process checkpoint", parallel["dp2_resumed_from_1proc"], ref[2:]),
        ("DP=2 FSDP resumed from 1-process checkpoint", parallel["dp2_fsdp_resumed_from_1proc"], ref[2:]),
        ("1 process resumed from TP=2 checkpoint", resumed["resumed_from_2proc"], ref[2:]),
        ("TP=2 log-probs", parallel["tp2_logprobs_init"], single["logprobs_init"]),
        ("TP=2 log-probs inside the reference swap", parallel["tp2_logprobs_in_swap"], single["logprobs_init"]),
    ]
    for layout in ("dpo_dp2", "dpo_tp2", "spin_dp2", "spin_tp2", "dpo_dp2_precomputed", "dpo_tp2_resident",
                   "dpo_tp2_precomputed"):
        reference = single[layout.split("_")[0]]
        rows.append((f"{layout} metrics (all)", [[m[k] for k in sorted(m)] for m in parallel[layout]],
                     [[m[k] for k in sorted(m)] for m in reference]))
    for strategy in ("dpo_resident", "dpo_precomputed"):
        rows.append((f"{strategy} vs swap, 1 process (all)", [[m[k] for k in sorted(m)] for m in single[strategy]],
                     [[m[k] for k in sorted(m)] for m in single["dpo"]]))
    print(f"reference losses (1 process): {[round(r[0], 6) for r in ref]}")
    print(f"reference grad norms:         {[round(r[1], 6) for r in ref]}")
    for name, a, b in rows:
        print(f"{name:45s} max |diff| = {max_diff(a, b):.3e}")
    print(f"TP=2 greedy generation equal to 1 process: {parallel['tp2_greedy'] == single['greedy']}")
    print(f"swap restored bit for bit under TP=2: {parallel['tp2_swap_restored_bitwise']}")


if __name__ == "__main__":
    main(sys.argv[1])
