"""bf16 training agrees with fp32 training, on the embedded default DPO job (tiny model, its preference data).

    python tests/distributed/precision_agreement.py --out OUT.json [--steps 20]

Runs examples/nlp/gpt/train_gpt_dpo.py as shipped (reference `auto`: precomputed) to the end, and
`--steps` steps with each online reference strategy (swap, resident), each in fp32 and in bf16 (fp32
masters), then compares every logged training metric and the final validation metrics with the fp32
run of the same configuration. A GPU check: CPU bf16 is slow and not what users train with.

Single steps of a small model differ by more than bf16 rounding once the two runs' weights have drifted
apart (a clipped step at a large gradient norm amplifies any difference), so the criterion is on what a
user reads off a run: the mean of each metric over the steps, and the final validation metrics, agree
within TOLERANCE of the fp32 value's magnitude plus an absolute FLOOR. Per-step differences are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

from nemo_aligner.utils.metrics import read_metrics

SCRIPT = "examples/nlp/gpt/train_gpt_dpo.py"
TOLERANCE, FLOOR = 0.05, 0.02
SKIPPED = {"step", "epoch", "consumed_samples", "lr", "step_time", "tokens_per_sec", "split"}


def run(name: str, overrides: list[str], work: str) -> dict[str, list[dict[str, float]]]:
    log_dir = os.path.join(work, name)
    cmd = [sys.executable, SCRIPT, f"exp_manager.explicit_log_dir={log_dir}", "trainer.log_every_n_steps=1", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    path = os.path.join(log_dir, "metrics.jsonl")
    return {"train": read_metrics(path, "train"), "val": read_metrics(path, "val")}


def compare(fp32: list[dict[str, float]], other: list[dict[str, float]]) -> dict[str, dict[str, float | bool]]:
    """Per metric: |mean(other) - mean(fp32)| against its bound, and the largest per-step difference."""
    out: dict[str, dict[str, float | bool]] = {}
    for name in fp32[0]:
        if name in SKIPPED:
            continue
        a = torch.tensor([r[name] for r in fp32], dtype=torch.float64)
        b = torch.tensor([r[name] for r in other], dtype=torch.float64)
        mean_diff = (a.mean() - b.mean()).abs().item()
        bound = TOLERANCE * a.abs().mean().item() + FLOOR
        out[name] = {"fp32_mean": a.mean().item(), "mean_diff": mean_diff, "bound": bound, "agrees": mean_diff <= bound,
                     "max_step_diff": (a - b).abs().max().item()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    work = tempfile.mkdtemp()
    configs = {"default": [], **{strategy: [f"trainer.dpo.max_steps={args.steps}", f"model.dpo.reference.strategy={strategy}"]
                                 for strategy in ("swap", "resident")}}
    runs = {f"{name}_{precision}": run(f"{name}_{precision}", [*overrides, f"trainer.precision={precision}"], work)
            for name, overrides in configs.items() for precision in ("fp32", "bf16")}
    report = {}
    for name in configs:
        fp32, bf16 = runs[f"{name}_fp32"], runs[f"{name}_bf16"]
        report[f"{name}: train metrics, mean over steps"] = compare(fp32["train"], bf16["train"])
        report[f"{name}: final validation"] = compare(fp32["val"][-1:], bf16["val"][-1:])
    if runs["default_fp32"]["train"]:
        steps = min(args.steps, len(runs["default_fp32"]["train"]))
        report[f"precomputed (the default): first {steps} steps"] = compare(runs["default_fp32"]["train"][:steps],
                                                                           runs["default_bf16"]["train"][:steps])
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "steps": args.steps,
                   "tolerance": TOLERANCE, "floor": FLOOR, "agreement": report, "runs": runs}, f, indent=1)
    for what, metrics in report.items():
        verdict = "agrees" if all(m["agrees"] for m in metrics.values()) else "DISAGREES"
        worst = max(metrics.items(), key=lambda kv: kv[1]["mean_diff"] / kv[1]["bound"])
        print(f"bf16 vs fp32, {what}: {verdict}; closest to its bound: {worst[0]} differs by {worst[1]['mean_diff']:.4g} "
              f"(bound {worst[1]['bound']:.4g}, fp32 {worst[1]['fp32_mean']:.4g})")


if __name__ == "__main__":
    main()
