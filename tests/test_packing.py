"""Sequence packing (data/packing.py, model.data.packing): packed micro-batches give the padded rows'
log-probs, losses and gradients, and no attention or log-prob crosses a sequence boundary."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from helpers import FAMILIES, FP32, TINY_MODEL_DIR, accumulated_grads, model_cfg, pretrained, right_padded_batch, write_pairs
from nemo_aligner.config.schema import DataLoadingConfig, Precision, PretrainedCheckpointConfig, ReferenceStrategy
from nemo_aligner.data.packing import pack_micro_batch
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.types import unpack_logprobs




def _model(path: str, packing: bool, **overrides) -> GPTModel:  # noqa: ANN003
    cfg = model_cfg(**overrides)
    cfg.data = DataLoadingConfig(packing=packing, pad_to_multiple_of=8)  # type: ignore[attr-defined]  # as algorithms' have
    return GPTModel(cfg, pretrained(path), FP32)


def _sft(batch: dict[str, torch.Tensor]) -> functools.partial:
    return functools.partial(sft_loss_fn, global_num_tokens=batch["loss_mask"][:, 1:].sum())


def test_the_packed_layout_restarts_positions_and_unpacks_to_the_rows() -> None:
    batch = right_padded_batch(3, 9, 48, seed=0)
    lengths = batch["attention_mask"].sum(1).tolist()
    packed = pack_micro_batch(batch, pad_token_id=0, multiple_of=8)
    total = sum(lengths)
    assert packed["packed_input_ids"].shape == (1, -(-total // 8) * 8)
    offset = 0
    for row, length in enumerate(lengths):
        assert packed["packed_position_ids"][0, offset:offset + length].tolist() == list(range(length))
        assert torch.equal(packed["packed_input_ids"][0, offset:offset + length], batch["input_ids"][row, :length])
        offset += length
    assert packed["packed_loss_mask"][0, total:].sum() == 0 and packed["packed_position_ids"][0, total] == 0  # filler
    # unpacking puts packed target j back where its row had it
    targets = torch.arange(packed["packed_input_ids"].shape[1] - 1, dtype=torch.float32)[None] + 1
    rows = unpack_logprobs(targets, packed["unpack_index"])
    for row, length in enumerate(lengths):
        start = sum(lengths[:row])
        assert rows[row, :length - 1].tolist() == [float(start + t + 1) for t in range(length - 1)]
        assert rows[row, length - 1:].abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_micro_batches_give_the_padded_logprobs_loss_and_gradients(family: str, family_dir) -> None:
    batch = right_padded_batch(6, 11, 48, seed=1)
    results = []
    for packing in (False, True):
        model = _model(family_dir(family), packing, micro_batch_size=3, global_batch_size=6)
        logprobs = model.get_logprobs(batch)
        loss = model.forward_backward(batch, _sft(batch))["loss"]
        results.append((logprobs, loss, accumulated_grads(model)))
    (padded_lp, padded_loss, padded_grads), (packed_lp, packed_loss, packed_grads) = results
    torch.testing.assert_close(packed_lp, padded_lp, atol=1e-5, rtol=0)
    assert packed_loss.item() == pytest.approx(padded_loss.item(), abs=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_changing_one_packed_sequence_leaves_the_others_bit_identical(llama_dir: str) -> None:
    model = _model(llama_dir, packing=True, micro_batch_size=4, global_batch_size=4)
    batch = right_padded_batch(4, 10, 48, seed=2)
    before = model.get_logprobs(batch)
    changed = {k: v.clone() for k, v in batch.items()}
    length = int(changed["attention_mask"][1].sum())
    changed["input_ids"][1, :length] = (changed["input_ids"][1, :length] + 7) % 45 + 3
    after = model.get_logprobs(changed)
    assert not torch.equal(after[1], before[1])
    for row in (0, 2, 3):
        assert torch.equal(after[row], before[row]), row


def test_packing_is_refused_for_a_family_not_known_to_keep_sequences_apart() -> None:
    cfg = model_cfg()
    cfg.data = DataLoadingConfig(packing=True)  # type: ignore[attr-defined]
    olmo = PretrainedCheckpointConfig(restore_from_path=None, tokenizer_path=TINY_MODEL_DIR,
                                      model_config=dict(model_type="olmo", vocab_size=48, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"model.data.packing=true is not supported for model_type 'olmo'"):
        GPTModel(cfg, olmo, FP32)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "rpo_sq", "rpo_fwd_kl", "rpo_bwd_kl"])
def test_every_dpo_loss_gives_the_padded_metrics_when_packed(loss: str, llama_dir: str, tmp_path, monkeypatch) -> None:
    """Two DPO steps (reference precomputed through the packed path too) per loss, every logged metric."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "distributed"))
    from layout_checks import dpo_steps

    data = write_pairs(str(tmp_path / "pairs.jsonl"), 12)
    padded, packed = (dpo_steps(llama_dir, data, 1, Precision.fp32, reference=ReferenceStrategy.precomputed,
                                packing=packing, loss=loss) for packing in (False, True))
    for name in padded[0]:
        torch.testing.assert_close(torch.tensor([m[name] for m in packed]), torch.tensor([m[name] for m in padded]),
                                   atol=2e-6, rtol=1e-5, msg=name)


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):  # noqa: ANN001, ANN202
    """What torch.nn.attention.varlen.varlen_attn computes (causal attention within each sequence), on CPU;
    as torch >= 2.12's kernel, which shares key/value heads itself under enable_gqa."""
    longest = int((cu_q[1:] - cu_q[:-1]).max())
    assert window_size[1] == 0 and (window_size[0] == -1 or window_size[0] >= longest)  # causal; no window bites here
    assert cu_q is cu_k and max_q >= longest
    out = torch.zeros_like(q)
    for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        if end > start:
            piece = torch.nn.functional.scaled_dot_product_attention(
                *(t[start:end].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scale, enable_gqa=enable_gqa)
            out[start:end] = piece.transpose(0, 1)
    return out


def _reference_varlen_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale, window_size):  # noqa: ANN001, ANN202
    """torch 2.11's kernel: no enable_gqa, so keys and values must come with as many heads as the queries."""
    assert q.shape[1] == k.shape[1] == v.shape[1]
    return _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size, enable_gqa=False)


