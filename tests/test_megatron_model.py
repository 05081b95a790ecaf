"""megatron-core's GPTModel built from a Hugging Face config, with converted Hugging Face weights, against
transformers itself (the foundation of the megatron engine, issue 14): on CPU, fp32, one process."""

from __future__ import annotations

import pytest
import torch

from megatron.core import parallel_state  # a dev dependency (pip install -e ".[dev]")
from transformers import AutoModelForCausalLM

from helpers import make_model_dir, torchrun
from nemo_aligner.engines.megatron.build import (RotaryTables, apply_rotary_tables, build_gpt_model, cuda_placements_on_cpu,
                                                 swiglu)
from nemo_aligner.engines.megatron.convert import fuse_qkv, hf_to_megatron, megatron_to_hf, split_qkv, tensor_parallel_shard
from nemo_aligner.utils.distributed import init_distributed


@pytest.fixture(scope="module", autouse=True)
def model_parallel_groups() -> None:
    """megatron's process groups (tensor, pipeline, data parallel: all of size 1) for this module's tests."""
    init_distributed()
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()


def _megatron_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None].expand_as(ids)
    with torch.no_grad(), cuda_placements_on_cpu():
        return model(input_ids=ids, position_ids=positions, attention_mask=None)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])  # tied; qkv bias, untied; q/k norms; sliding
