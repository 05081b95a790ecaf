"""megatron-core's GPTModel built from a Hugging Face config, with converted Hugging Face weights, against
transformers itself (the foundation of the megatron engine, issue 14): on CPU, fp32, one process."""

from __future__ import annotations

import pytest
import torch

from megatron.core import parallel_state  # a dev dependency (pip install -e ".[dev]")
from transformers import AutoModelForCausalLM

from helpers import make_model_dir, torchrun
from nemo_aligner.engines.megatron.build import build_gpt_model, cuda_placements_on_cpu
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


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])  # tied embeddings; qkv bias, untied; sliding config
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


@pytest.mark.parametrize("family", ["llama", "qwen2"])
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


def test_tensor_parallel_shards_give_each_rank_its_slice_of_the_logits(tmp_path) -> None:
    """TP=2 over gloo: megatron's column/row/vocabulary-parallel layers on the shards of the converted
    weights reproduce transformers' logits, each rank its half of the vocabulary."""
    import json

    dirs = [make_model_dir(str(tmp_path / family), family) for family in ("llama", "qwen2")]
    out = torchrun(2, "tests/distributed/megatron_checks.py", *dirs)
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["model_type"] for r in results] == ["llama", "qwen2"]
    for result in results:
        assert result["missing"] == [] and result["unexpected"] == []
        assert result["max_abs_gap"] < 1e-5, result


def test_tensor_parallel_fc1_shards_pair_each_ranks_gate_and_up_rows() -> None:
    fc1 = torch.arange(8.0)[:, None]  # gate rows 0-3, up rows 4-7
    assert tensor_parallel_shard("decoder.layers.0.mlp.linear_fc1.weight", fc1, 1, 2).flatten().tolist() == [2, 3, 6, 7]
    proj = torch.arange(4.0)[None, :]
    assert tensor_parallel_shard("decoder.layers.0.self_attention.linear_proj.weight", proj, 0, 2).tolist() == [[0, 1]]
    norm = torch.ones(3)
    assert tensor_parallel_shard("decoder.final_layernorm.weight", norm, 1, 2) is norm