@pytest.mark.parametrize("kernel", [_reference_varlen, _reference_varlen_without_gqa])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_the_cuda_varlen_attention_path_gives_the_padded_logprobs(family: str, kernel, family_dir, monkeypatch) -> None:  # noqa: ANN001
    """The torch_varlen implementation (CUDA's varlen flash attention for packed rows), its kernel replaced
    by a per-sequence reference with either torch version's signature: the packed row's sequence bounds,
    layouts and GQA reach it correctly, and an unpacked batch still takes SDPA."""
    from transformers import AutoModelForCausalLM

    from nemo_aligner.engines.torch_native import varlen_attention
    from nemo_aligner.engines.torch_native.scoring import batch_logprobs

    monkeypatch.setattr(varlen_attention, "_varlen_kernel", lambda: kernel)
    varlen_attention._kernel_takes_gqa.cache_clear()
    varlen_attention.register_varlen_attention()
    path = family_dir(family)
    models = {impl: AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=torch.float32).eval()
              for impl in ("sdpa", varlen_attention.VARLEN)}
    batch = right_padded_batch(4, 13, 48, seed=5)
    score = functools.partial(batch_logprobs, tp_group=None, tp_rank=0, tp_size=1, chunk_size=7)
    padded = score(models["sdpa"], models["sdpa"].config, batch)
    packed = pack_micro_batch(batch, pad_token_id=0, multiple_of=8)
    torch.testing.assert_close(score(models[varlen_attention.VARLEN], models["sdpa"].config, packed), padded,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(score(models[varlen_attention.VARLEN], models["sdpa"].config, batch), padded,
                               atol=1e-6, rtol=0)
    varlen_attention._kernel_takes_gqa.cache_clear()


def test_packed_rows_of_new_lengths_compile_nothing_new_after_the_second(llama_dir: str) -> None:
    """Packed rows change length with every batch; compiled layers turn dynamic at the second length, so a
    run compiles a bounded number of graphs, not one per length."""
    import torch._dynamo

    model = _model(llama_dir, packing=True, torch_compile=True, micro_batch_size=2, global_batch_size=2)

    def unpadded(width: int) -> dict[str, torch.Tensor]:  # two rows of `width` real tokens: a packed row of 2 x width
        batch = right_padded_batch(2, width, 48, seed=width)
        return {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}

    torch._dynamo.utils.counters.clear()
    for width in (8, 12):
        model.get_logprobs(unpadded(width))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1  # the layers did compile (static, then dynamic at the second length)
    for width in (16, 20, 28):
        model.get_logprobs(unpadded(width))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_packing_null_resolves_on_where_it_is_faster() -> None:
    """model.data.packing: null is on with CUDA in bf16 for the families that keep packed sequences
    apart (variable-length flash attention), off on CPU (a dense document mask), in fp32 (no flash
    kernel) and for other families; an explicit value stands, true only where it is supported."""
    from transformers import AutoConfig

    from nemo_aligner.config.schema import Precision
    from nemo_aligner.engines.torch_native.layout import resolve_packing

    llama, olmo = AutoConfig.for_model("llama"), AutoConfig.for_model("olmo")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_packing(llama, None, cuda, Precision.bf16) and resolve_packing(llama, None, cuda, Precision.bf16_pure)
    assert not resolve_packing(llama, None, cpu, Precision.bf16)
    assert not resolve_packing(llama, None, cuda, Precision.fp32)
    assert not resolve_packing(olmo, None, cuda, Precision.bf16)
    assert resolve_packing(llama, True, cpu, Precision.fp32) and not resolve_packing(llama, False, cuda, Precision.bf16)
    with pytest.raises(ValueError, match="model.data.packing=true is not supported for model_type 'olmo'"):
        resolve_packing(olmo, True, cuda, Precision.bf16)


def test_the_cpu_default_resolves_packing_off_for_the_data_loaders(llama_dir: str) -> None:
    """The engine resolves null where the device is known and writes the result back, so the loaders
    built after the model (the entry scripts' order) read a plain boolean."""
    cfg = model_cfg()
    cfg.data = DataLoadingConfig()  # type: ignore[attr-defined]
    assert cfg.data.packing is None  # type: ignore[attr-defined]
    GPTModel(cfg, pretrained(llama_dir), FP32)
    assert cfg.data.packing is False  # type: ignore[attr-defined]
