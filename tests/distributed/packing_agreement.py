"""On a GPU: packed micro-batches train as padded ones do, through the real CUDA kernels (PyTorch's
variable-length flash attention in bf16; SDPA with a document mask in fp32).

    python tests/distributed/packing_agreement.py [--out OUT.json] [--steps 3]

For llama, qwen2 and mistral configs: DPO steps (reference precomputed through the packed path too), and
for llama SPIN steps and SFT steps (what rejection sampling trains its kept rollouts with), packed against padded, in fp32 and bf16 (fp32 masters), every logged metric of every step.
fp32 must agree to fp32 round-off (ATOL_FP32); bf16 within RTOL_BF16 of the padded value's magnitude plus
ATOL_BF16: the two runs add the same numbers in another order and in another kernel. Accuracy (the
share of pairs whose reward margin is positive) is left out: at step 0 the policy is the reference, every
margin is 0 up to rounding and its sign is noise (the margins themselves are compared, as rewards_*). The CPU tests
(tests/test_packing.py) hold the exact equalities, with the CUDA kernel replaced by a reference.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from helpers import finish_check, make_model_dir, write_pairs, write_sft
from layout_checks import build, dpo_steps, run_steps, spin_steps
from nemo_aligner.config.schema import DataLoadingConfig, Precision, ReferenceStrategy

ATOL_FP32 = 1e-4
RTOL_BF16, ATOL_BF16 = 3e-2, 2e-2


def worst(padded: list[dict[str, float]], packed: list[dict[str, float]], precision: Precision) -> dict:
    """The largest excess over tolerance (<= 0 passes), and the metric and step it comes from."""
    excess, where = -float("inf"), None
    for step, (a, b) in enumerate(zip(padded, packed)):
        for name in a:
            if name == "acc":
                continue
            allowed = ATOL_FP32 if precision is Precision.fp32 else RTOL_BF16 * abs(a[name]) + ATOL_BF16
            gap = abs(float(a[name]) - float(b[name])) - allowed
            if gap > excess:
                excess, where = gap, f"{name} step {step}: padded {a[name]:.6g} packed {b[name]:.6g}"
    return {"excess": excess, "at": where}


def sft_steps(model_dir: str, precision: Precision, steps: int, packing: bool) -> list[dict[str, float]]:
    """loss, grad_norm and lr of `steps` SFT steps on right-padded batches of varied lengths (RS's training step)."""
    model = build(model_dir, 1, precision, data=DataLoadingConfig(packing=packing))
    return [dict(zip(("loss", "grad_norm", "lr"), record)) for record in run_steps(model, 0, steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    work = tempfile.mkdtemp()
    pairs, sft = write_pairs(os.path.join(work, "pairs.jsonl"), 24), write_sft(os.path.join(work, "sft.jsonl"), 16)
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for family in ("llama", "qwen2", "mistral"):
        model_dir = make_model_dir(os.path.join(work, family), family)
        for precision in (Precision.fp32, Precision.bf16):
            runs = {"dpo": lambda packing: dpo_steps(model_dir, pairs, 1, precision, steps=args.steps, packing=packing,
                                                     reference=ReferenceStrategy.precomputed)}
            if family == "llama":
                runs["spin"] = lambda packing: spin_steps(model_dir, sft, 1, precision, steps=args.steps, packing=packing)
                runs["sft"] = lambda packing: sft_steps(model_dir, precision, args.steps, packing)
            for algorithm, steps in runs.items():
                padded, packed = steps(False), steps(True)
                results[f"{family}/{algorithm}/{precision.value}"] = worst(padded, packed, precision)
                print(family, algorithm, precision.value, results[f"{family}/{algorithm}/{precision.value}"], flush=True)
    results["passed"] = all(r["excess"] <= 0 for k, r in results.items() if isinstance(r, dict))
    finish_check(results, args.out)


if __name__ == "__main__":
    main()
