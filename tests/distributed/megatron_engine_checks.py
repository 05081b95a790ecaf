"""The megatron engine against the torch_native engine, in fp32 over the processes of one torchrun launch
(tests/test_megatron_engine.py runs it on 2 gloo processes; on GPUs it runs over NCCL as is):

  torchrun --nproc_per_node 2 tests/distributed/megatron_engine_checks.py MODEL_DIR PAIRS SFT WORKDIR \
      [--precision fp32|bf16] [--dpo-steps N] [--out FILE]

- DPO, N steps (3 by default; rpo_bwd_kl + SFT term), every metric against torch_native's DP run: megatron at TP=2 with the
  swap reference, at TP=2 with sequence parallelism and the precomputed one, at PP=2 with the resident
  one, at DP=2 with the precomputed one; aot + aot_pair (which score the step's pairs first) at PP=2; qwen3 (per-head query and key norms) at TP=2; a 4-layer model at
  PP=2 with 2 virtual-pipeline chunks per stage;
- SPIN, 2 steps with greedy generation, megatron TP=2 (and with sequence parallelism) against torch_native;
- a checkpoint saved at TP=2 after 2 SFT steps, resumed at PP=2: the next 2 steps against TP=2 going on; the
  same from PP=2 x 2 virtual chunks (the 4-layer model, whose steps are held to torch_native's) to TP=2;
- the HF export at TP=2 after those 4 steps against torch_native's export of the same 4 steps, and its
  logits in transformers.
Rank 0 prints one JSON line: the largest relative gap of each comparison (the test holds fp32 to 1e-5;
bf16 gaps are for the README's validation table); with --out it also rewrites that file after each
comparison, so a run cut short keeps what it measured. Layers run uncompiled (model.torch_compile=false):
the script builds some twenty models in one process, and numerics over the wire are what it checks.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import layout_checks
from layout_checks import build, dpo_steps, resume, run_steps, save, spin_steps
from nemo_aligner.config.schema import Precision, ReferenceStrategy
from nemo_aligner.utils.distributed import init_distributed

def gap(expected: list, got: list) -> float:
    """The largest |a - b| / max(1, |a|) over matching numbers of two lists of records (dicts or lists)."""
    pairs = []
    for a, b in zip(expected, got):
        if isinstance(a, dict):
            assert a.keys() == b.keys(), (sorted(a), sorted(b))
            pairs += [(a[k], b[k]) for k in a]
        else:
            pairs += list(zip(a, b))
    assert len(expected) == len(got) and pairs
    return max(abs(float(x) - float(y)) / max(1.0, abs(float(x))) for x, y in pairs)


def derived_model(model_dir: str, path: str, model_type: str | None = None, **changes: int) -> str:
    """A random (seeded) model like `model_dir`'s, with `changes` to its config or as another family of the
    same shape, and its tokenizer, written by rank 0."""
    if dist.get_rank() == 0 and not os.path.isdir(path):
        config = AutoConfig.from_pretrained(model_dir)
        if model_type is not None:
            shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
            config = AutoConfig.for_model(model_type, **{key: getattr(config, key) for key in shape})
        for key, value in changes.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(path)
    dist.barrier()
    return path


def fresh_megatron_layout() -> None:
    """Each layout below builds its own megatron engine, which sets up parallel_state for its sizes."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def export_gap(torch_native_dir: str, megatron_dir: str) -> float:
    expected, got = (load_file(os.path.join(d, "model.safetensors")) for d in (torch_native_dir, megatron_dir))
    assert expected.keys() == got.keys(), sorted(expected.keys() ^ got.keys())
    return max((expected[k] - got[k]).abs().max().item() for k in expected)