def test_megatron_gpt_with_converted_weights_gives_transformers_logits(family: str, tmp_path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(make_model_dir(str(tmp_path / family), family), dtype=torch.float32).eval()
    model = build_gpt_model(hf.config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf.state_dict(), hf.config), strict=False)
    assert [m for m in missing if not m.endswith("._extra_state")] == [] and unexpected == []
    ids = torch.randint(3, hf.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(0))
    ours, reference = _megatron_logits(model, ids), hf(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the comparison can fail: one changed weight moves the logits
        model.decoder.layers[0].self_attention.linear_qkv.weight[0, 0] += 0.5
    assert (_megatron_logits(model, ids) - reference).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_conversion_round_trips_exactly_and_accounts_for_every_weight(family: str, tmp_path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(make_model_dir(str(tmp_path / family), family), dtype=torch.float32)
    state = hf.state_dict()
    back = megatron_to_hf(hf_to_megatron(state, hf.config), hf.config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="no megatron counterpart: \\['model.extra.weight'\\]"):
        hf_to_megatron({**state, "model.extra.weight": torch.zeros(1)}, hf.config)


def test_fused_qkv_puts_each_query_group_before_its_key_and_value() -> None:
    """4 query heads in 2 groups of head size 1: rows [q0 q1 k0 v0 | q2 q3 k1 v1], and back."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", num_attention_heads=4, num_key_value_heads=2, hidden_size=4, head_dim=1)
    q, k, v = torch.tensor([[0.0], [1.0], [2.0], [3.0]]), torch.tensor([[10.0], [11.0]]), torch.tensor([[20.0], [21.0]])
    fused = fuse_qkv(q, k, v, config)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, config), (q, k, v)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_give_megatrons_own_rope_and_its_gradient_bit_for_bit(dtype: torch.dtype) -> None:
    """RoPE from the precomputed cos / sin tables equals megatron-core's unfused RoPE from the angles (which
    rounds cos and sin to the compute dtype the same way), values and gradients, past position 512."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    length, heads, dim = 700, 3, 16
    angles = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    tables = RotaryTables(kv_channels=dim, rotary_base=10000, dtype=dtype)
    t = torch.randn(length, 2, heads, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    grad = torch.randn(t.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    with cuda_placements_on_cpu():
        ours_in, theirs_in = t.clone().requires_grad_(), t.clone().requires_grad_()
        ours = apply_rotary_tables(ours_in, tables(length))
        theirs = _apply_rotary_pos_emb_bshd(theirs_in, angles(length))
    ours.backward(grad)
    theirs.backward(grad)
    assert tables(length).shape == (length, 1, 1, 2 * dim) and tables(length).dtype == dtype
    assert torch.equal(ours, theirs) and not torch.equal(ours, t)
    assert torch.equal(ours_in.grad, theirs_in.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_slot_gives_silu_gate_times_up_and_its_gradient(dtype: torch.dtype, monkeypatch) -> None:
    """The SwiGLU in megatron's fused-activation slot against autograd of silu(gate) * up in float64 (the
    gradient written into two halves of one tensor), and the MLP of a built model calls it."""
    from megatron.core.transformer import mlp

    x = torch.randn(5, 3, 2 * 8, generator=torch.Generator().manual_seed(0)) * 3
    grad = torch.randn(5, 3, 8, generator=torch.Generator().manual_seed(1))
    reference_in = x.double().requires_grad_()
    gate, up = reference_in.chunk(2, dim=-1)
    (torch.nn.functional.silu(gate) * up).backward(grad.double())
    ours_in = x.to(dtype).requires_grad_()
    ours = swiglu(ours_in, None)
    ours.backward(grad.to(dtype))
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(ours.double(), (torch.nn.functional.silu(gate) * up).detach(), **tolerance)
    torch.testing.assert_close(ours_in.grad.double(), reference_in.grad, **tolerance)
    assert ours_in.grad.dtype == dtype
    with pytest.raises(NotImplementedError, match="no bias"):
        swiglu(x, torch.zeros(16))

    from transformers import AutoConfig
    model = build_gpt_model(AutoConfig.for_model("llama", hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=16), dtype=torch.float32)
    calls = []
    monkeypatch.setattr(mlp, "bias_swiglu_impl", lambda *args: calls.append(args) or swiglu(*args))
    model.decoder.layers[0].mlp(torch.randn(4, 2, 8))
    assert len(calls) == 1 and calls[0][0].shape == (4, 2, 16)


def test_tensor_and_pipeline_parallel_layouts_give_transformers_logits_and_gradients(tmp_path) -> None:
    """Over 2 gloo processes, for llama (tied) and qwen2 (qkv bias): TP=2, each rank's vocabulary-parallel
    logits are its half of transformers'; then, at TP=2 and through megatron's 1F1B schedule at PP=2, the
    SFT loss over 2 micro-batches of right-padded rows (schedule.forward_backward with our vocabulary-
    parallel log-probs) and its gradients (final norm; at PP=2 also the first stage's first norm) equal
    transformers'."""
    import json

    dirs = [make_model_dir(str(tmp_path / family), family) for family in ("llama", "qwen2")]
    out = torchrun(2, "tests/distributed/megatron_checks.py", "tp,pp", *dirs)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["mode"], r["model_type"]) for r in results] == [(m, f) for m in ("tp", "pp") for f in ("llama", "qwen2")]
    for result in results:
        assert result["missing"] == [] and result["unexpected"] == [], result
        assert result["loss_gap"] < 1e-5 and result["final_norm_grad_gap"] < 1e-6, result
        assert result["logits_gap"] < 1e-5 if result["mode"] == "tp" else result["first_norm_grad_gap"] < 1e-6, result


def test_pipeline_stages_hold_their_layers_renumbered_and_the_ends_their_own_weights() -> None:
    from transformers import AutoConfig

    from nemo_aligner.engines.megatron.convert import pipeline_stage_state

    config = AutoConfig.for_model("llama", num_hidden_layers=4, tie_word_embeddings=True)
    state = {"embedding.word_embeddings.weight": torch.zeros(1), "decoder.final_layernorm.weight": torch.ones(1),
             **{f"decoder.layers.{i}.mlp.linear_fc2.weight": torch.full((1,), float(i)) for i in range(4)}}
    first, last = (pipeline_stage_state(state, config, stage, 2) for stage in (0, 1))
    assert sorted(first) == ["decoder.layers.0.mlp.linear_fc2.weight", "decoder.layers.1.mlp.linear_fc2.weight",
                             "embedding.word_embeddings.weight"]
    assert last["decoder.layers.0.mlp.linear_fc2.weight"].item() == 2.0  # layer 2, the stage's first
    assert last["output_layer.weight"] is state["embedding.word_embeddings.weight"]  # tied: the head is the embedding
    with pytest.raises(ValueError, match="4 layers do not split evenly into 3 pipeline stages"):
        pipeline_stage_state(state, config, 0, 3)


def test_tensor_parallel_fc1_shards_pair_each_ranks_gate_and_up_rows() -> None:
    fc1 = torch.arange(8.0)[:, None]  # gate rows 0-3, up rows 4-7
    assert tensor_parallel_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    proj = torch.arange(4.0)[None, :]
    assert tensor_parallel_shard("decoder.layers.0.self_attention.linear_proj.weight", proj, 0, 2).tolist() == [[0, 1]]
    norm = torch.ones(3)
    assert tensor_parallel_shard("decoder.final_layernorm.weight", norm, 1, 2) is norm


def test_the_schedule_in_one_process_gives_transformers_loss_and_gradients_and_refuses_ragged_micro_batches(
        tmp_path) -> None:
    """schedule.forward_backward with one stage (megatron's plain micro-batch loop)."""
    import functools

    from nemo_aligner.engines.megatron.schedule import forward_backward
    from nemo_aligner.losses.sft import sft_loss_fn

    hf = AutoModelForCausalLM.from_pretrained(make_model_dir(str(tmp_path / "qwen2"), "qwen2"), dtype=torch.float32)
    model = build_gpt_model(hf.config, dtype=torch.float32)
    model.load_state_dict(hf_to_megatron(hf.state_dict(), hf.config), strict=False)
    ids = torch.randint(3, hf.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.float32)
    mask[:, :2] = 0
    micro_batches = [{"input_ids": ids[i:i + 2], "attention_mask": torch.ones_like(ids[i:i + 2]), "loss_mask": mask[i:i + 2]}
                     for i in (0, 2)]
    loss_fn = functools.partial(sft_loss_fn, global_num_tokens=mask[:, 1:].sum())
    sums = forward_backward([model], micro_batches, loss_fn, forward_only=False, tp_group=None, vocab_start_index=0,
                            chunk_size=4)
    logprobs = torch.log_softmax(hf(input_ids=ids).logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    reference = -(logprobs * mask[:, 1:]).sum() / mask[:, 1:].sum()
    reference.backward()
    assert sums["loss"].item() == pytest.approx(reference.item(), abs=1e-6)
    torch.testing.assert_close(model.decoder.final_layernorm.weight.grad, hf.model.norm.weight.grad, atol=1e-6, rtol=1e-5)
    ragged = [micro_batches[0], {k: v[:, :-1] for k, v in micro_batches[1].items()}]
    with pytest.raises(ValueError, match=r"micro-batches of one shape, got \[\(2, 8\), \(2, 9\)\]"):
        forward_backward([model], ragged, loss_fn, forward_only=True, tp_group=None, vocab_start_index=0, chunk_size=4)
