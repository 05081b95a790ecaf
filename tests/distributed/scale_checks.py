"""Layouts of one node against one process, and resume across world sizes (the scale-validation issue).

    python tests/distributed/scale_checks.py --phase reference --workdir W [--precision fp32|bf16]   (1 process)
    torchrun --nproc_per_node N tests/distributed/scale_checks.py --phase layouts --workdir W [--precision ...]
    torchrun --nproc_per_node M tests/distributed/scale_checks.py --phase resume --saved-at N --workdir W [...]
    python tests/distributed/scale_checks.py --phase compare --workdir W

The model is a 4-layer tiny Llama with 4 key/value heads (so TP=4 and PP=4 divide it); the workdir holds
its base (llama/) and pairs.jsonl (80 pairs or more). `reference` records 10 DPO steps of 8 pairs (rpo_bwd_kl + SFT term, every metric) and 10 SFT steps of one process; `layouts` runs, at the
launch's world size N, every layout of the list below that N allows: torch_native DP=N, TP=2 x DP=N/2,
TP=4 x DP=N/4, and the megatron engine at TP=2 x PP=2 (x DP=N/4) and PP=4 (x DP=N/4); it also saves the
SFT run of DP=N after 5 steps. `resume` loads that checkpoint at world size M and runs steps 5-10.
`compare` prints one JSON object: the largest relative gap of every comparison (as
megatron_engine_checks.py measures them), by precision. Layers run uncompiled: numerics are checked here.
"""

from __future__ import annotations

import argparse
import json
import os

import torch.distributed as dist

import layout_checks
from layout_checks import build, dpo_steps, resume, run_steps, save
from megatron_engine_checks import derived_model, fresh_megatron_layout, gap
from nemo_aligner.config.schema import Precision
from nemo_aligner.utils.distributed import init_distributed

DPO_STEPS, SFT_STEPS, SAVE_AT = 10, 10, 5
BATCH = dict(micro_batch=1, global_batch=8)  # DPO pairs: one per micro-batch, so that 8 data-parallel ranks divide them


def layouts(world: int) -> list[tuple[str, str, int, int]]:
    """(name, engine, tp, pp) of the layouts a world of `world` processes can run (DP is what is left)."""
    candidates = [("torch_native_dp", "torch_native", 1, 1), ("torch_native_tp2", "torch_native", 2, 1),
                  ("torch_native_tp4", "torch_native", 4, 1), ("megatron_tp2_pp2", "megatron", 2, 2),
                  ("megatron_pp4", "megatron", 1, 4)]
    return [(f"{name}_world{world}", engine, tp, pp) for name, engine, tp, pp in candidates
            if world % (tp * pp) == 0 and (tp * pp > 1 or world > 1)]


def phase(args: argparse.Namespace) -> dict:
    init_distributed()
    layout_checks.TORCH_COMPILE = False
    precision, work = Precision(args.precision), args.workdir
    model = derived_model(os.path.join(work, "llama"), os.path.join(work, "llama4"), num_hidden_layers=4,
                          num_key_value_heads=4)
    pairs, world = os.path.join(work, "pairs.jsonl"), dist.get_world_size()
    out: dict = {}
    if args.phase == "reference":
        out["dpo"] = dpo_steps(model, pairs, 1, precision, steps=DPO_STEPS, **BATCH)
        out["sft"] = run_steps(build(model, 1, precision, micro_batch=1), 0, SFT_STEPS)
    elif args.phase == "layouts":
        for name, engine, tp, pp in layouts(world):
            fresh_megatron_layout()
            out[name] = dpo_steps(model, pairs, tp, precision, steps=DPO_STEPS, engine=engine, pp=pp, **BATCH)
        fresh_megatron_layout()
        saver = build(model, 1, precision, micro_batch=1)
        out["sft"] = run_steps(saver, 0, SAVE_AT)
        save(saver, os.path.join(work, f"ckpt_{args.precision}_world{world}"), SAVE_AT)
        out["sft"] += run_steps(saver, SAVE_AT, SFT_STEPS)
    else:  # resume
        resumed = build(model, 1, precision, micro_batch=1)
        out["resumed_at"] = resume(resumed, os.path.join(work, f"ckpt_{args.precision}_world{args.saved_at}"))
        out["sft"] = run_steps(resumed, SAVE_AT, SFT_STEPS)
    if dist.get_rank() == 0:
        suffix = f"world{args.saved_at}_at{world}" if args.phase == "resume" else f"world{world}"
        with open(os.path.join(work, f"{args.phase}_{args.precision}_{suffix}.json"), "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return out


def compare(work: str) -> dict:
    """Every recorded layout and resume against the one-process reference of its precision."""
    results: dict = {}
    for precision in ("fp32", "bf16"):
        path = os.path.join(work, f"reference_{precision}_world1.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            reference = json.load(f)
        gaps: dict = {}
        for name in sorted(os.listdir(work)):
            if not name.endswith(".json") or not name.startswith((f"layouts_{precision}_", f"resume_{precision}_")):
                continue
            with open(os.path.join(work, name)) as f:
                run = json.load(f)
            label = name.removesuffix(".json").split("_", 2)[2]
            if name.startswith("layouts_"):
                gaps.update({layout: gap(reference["dpo"], steps) for layout, steps in run.items() if layout != "sft"})
                gaps[f"sft_{label}"] = gap(reference["sft"], run["sft"])
            else:
                gaps[f"sft_resumed_{label}"] = gap(reference["sft"][SAVE_AT:], run["sft"])
        results[precision] = gaps
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["reference", "layouts", "resume", "compare"], required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--saved-at", type=int, default=None, help="resume: the world size the checkpoint was saved at")
    args = parser.parse_args()
    if args.phase == "compare":
        print(json.dumps(compare(args.workdir)))
        return
    if args.phase == "reference":
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29561")
    phase(args)


if __name__ == "__main__":
    main()