class ResultsFile(dict):
    """The results, rewritten to `path` by rank 0 on every new entry."""

    def __init__(self, path: str | None, **entries: object) -> None:
        super().__init__(entries)
        self.path = path if dist.get_rank() == 0 else None

    def __setitem__(self, key: str, value: object) -> None:
        super().__setitem__(key, value)
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("pairs")
    parser.add_argument("sft")
    parser.add_argument("workdir")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--dpo-steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    init_distributed()
    layout_checks.TORCH_COMPILE = False
    precision, steps = Precision(args.precision), args.dpo_steps
    results = ResultsFile(args.out, world=dist.get_world_size(), precision=args.precision, dpo_steps=steps,
                          device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    reference = dpo_steps(args.model_dir, args.pairs, 1, precision, steps=steps)
    for name, tp, pp, strategy, sp in (("tp2", 2, 1, ReferenceStrategy.swap, False),
                                       ("tp2_sequence_parallel", 2, 1, ReferenceStrategy.precomputed, True),
                                       ("pp2", 1, 2, ReferenceStrategy.resident, False),
                                       ("dp2", 1, 1, ReferenceStrategy.precomputed, False)):
        fresh_megatron_layout()
        got = dpo_steps(args.model_dir, args.pairs, tp, precision, steps=steps, reference=strategy, engine="megatron", pp=pp,
                        sequence_parallel=sp)
        results[f"dpo_{name}_{strategy.value}"] = gap(reference, got)
    aot_reference = dpo_steps(args.model_dir, args.pairs, 1, precision, steps=steps, loss=layout_checks.AOT_LOSSES)
    fresh_megatron_layout()  # the step-level losses: the step's pairs scored first, through the engine
    results["dpo_pp2_aot"] = gap(aot_reference, dpo_steps(args.model_dir, args.pairs, 1, precision, steps=steps,
                                                          loss=layout_checks.AOT_LOSSES, engine="megatron", pp=2))
    qwen3 = derived_model(args.model_dir, os.path.join(args.workdir, "qwen3"), "qwen3")  # per-head q/k norms (TP sums their grads)
    qwen3_reference = dpo_steps(qwen3, args.pairs, 1, precision, steps=steps)
    fresh_megatron_layout()
    results["dpo_tp2_qwen3"] = gap(qwen3_reference, dpo_steps(qwen3, args.pairs, 2, precision, steps=steps, engine="megatron"))
    deeper = derived_model(args.model_dir, os.path.join(args.workdir, "llama4"), num_hidden_layers=4)  # 2 stages x 2 chunks
    deeper_reference = dpo_steps(deeper, args.pairs, 1, precision, steps=steps)
    fresh_megatron_layout()
    results["dpo_pp2_vp2_resident"] = gap(deeper_reference, dpo_steps(
        deeper, args.pairs, 1, precision, steps=steps, reference=ReferenceStrategy.resident, engine="megatron", pp=2, vp=2))
    spin_reference = spin_steps(args.model_dir, args.sft, 1, precision)
    fresh_megatron_layout()
    results["spin_tp2"] = gap(spin_reference, spin_steps(args.model_dir, args.sft, 2, precision, engine="megatron"))
    fresh_megatron_layout()
    results["spin_tp2_sequence_parallel"] = gap(spin_reference, spin_steps(args.model_dir, args.sft, 2, precision,
                                                                           engine="megatron", sequence_parallel=True))

    checkpoints = os.path.join(args.workdir, "megatron_ckpt")
    native = build(args.model_dir, 1, precision)
    native_steps = run_steps(native, 0, 4)
    native.export_hf(os.path.join(args.workdir, "export_torch_native"))
    fresh_megatron_layout()
    tp2 = build(args.model_dir, 2, precision, engine="megatron")
    first = run_steps(tp2, 0, 2)
    save(tp2, checkpoints, 2)
    then = run_steps(tp2, 2, 4)
    results["sft_tp2_vs_torch_native"] = gap(native_steps, first + then)
    tp2.export_hf(os.path.join(args.workdir, "export_megatron"))
    fresh_megatron_layout()
    pp2 = build(args.model_dir, 1, precision, engine="megatron", pp=2)
    results["resumed_at_step"] = resume(pp2, checkpoints)
    results["resume_tp2_at_pp2"] = gap(then, run_steps(pp2, 2, 4))
    # the virtual pipeline: 4 SFT steps of the 4-layer model at PP=2 x 2 chunks against torch_native, saved
    # after 2 and resumed at TP=2, and its export
    native = build(deeper, 1, precision)
    native_deeper = run_steps(native, 0, 4)
    native.export_hf(os.path.join(args.workdir, "export_vp_torch_native"))
    fresh_megatron_layout()
    interleaved = build(deeper, 1, precision, engine="megatron", pp=2, vp=2)
    first = run_steps(interleaved, 0, 2)
    save(interleaved, checkpoints + "_vp", 2)
    then = run_steps(interleaved, 2, 4)
    results["sft_pp2_vp2_vs_torch_native"] = gap(native_deeper, first + then)
    interleaved.export_hf(os.path.join(args.workdir, "export_vp"))
    fresh_megatron_layout()
    resumed = build(deeper, 2, precision, engine="megatron")
    resume(resumed, checkpoints + "_vp")
    results["resume_pp2_vp2_at_tp2"] = gap(then, run_steps(resumed, 2, 4))
    if dist.get_rank() == 0:
        results["export_vp_max_abs_gap"] = export_gap(os.path.join(args.workdir, "export_vp_torch_native"),
                                                      os.path.join(args.workdir, "export_vp"))
        results["export_max_abs_gap"] = export_gap(os.path.join(args.workdir, "export_torch_native"),
                                                   os.path.join(args.workdir, "export_megatron"))
        hf = AutoModelForCausalLM.from_pretrained(os.path.join(args.workdir, "export_megatron"), dtype=torch.float32)
        results["export_loads_in_transformers"] = type(hf).__name__
        print(json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
