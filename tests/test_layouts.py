"""1 process vs 2 processes (gloo): DP=2 and TP=2 give the same losses, grad norms, log-probs and
greedy generations and DPO step metrics; checkpoints saved by 2 processes resume in 1 and the reverse; the
reference-policy swap works on sharded parameters; exports from either layout match.

Three torchrun launches (tests/distributed/layout_checks.py) record everything once; each test
below compares one aspect.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import torchrun, write_pairs, write_sft

SCRIPT = "tests/distributed/layout_checks.py"
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(llama_dir: str, qwen2_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = str(tmp_path_factory.mktemp("layouts"))
    write_pairs(os.path.join(work, "pairs.jsonl"), 16)
    write_sft(os.path.join(work, "sft.jsonl"), 16)
    args = ("--model-dir", llama_dir, "--qwen2-dir", qwen2_dir, "--workdir", work)
    for nproc, phase in ((1, "single"), (2, "parallel"), (1, "resume1")):
        torchrun(nproc, SCRIPT, "--phase", phase, *args)
    results = {}
    for phase in ("single", "parallel", "resume1"):
        with open(os.path.join(work, f"{phase}.json")) as f:
            results[phase] = json.load(f)
    results["workdir"] = work
    return results


def _close(a: list, b: list, tol: float = TOL) -> None:
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), atol=tol, rtol=0)


@pytest.mark.parametrize("layout", ["dp2_steps", "tp2_steps", "dp2_fsdp_steps"])
def test_two_processes_match_one_in_loss_grad_norm_and_lr(runs: dict, layout: str) -> None:
    """Replicated data parallel (the default), tensor parallel and FSDP sharding, all in fp32."""
    _close(runs["parallel"][layout], runs["single"]["steps"])


def test_bf16_with_fp32_masters_matches_across_data_parallel_ranks(runs: dict) -> None:
    """bf16 compute, fp32 masters and fp32 gradient buffers summed over ranks: the same steps as one
    process up to bf16 rounding of the per-rank partial sums, and close to fp32 training."""
    _close(runs["parallel"]["dp2_bf16_steps"], runs["single"]["bf16_steps"], tol=2e-3)
    _close(runs["single"]["bf16_steps"], runs["single"]["steps"], tol=5e-2)


def test_each_rank_loads_its_own_part_of_the_hf_directory_as_rank0_would(runs: dict) -> None:
    """Tied (Llama) and untied (Qwen2) weights, tensor-parallel slices and FSDP shards."""
    assert runs["parallel"]["parallel_load_equals_rank0"] == {
        f"{family} {layout}": True for family in ("llama", "qwen2") for layout in ("tp2", "fsdp dp2")}


def test_qwen2_tensor_parallel_matches_one_process(runs: dict) -> None:
    _close(runs["parallel"]["qwen2_tp2_steps"], runs["single"]["qwen2_steps"])


@pytest.mark.parametrize("layout", ["dp2_resumed_from_1proc", "dp2_fsdp_resumed_from_1proc"])
def test_checkpoint_saved_by_one_process_resumes_in_two(runs: dict, layout: str) -> None:
    """Also across shardings: a replicated checkpoint resumes under FSDP."""
    _close(runs["parallel"][layout], runs["single"]["steps"][2:])


@pytest.mark.parametrize("saved", ["resumed_from_2proc", "resumed_from_2proc_safetensors"])
def test_checkpoint_saved_by_two_processes_resumes_in_one(runs: dict, saved: str) -> None:
    """TP=2's checkpoint in either format (DCP, or HF safetensors weights + DCP optimizer)."""
    _close(runs["resume1"][saved], runs["single"]["steps"][2:])


def test_tensor_parallel_logprobs_and_greedy_generation(runs: dict) -> None:
    _close(runs["parallel"]["tp2_logprobs_init"], runs["single"]["logprobs_init"])
    assert runs["parallel"]["tp2_greedy"] == runs["single"]["greedy"]


