"""The megatron engine (model.engine=megatron) behind GPTModel, on CPU over gloo: against the torch_native
engine across layouts (one torchrun launch, tests/distributed/megatron_engine_checks.py), and its own
contracts in one process (non-finite steps, weight swaps, offload, refused configurations)."""

from __future__ import annotations

import json
import math
import os
from typing import Iterator

import pytest
import torch

from helpers import FP32, make_model_dir, model_cfg, pretrained, right_padded_batch, torchrun, write_pairs, write_sft
from nemo_aligner.config.schema import PeftConfig, Precision, TrainerConfig
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.types import LengthParams, SamplingParams


def test_dpo_spin_resume_and_export_on_megatron_layouts_equal_torch_native(tmp_path) -> None:
    """Two gloo processes, fp32, against torch_native (data parallel): DPO at TP=2 (swap reference), TP=2 with
    sequence parallelism (precomputed), PP=2 (resident; and with aot + aot_pair), PP=2 with 2 virtual chunks per stage (a 4-layer
    model, resident) and DP=2 (precomputed), every metric of 3 steps;
    SPIN with greedy rollouts at TP=2, with and without sequence parallelism; SFT
    steps at TP=2 and at PP=2 x 2 chunks; checkpoints saved at TP=2 resumed at PP=2, and saved at PP=2 x 2
    chunks resumed at TP=2, going on as before; the HF exports load in transformers and equal
    torch_native's exports of the same steps."""
    model_dir = make_model_dir(str(tmp_path / "llama"), "llama")
    pairs, sft = write_pairs(str(tmp_path / "pairs.jsonl"), 24), write_sft(str(tmp_path / "sft.jsonl"), 16)
    out = torchrun(2, "tests/distributed/megatron_engine_checks.py", model_dir, pairs, sft, str(tmp_path), timeout=600)
    results = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert results["world"] == 2 and results["resumed_at_step"] == 2
    for name in ("dpo_tp2_swap", "dpo_tp2_sequence_parallel_precomputed", "dpo_pp2_resident", "dpo_dp2_precomputed", "dpo_pp2_aot",
                 "dpo_pp2_vp2_resident", "dpo_tp2_qwen3", "spin_tp2", "spin_tp2_sequence_parallel", "sft_tp2_vs_torch_native",
                 "resume_tp2_at_pp2", "sft_pp2_vp2_vs_torch_native", "resume_pp2_vp2_at_tp2"):
        assert results[name] < 1e-5, (name, results)
    assert results["export_max_abs_gap"] < 1e-5 and results["export_vp_max_abs_gap"] < 1e-5, results
    assert results["export_loads_in_transformers"] == "LlamaForCausalLM"


@pytest.fixture(scope="module")
def megatron_policy(llama_dir: str) -> Iterator[GPTModel]:
    from megatron.core import parallel_state

    policy = GPTModel(model_cfg(engine="megatron"), pretrained(llama_dir), FP32)
    policy.setup_optimizer(max_steps=4)
    yield policy
    parallel_state.destroy_model_parallel()  # megatron's groups are process-wide; later tests set up their own


def _sft_step(policy: GPTModel) -> None:
    batch = right_padded_batch(4, 10, 48, seed=3)
    tokens = batch["loss_mask"][:, 1:].sum()
    policy.forward_backward(batch, lambda logprobs, mb: (
        -(logprobs * mb["loss_mask"][:, 1:].to(logprobs.device)).sum() / tokens, {}))


def test_a_non_finite_gradient_is_refused_before_any_weight_changes(megatron_policy: GPTModel) -> None:
    weights = {name: p.detach().clone() for name, p in megatron_policy.engine.chunks[0].named_parameters()}
    micro_batches = megatron_policy.micro_batches(right_padded_batch(4, 10, 48, seed=3))
    # a finite loss (0) whose gradient is NaN: d sqrt(x) / dx at 0, times 0
    megatron_policy.engine.forward_backward(micro_batches, lambda logprobs, mb: ((logprobs * 0).sum().sqrt(), {}),
                                            forward_only=False)
    with pytest.raises(FloatingPointError, match="not applied"):
        megatron_policy.optimizer_step(1.0)
    assert all(torch.equal(p, weights[name]) for name, p in megatron_policy.engine.chunks[0].named_parameters())
    _sft_step(megatron_policy)  # the gradients were cleared: the next step trains
    grad_norm, _ = megatron_policy.optimizer_step(1.0)
    assert math.isfinite(grad_norm) and grad_norm > 0


def test_swapped_weights_compute_with_the_buffers_and_restore_exactly(megatron_policy: GPTModel) -> None:
    engine = megatron_policy.engine
    batch = right_padded_batch(2, 8, 48, seed=5)
    before = megatron_policy.get_logprobs(batch)
    weights = {name: p.detach().clone() for name, p in engine.chunks[0].named_parameters()}
    zeros = {name: torch.zeros_like(t) for name, t in engine.allocate_weights("host").items()}
    with engine.swapped_weights(zeros):
        swapped = megatron_policy.get_logprobs(batch)
        copied = engine.allocate_weights("host")
        engine.copy_weights_to(copied)
        assert all(not t.any() for t in copied.values())
        with pytest.raises(RuntimeError, match="cannot nest"):
            with engine.swapped_weights(zeros):
                pass
    assert not torch.allclose(swapped, before)
    assert all(torch.equal(p, weights[name]) for name, p in engine.chunks[0].named_parameters())
    assert torch.equal(megatron_policy.get_logprobs(batch), before)
    with pytest.raises(KeyError, match="do not match"):
        with engine.swapped_weights({"nope": torch.zeros(1)}):
            pass


def test_optimizer_state_offload_round_trip_is_bit_exact(megatron_policy: GPTModel) -> None:
    _sft_step(megatron_policy)
    megatron_policy.optimizer_step(1.0)
    from nemo_aligner.engines.megatron.weights_io import optimizer_tensors

    states = optimizer_tensors(megatron_policy.engine.optimizer)
    before = [t.clone() for t in states]
    megatron_policy.engine.offload_optimizer_state()
    assert states and all(t.untyped_storage().size() == 0 for t in states)
    megatron_policy.engine.onload_optimizer_state()
    assert all(torch.equal(a, b) for a, b in zip(before, states))


def test_megatron_steps_torch_adamw_with_the_fused_kernel(megatron_policy: GPTModel) -> None:
    """megatron-core without TransformerEngine or apex builds torch AdamW with foreach kernels; the engine
    switches it to the fused one (whose step counts live on the parameters' device), and it trains."""
    _sft_step(megatron_policy)
    megatron_policy.optimizer_step(1.0)
    adam = megatron_policy.engine.optimizer.optimizer
    assert all(group["fused"] and not group["foreach"] for group in adam.param_groups)
    steps = [state["step"] for state in adam.state.values()]
    assert steps and all(step.device == param.device for step, param in zip(steps, adam.state))