def test_reference_swap_on_sharded_parameters(runs: dict) -> None:
    parallel = runs["parallel"]
    _close(parallel["tp2_logprobs_in_swap"], runs["single"]["logprobs_init"])
    assert parallel["tp2_swap_restored_bitwise"]
    _close(parallel["tp2_logprobs_after_swap"], runs["single"]["logprobs_trained"])


@pytest.mark.parametrize("strategy", ["dpo_resident", "dpo_precomputed"])
def test_every_reference_strategy_gives_the_swap_metrics(runs: dict, strategy: str) -> None:
    one, other = runs["single"]["dpo"], runs["single"][strategy]
    for name in one[0]:
        _close([m[name] for m in other], [m[name] for m in one])


@pytest.mark.parametrize("algorithm", ["dpo", "spin"])
def test_packed_steps_give_the_padded_metrics(runs: dict, algorithm: str) -> None:
    padded, packed = runs["single"][algorithm], runs["single"][f"{algorithm}_packed"]
    assert [sorted(m) for m in packed] == [sorted(m) for m in padded]
    for name in padded[0]:
        _close([m[name] for m in packed], [m[name] for m in padded])


@pytest.mark.parametrize("lora, layout", [("", "tp2"), ("_lora", "tp2"), ("_lora", "fsdp")])
def test_exports_from_both_layouts_load_with_equal_weights(runs: dict, lora: str, layout: str) -> None:
    """Full fine-tuning, and LoRA's merged weights (base + scaled B·A from tensor-parallel or FSDP-sharded adapters)."""
    one = AutoModelForCausalLM.from_pretrained(os.path.join(runs["workdir"], f"hf{lora}_1proc"), dtype=torch.float32)
    two = AutoModelForCausalLM.from_pretrained(os.path.join(runs["workdir"], f"hf{lora}_{layout}"), dtype=torch.float32)
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items()):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=name)


def test_lora_at_tensor_parallel_trains_saves_and_resumes_as_one_process(runs: dict) -> None:
    _close(runs["parallel"]["lora_tp2_steps"], runs["single"]["lora_steps"])
    _close(runs["parallel"]["lora_fsdp_steps"], runs["single"]["lora_steps"])
    _close(runs["resume1"]["lora_resumed_from_2proc"], runs["single"]["lora_steps"][2:])


@pytest.mark.parametrize("layout", ["dpolora_dp2", "dpolora_tp2", "dpolora_fsdp_dp2", "spinlora_tp2", "dpobco_dp2",
                                    "dpobco_tp2", "dposimpo_dp2", "dposimpo_tp2", "dpoaot_dp2", "dpoaot_tp2"])
def test_lora_and_catalogue_losses_match_one_process(runs: dict, layout: str) -> None:
    """LoRA (peft) with the adapter-disabled DPO reference, and SPIN's copy of the adapters: replicated and
    FSDP data parallel, and tensor parallel with the adapters split as their base layers are; BCO, whose
    running reward mean (reported as bco_reward_mean) is state; reference-free SimPO; and AOT (aot +
    aot_pair), which ranks every pair of the step: one pair per micro-batch at DP=2, two in one process."""
    one, two = runs["single"][layout.split("_")[0]], runs["parallel"][layout]
    assert [sorted(m) for m in one] == [sorted(m) for m in two]
    for name in one[0]:
        _close([m[name] for m in two], [m[name] for m in one])


@pytest.mark.parametrize("layout", ["dpo_dp2", "dpo_tp2", "spin_dp2", "spin_tp2", "dpo_dp2_precomputed",
                                    "dpo_tp2_resident", "dpo_tp2_precomputed", "dpo_dp2_packed", "dpo_tp2_packed",
                                    "spin_tp2_packed"])
def test_dpo_and_spin_steps_match_one_process(runs: dict, layout: str) -> None:
    """Reference (swap, resident, precomputed), generation (SPIN, greedy), sequence packing, the losses
    and every reported metric agree with one process, padded, and the swap."""
    one, two = runs["single"][layout.split("_")[0]], runs["parallel"][layout]
    assert [sorted(m) for m in one] == [sorted(m) for m in two]
    for name in one[0]:
        _close([m[name] for m in two], [m[name] for m in one])