def test_torch_multi_tensor_kernels_match_megatrons_fallbacks_and_fill_its_slots(megatron_policy: GPTModel) -> None:
    """The gradient norm and scaling kernels the engine puts in megatron's apex slots give what megatron's
    per-tensor fallbacks give (the norm within fp32 rounding: the fallback adds the norms up on the host),
    and the engine's optimizer step goes through them."""
    from megatron.core import utils as megatron_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as megatron_optimizer

    from nemo_aligner.engines.megatron import torch_kernels
    from nemo_aligner.engines.megatron.build import cuda_placements_on_cpu

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(shape, generator=gen) * scale for shape, scale in (((3, 5), 1.0), ((7,), 1e3), ((2, 2, 2), 1e-3))]
    with cuda_placements_on_cpu():
        theirs, _ = megatron_utils.local_multi_tensor_l2_norm(0, None, [tensors], False)
    ours, _ = torch_kernels.foreach_l2_norm(0, None, [tensors], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    for sources, scale in (([t.clone() for t in tensors], 0.5), (tensors, 0.25), (tensors, 1.0)):
        expected, got = [torch.empty_like(t) for t in tensors], [torch.empty_like(t) for t in tensors]
        megatron_utils.local_multi_tensor_scale(0, None, [sources, expected], scale)
        torch_kernels.foreach_scale(0, None, [sources, got], scale)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    in_place = [t.clone() for t in tensors]
    torch_kernels.foreach_scale(0, None, [in_place, in_place], 0.5)
    assert all(torch.equal(a, b * 0.5) for a, b in zip(in_place, tensors))
    assert clip_grads.l2_norm_impl is torch_kernels.foreach_l2_norm
    assert clip_grads.multi_tensor_scale_impl is megatron_optimizer.multi_tensor_scale_impl is torch_kernels.foreach_scale


def test_describe_counts_every_distinct_weight(megatron_policy: GPTModel, llama_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    assert megatron_policy.engine.num_parameters() == sum(p.numel() for p in hf.parameters())
    assert "megatron-core" in megatron_policy.engine.describe() and "tp=1 pp=1" in megatron_policy.engine.describe()


@pytest.mark.parametrize("change, message", [
    (dict(precision=Precision.bf16_pure), "bf16_pure is a torch_native mode"),
    (dict(tensor_model_parallel_size=3), "must divide the world size"),
    (dict(sequence_parallel=True), "sequence_parallel=true needs model.tensor_model_parallel_size > 1"),
    (dict(engine="torch_native", sequence_parallel=True), "sequence_parallel=true needs model.engine=megatron"),
    (dict(peft=PeftConfig(peft_scheme="lora")), "peft_scheme=lora needs model.engine=torch_native"),
])
def test_layouts_and_modes_the_engine_cannot_run_are_refused_by_key(llama_dir: str, change: dict, message: str) -> None:
    trainer = TrainerConfig(devices=1, num_nodes=1, precision=change.pop("precision", Precision.fp32))
    with pytest.raises(ValueError, match=message):
        GPTModel(model_cfg(**{"engine": "megatron", **change}), pretrained(llama_dir), trainer)


def test_o1_mixed_precision_and_a_virtual_pipeline_without_a_pipeline_are_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="model.megatron_amp_O2=False is invalid"):
        model_cfg(megatron_amp_O2=False)
    with pytest.raises(ValueError, match="model.virtual_pipeline_model_parallel_size=2 is invalid"):
        model_cfg(virtual_pipeline_model_parallel_size=2)


def test_a_sliding_window_shorter_than_the_sequences_is_refused(tmp_path) -> None:
    from transformers import AutoConfig

    mistral = make_model_dir(str(tmp_path / "mistral"), "mistral")
    window = AutoConfig.from_pretrained(mistral).sliding_window
    if not window:
        pytest.skip("the tiny mistral config has no sliding window")
    with pytest.raises(ValueError, match="no sliding-window attention"):
        GPTModel(model_cfg(engine="megatron", encoder_seq_length=window + 1), pretrained(mistral), FP32)


def test_generation_hides_the_left_padding_and_the_future_from_every_real_token() -> None:
    from nemo_aligner.engines.megatron.generation import hidden_positions

    hidden = hidden_positions(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert hidden.shape == (2, 1, 3, 3)
    assert hidden[0, 0].tolist() == [[False, True, True], [True, False, True], [True, False, False]]  # pad sees itself
    assert hidden[1, 0].tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_tensor_parallel_pieces_and_pipeline_stages_reassemble_the_whole_model(llama_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from nemo_aligner.engines.megatron.convert import (hf_to_megatron, pipeline_stage_state, stage_to_model_names,
                                                       tensor_parallel_shard, tensor_parallel_unshard)

    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    whole = hf_to_megatron(hf.state_dict(), hf.config)
    for name, tensor in whole.items():
        assert torch.equal(tensor_parallel_unshard(name, [tensor_parallel_shard(name, tensor, r, 2) for r in range(2)]), tensor)
    per_stage = hf.config.num_hidden_layers // 2
    stages = [stage_to_model_names(pipeline_stage_state(whole, hf.config, s, 2), hf.config, s * per_stage) for s in range(2)]
    assert {name: t for stage in stages for name, t in stage.items()}.keys() == whole.keys()
    assert all(torch.equal(stage[name], whole[name]) for stage in stages for name in stage)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_score_and_step_as_on_torch_native(family: str, family_dir) -> None:
    """One process, fp32: the same per-token log-probs, SFT loss and gradient norm on both engines, and
    the same log-probs after the step (qwen2's qkv bias and untied head, qwen3's per-head query and key
    norms convert and train)."""
    from megatron.core import parallel_state

    batch = right_padded_batch(4, 10, 48, seed=8)
    tokens = batch["loss_mask"][:, 1:].sum()

    def sft(logprobs: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
        return -(logprobs * mb["loss_mask"][:, 1:].to(logprobs.device)).sum() / tokens, {}

    results = []
    for engine in ("torch_native", "megatron"):
        policy = GPTModel(model_cfg(engine=engine), pretrained(family_dir(family)), FP32)
        policy.setup_optimizer(max_steps=2)
        before = policy.get_logprobs(batch)
        loss = policy.forward_backward(batch, sft)["loss"]
        grad_norm, _ = policy.optimizer_step(1.0)
        results.append((before, loss, grad_norm, policy.get_logprobs(batch)))
    parallel_state.destroy_model_parallel()
    (before_a, loss_a, norm_a, after_a), (before_b, loss_b, norm_b, after_b) = results
    torch.testing.assert_close(before_b, before_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert abs(norm_b - norm_a) <= 1e-5 * norm_a
    torch.testing.assert_close(after_b, after_a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after_a, before_a)


def test_a_sharded_hf_directory_loads_tensor_by_tensor_into_the_same_model(llama_dir: str, tmp_path) -> None:
    """A checkpoint in several safetensors files with an index: every weight made from tensors read one at a
    time, each tensor read once; the model scores as the torch_native engine's load of it does."""
    from megatron.core import parallel_state
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_aligner.engines.megatron.weights_io import HFSource

    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(sharded, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(sharded)
    assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
    reads: list[str] = []
    original = HFSource.read
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HFSource, "read", lambda self, name: reads.append(name) or original(self, name))
        megatron = GPTModel(model_cfg(engine="megatron"), pretrained(sharded), FP32)
    assert len(reads) == len(set(reads)) and "model.layers.1.mlp.up_proj.weight" in reads
    batch = right_padded_batch(2, 8, 48, seed=6)
    native = GPTModel(model_cfg(), pretrained(llama_dir), FP32)
    try:
        torch.testing.assert_close(megatron.get_logprobs(batch), native.get_logprobs(batch), rtol=1e-5, atol=1e-5)
    finally:
        parallel_state.destroy_model_parallel()


def test_compiled_layers_score_and_step_as_eager_ones_without_graph_breaks(llama_dir: str) -> None:
    """model.torch_compile=true (the default on CUDA) compiles each megatron decoder layer whole: the same
    log-probs, loss and gradient norm as eager, and dynamo breaks no graph; each new batch size compiles
    one more graph (never a dynamic batch); generation (KV cache) runs the layers eagerly, compiling
    nothing, with the tokens of the eager model."""
    import torch._dynamo
    from megatron.core import parallel_state

    batch = right_padded_batch(4, 10, 48, seed=3)
    tokens = batch["loss_mask"][:, 1:].sum()
    results, generations = [], []
    try:
        for compiled in (False, True):
            torch._dynamo.utils.counters.clear()
            policy = GPTModel(model_cfg(engine="megatron", torch_compile=compiled), pretrained(llama_dir), FP32)
            policy.setup_optimizer(max_steps=2)
            logprobs = policy.get_logprobs(batch)
            loss = policy.forward_backward(batch, lambda lp, mb: (-(lp * mb["loss_mask"][:, 1:]).sum() / tokens, {}))["loss"]
            results.append((logprobs, loss, policy.optimizer_step(1.0)[0]))
            compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            generations.append(policy.generate(batch["input_ids"][:, :6], torch.ones_like(batch["input_ids"][:, :6]),
                                               SamplingParams(use_greedy=True), LengthParams(max_length=5)).tokens)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs
            if compiled:  # the batch stays static (build.compile_with_static_batch): one more graph per batch size
                whole = policy.get_logprobs(batch)  # the stepped weights
                for added, rows in enumerate((4, 6), start=1):  # micro-batches of 2 rows so far, of one length
                    picked = torch.arange(rows) % 4
                    part = {key: value[picked] for key, value in batch.items()}
                    torch.testing.assert_close(policy.get_logprobs(part, micro_batch_size=rows), whole[picked],
                                               rtol=1e-5, atol=1e-5)
                    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs + added
            parallel_state.destroy_model_parallel()
        assert "compiled layers" in policy.engine.describe() and compiled_graphs > 0
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
        assert torch.equal(generations[0], generations[1])
    finally:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
    (lp_eager, loss_eager, norm_eager), (lp_compiled, loss_compiled, norm_compiled) = results
    torch.testing.assert_close(lp_compiled, lp_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    assert abs(norm_compiled - norm_eager) <= 1e-4 * norm_eager


def test_greedy_generation_from_the_kv_cache_equals_torch_native_on_left_padded_prompts(llama_dir: str) -> None:
    """Prompts of different lengths (left-padded), greedy, fp32: the megatron engine's generation (static KV
    cache) gives torch_native's tokens and lengths, EOS included."""
    from megatron.core import parallel_state

    prompts = [[1, 5, 9, 13, 4, 22], [1, 30], [1, 7, 7, 40], [1, 11, 12]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    outputs = []
    try:
        for engine in ("torch_native", "megatron"):
            policy = GPTModel(model_cfg(engine=engine), pretrained(llama_dir), FP32)
            outputs.append(policy.generate(ids, mask, SamplingParams(use_greedy=True), LengthParams(max_length=9)))
    finally:
        parallel_state.destroy_model_parallel()
    native, megatron = outputs
    assert torch.equal(megatron.tokens, native.tokens)
    assert torch.equal(megatron.response_lengths, native.response_lengths)


def test_rollout_rows_that_fit_count_the_exact_kv_cache_on_a_gpu(monkeypatch) -> None:
    """On CUDA: the free memory's fraction over one row's KV cache (exactly prompt + new positions, this TP
    rank's key/value heads) and sampling buffers; None on CPU, where memory is no limit."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    from nemo_aligner.engines.decoding import generation_bytes_per_row
    from nemo_aligner.engines.megatron.engine import MegatronEngine

    config = AutoConfig.for_model("qwen2", num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                  hidden_size=896, vocab_size=151936)
    engine = SimpleNamespace(device=torch.device("cuda"), hf_config=config, compute_dtype=torch.bfloat16,
                             layout=SimpleNamespace(tp_size=2))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (80 * 2**30, 140 * 2**30))
    per_row = generation_bytes_per_row(config, 512, compute_bytes=2, tp=2)
    assert MegatronEngine.generation_rows_that_fit(engine, 512, 0.5) == 40 * 2**30 // per_row
    engine.device = torch.device("cpu")
    assert MegatronEngine.generation_rows_that_fit(engine, 512, 0.5) is None
