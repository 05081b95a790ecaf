"""Generation: greedy equals transformers' own decode; sampling filters; EOS and min_length."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FP32, model_cfg, pretrained
from nemo_aligner.types import LengthParams, SamplingParams
from nemo_aligner.engines.torch_native.generation import generate, sample_next_token
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel

PROMPTS = [[1, 5, 9, 13, 4, 22], [1, 30], [1, 7, 7, 40], [1, 11, 12]]


def _left_padded(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    return ids, mask


@pytest.fixture(scope="module")
def policy(llama_dir: str) -> GPTModel:
    return GPTModel(model_cfg(), pretrained(llama_dir), FP32)


def _hf_greedy(path: str, ids: torch.Tensor, mask: torch.Tensor, *, eos: int, pad: int, new: int) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=eos,
                       pad_token_id=pad)


def test_greedy_equals_transformers_generate_on_mixed_length_prompts(policy: GPTModel, llama_dir: str) -> None:
    pad = policy.tokenizer.pad_token_id
    ids, mask = _left_padded(pad)
    ours = policy.generate(ids, mask, SamplingParams(use_greedy=True), LengthParams(max_length=7))
    # Make EOS a token the model actually emits mid-sequence, so rows stop at different steps.
    eos = int(ours.tokens[0, ids.shape[1] + 2])
    ours = generate(policy.engine.module, ids, mask, sampling=SamplingParams(use_greedy=True), length=LengthParams(max_length=7),
                    eos_token_id=eos, pad_token_id=pad, generator=None, dp_group=None)
    reference = _hf_greedy(llama_dir, ids, mask, eos=eos, pad=pad, new=7)
    assert torch.equal(ours.tokens, reference)
    assert ours.prompt_lengths.tolist() == [len(p) for p in PROMPTS]
    responses = ours.tokens[:, ids.shape[1]:]
    for row, n in enumerate(ours.response_lengths.tolist()):
        assert 1 <= n <= 7
        ended = responses[row, n - 1].item() == eos
        assert ended or n == 7
        assert (responses[row, n:] == pad).all()  # nothing after EOS but padding
    assert ours.response_lengths.min() < 7 < ours.response_lengths.max() + 1  # some row stopped early


def test_min_length_suppresses_eos(policy: GPTModel) -> None:
    pad = policy.tokenizer.pad_token_id
    ids, mask = _left_padded(pad)
    first = generate(policy.engine.module, ids, mask, sampling=SamplingParams(use_greedy=True), length=LengthParams(max_length=1),
                     eos_token_id=0, pad_token_id=pad, generator=None, dp_group=None).tokens[:, -1]
    eos = int(first[0])
    out = generate(policy.engine.module, ids, mask, sampling=SamplingParams(use_greedy=True),
                   length=LengthParams(max_length=5, min_length=3), eos_token_id=eos, pad_token_id=pad,
                   generator=None, dp_group=None)
    assert (out.tokens[:, ids.shape[1]: ids.shape[1] + 3] != eos).all()


def test_sampling_is_reproducible_and_top_k_1_is_greedy(policy: GPTModel) -> None:
    ids, mask = _left_padded(policy.tokenizer.pad_token_id)
    greedy = policy.generate(ids, mask, SamplingParams(use_greedy=True), LengthParams(max_length=6)).tokens
    topk1 = policy.generate(ids, mask, SamplingParams(temperature=0.7, top_k=1), LengthParams(max_length=6)).tokens
    assert torch.equal(greedy, topk1)
    calls = policy.engine.generation_calls
    hot = SamplingParams(temperature=1.5)
    first = policy.generate(ids, mask, hot, LengthParams(max_length=6)).tokens
    policy.engine.generation_calls = calls  # same seed, same call index -> same samples
    assert torch.equal(first, policy.generate(ids, mask, hot, LengthParams(max_length=6)).tokens)


def test_sample_next_token_filters_and_draws_from_the_softmax() -> None:
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0, 3.8]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    noise = lambda: torch.rand(logits.shape, generator=gen)  # noqa: E731
    top2 = sample_next_token(logits, SamplingParams(top_k=2), noise())
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_next_token(logits, SamplingParams(top_p=0.3), noise())
    assert set(nucleus.tolist()) == {0}  # token 0 alone holds > 0.3 of the mass
    wide = sample_next_token(logits, SamplingParams(top_p=0.9), noise())
    assert set(wide.tolist()) == {0, 1, 4}
    assert (sample_next_token(logits, SamplingParams(use_greedy=True), None) == 0).all()
    hot = SamplingParams(temperature=2.0)
    drawn = torch.bincount(sample_next_token(logits, hot, noise()), minlength=5).float() / len(logits)
    torch.testing.assert_close(drawn, torch.softmax(logits[0] / 2.0, dim=-1), atol=0.025, rtol=0)


def test_generation_passes_the_kv_cache_the_way_this_transformers_version_expects(policy: GPTModel) -> None:
    """No deprecated cache argument (transformers 5.x renamed past_key_values to cache): no FutureWarning."""
    ids, mask = _left_padded(policy.tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = policy.generate(ids, mask, SamplingParams(use_greedy=True), LengthParams(max_length=3, min_length=3))
    assert out.tokens.shape == (len(PROMPTS), ids.shape[1] + 3)


def test_checking_for_finished_rows_less_often_changes_no_output(policy: GPTModel, monkeypatch) -> None:
    """The finished check runs every FINISHED_CHECK_INTERVAL steps (a host sync each); the extra steps after
    the last EOS are cut off, so tokens and lengths equal a check after every step. Row r is made to emit
    EOS at its step r + 2 (a scripted sampler), so every row finishes early, each at another step."""
    import nemo_aligner.engines.torch_native.generation as generation

    ids, mask = _left_padded(policy.tokenizer.pad_token_id)
    eos, pad, steps = 40, policy.tokenizer.pad_token_id, iter(range(1000))

    def scripted(logits: torch.Tensor, sampling: SamplingParams, uniform: torch.Tensor | None) -> torch.Tensor:
        step = next(steps)
        return torch.tensor([eos if step == row + 2 else 5 for row in range(logits.shape[0])])

    monkeypatch.setattr(generation, "sample_next_token", scripted)
    outputs = []
    for interval in (1, 8):
        steps = iter(range(1000))
        monkeypatch.setattr(generation, "FINISHED_CHECK_INTERVAL", interval)
        out = generate(policy.engine.module, ids, mask, sampling=SamplingParams(use_greedy=True),
                       length=LengthParams(max_length=20), eos_token_id=eos, pad_token_id=pad, generator=None,
                       dp_group=None)
        outputs.append(out)
    assert torch.equal(outputs[0].tokens, outputs[1].tokens)
    assert outputs[0].response_lengths.tolist() == [3, 4, 5, 6][: ids.shape[0]]
    assert outputs[1].tokens.shape[1] == ids.shape[1] + ids.shape[0] + 2  # ends with the longest response


def test_the_compiled_decode_step_gives_the_eager_tokens_and_is_compiled_once(policy: GPTModel, llama_dir: str) -> None:
    """The decode step compiled for CUDA graphs (on CPU: compiled, graphs skipped) decodes what the eager
    step and transformers decode, against a static cache that a later call of the same shape reuses:
    a second call, and prompts of another length within the same cache size, compile nothing new."""
    import torch._dynamo

    from nemo_aligner.engines.torch_native.generation import Decoder

    pad = policy.tokenizer.pad_token_id
    ids, mask = _left_padded(pad)
    module = policy.engine.module
    compiled = Decoder(module, cuda_graphs=True)
    torch._dynamo.utils.counters.clear()
    run = lambda ids, mask, decoder: generate(  # noqa: E731
        module, ids, mask, sampling=SamplingParams(use_greedy=True), length=LengthParams(max_length=7),
        eos_token_id=40, pad_token_id=pad, generator=None, dp_group=None, decoder=decoder)
    first = run(ids, mask, compiled)
    assert torch.equal(first.tokens, run(ids, mask, Decoder(module, cuda_graphs=False)).tokens)
    assert torch.equal(first.tokens, _hf_greedy(llama_dir, ids, mask, eos=40, pad=pad, new=7)[:, : first.tokens.shape[1]])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1
    assert torch.equal(run(ids, mask, compiled).tokens, first.tokens)
    shorter = run(ids[:, 1:], mask[:, 1:], compiled)  # the longest prompt loses its first token: same cache size
    assert torch.equal(shorter.tokens[1:], run(ids[1:, 1:], mask[1:, 1:], Decoder(module, cuda_graphs=False)).tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_generation_bytes_per_row_count_the_static_cache_and_the_sampling_buffers() -> None:
    """Per row: layers x (keys, values) x this rank's key/value heads x head size x the cache positions
    (the torch_native engine rounds them up as its CUDA-graphed Decoder sizes them) x bytes, plus 4 fp32
    vocabulary-sized sampling buffers."""
    from transformers import AutoConfig

    from nemo_aligner.engines.decoding import generation_bytes_per_row
    from nemo_aligner.engines.torch_native.generation import cache_length

    config = AutoConfig.for_model("qwen2", num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                  hidden_size=896, vocab_size=151936)
    assert cache_length(300) == 384
    assert generation_bytes_per_row(config, 384, compute_bytes=2, tp=1) == 24 * 2 * 2 * 64 * 384 * 2 + 4 * 151936 * 4
    assert generation_bytes_per_row(config, 300, compute_bytes=2, tp=2) == 24 * 2 * 1 * 64 * 300 * 2 + 4 * 151936 * 4


def test_rollouts_come_in_chunks_of_the_rows_that_fit(policy: GPTModel, monkeypatch) -> None:
    """micro_batch_size None: chunks of as many prompts as the engine says fit (all of them where memory
    is no limit), with the same responses as explicit chunks of that size (greedy); the fraction and
    the longest prompt plus the new tokens reach the engine."""
    prompts = [torch.tensor(p) for p in PROMPTS] * 2
    calls, asked = [], []
    real_generate = policy.engine.generate
    monkeypatch.setattr(policy.engine, "generate", lambda ids, *a: calls.append(ids.shape[0]) or real_generate(ids, *a))
    greedy, length = SamplingParams(use_greedy=True), LengthParams(max_length=4)
    respond = lambda size: policy.generate_responses(prompts, greedy, length, micro_batch_size=size,  # noqa: E731
                                                     memory_fraction=0.3, offload_optimizer=False)
    everything = respond(None)
    assert calls == [8]  # CPU: memory is no limit
    monkeypatch.setattr(policy.engine, "generation_rows_that_fit", lambda positions, fraction: asked.append(
        (positions, fraction)) or 3)
    calls.clear()
    chunked = respond(None)
    assert calls == [3, 3, 2] and asked == [(6 + 4, 0.3)]
    calls.clear()
    assert all(torch.equal(a, b) for a, b in zip(chunked, respond(3))) and calls == [3, 3, 2]
    assert all(torch.equal(a, b) for a, b in zip(chunked, everything))


def test_compacting_finished_rows_away_changes_no_output(policy: GPTModel, monkeypatch) -> None:
    """When at most half of the rows still run, they move to a cache half as large (or smaller): the
    tokens and lengths are those of decoding every row to the end, and the later steps do run smaller
    batches. Rows finish by their own content: greedy, with the tokens some rows emit at their second
    step turned into EOS, so most rows (not all) end early, at different steps."""
    import nemo_aligner.engines.torch_native.generation as generation

    pad, eos = policy.tokenizer.pad_token_id, 47
    prompts = PROMPTS + [[1, 2 + i, 9, 3 * i + 5] for i in range(8)]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    run = lambda: generate(policy.engine.module, ids, mask, sampling=SamplingParams(use_greedy=True),  # noqa: E731
                           length=LengthParams(max_length=12), eos_token_id=eos, pad_token_id=pad, generator=None,
                           dp_group=None)
    monkeypatch.setattr(generation, "FINISHED_CHECK_INTERVAL", 1)
    stoppers = {int(t) for t in run().tokens[:9, width + 1]} - {eos}
    greedy_stopping = lambda logits, *_: torch.where(  # noqa: E731
        torch.isin(logits.argmax(-1), torch.tensor(sorted(stoppers))), eos, logits.argmax(-1))
    monkeypatch.setattr(generation, "sample_next_token", greedy_stopping)
    monkeypatch.setattr(generation, "MIN_COMPACTED_ROWS", 10**6)
    plain = run()
    assert len(prompts) // 2 < (plain.response_lengths <= 4).sum() and (plain.response_lengths == 12).any()
    monkeypatch.setattr(generation, "MIN_COMPACTED_ROWS", 2)
    sizes = []
    real_step = generation.Decoder.step
    monkeypatch.setattr(generation.Decoder, "step", lambda self, cache, tokens, *a: sizes.append(tokens.shape[0])
                        or real_step(self, cache, tokens, *a))
    compacted = run()
    assert torch.equal(compacted.tokens, plain.tokens)
    assert torch.equal(compacted.response_lengths, plain.response_lengths)
    assert sizes and max(sizes) < len(prompts) // 2  # compacted after the first token, from 12 rows to 3


def test_compaction_changes_no_sampled_token_either(policy: GPTModel, monkeypatch) -> None:
    """Sampling draws each row's noise by its original row, so rows that remain after compaction sample
    what they would have sampled in the full batch. Half of the vocabulary is read as EOS, so rows end
    at random early steps and the batch is compacted."""
    import nemo_aligner.engines.torch_native.generation as generation

    pad, eos = policy.tokenizer.pad_token_id, 47
    prompts = PROMPTS + [[1, 2 + i, 9, 3 * i + 5] for i in range(8)]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    real_sampler = generation.sample_next_token
    monkeypatch.setattr(generation, "sample_next_token", lambda logits, sampling, uniform: (
        lambda token: torch.where(token % 2 == 1, eos, token))(real_sampler(logits, sampling, uniform)))
    monkeypatch.setattr(generation, "FINISHED_CHECK_INTERVAL", 1)
    outputs, sizes = [], []
    real_step = generation.Decoder.step
    monkeypatch.setattr(generation.Decoder, "step", lambda self, cache, tokens, *a: sizes.append(tokens.shape[0])
                        or real_step(self, cache, tokens, *a))
    for smallest in (10**6, 2):
        monkeypatch.setattr(generation, "MIN_COMPACTED_ROWS", smallest)
        outputs.append(generate(policy.engine.module, ids, mask, sampling=SamplingParams(temperature=3.0),
                                length=LengthParams(max_length=12), eos_token_id=eos, pad_token_id=pad,
                                generator=torch.Generator().manual_seed(5), dp_group=None))
    assert torch.equal(outputs[0].tokens, outputs[1].tokens)
    assert torch.equal(outputs[0].response_lengths, outputs[1].response_lengths)
    assert min(sizes) < len(prompts) // 2 and outputs[0].response_lengths.max() > 2  # compacted, not all at once


@pytest.mark.parametrize("boolean_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_grouped_attention_equals_attention_over_repeated_key_value_heads(boolean_mask: bool,
                                                                                  dtype: torch.dtype) -> None:
    """A decode step's query heads folded onto their shared key/value head give what SDPA gives over key and
    value heads repeated per query head (transformers' repeat_kv), padding masked; in bf16, what fp32
    attention over the same bf16 inputs gives, to the output's rounding (the scores are not rounded)."""
    from nemo_aligner.engines.torch_native.decode_attention import grouped_one_token_attention

    gen = torch.Generator().manual_seed(0)
    query, key, value = (4 * torch.randn(3, heads, length, 8, generator=gen) for heads, length in ((6, 1), (2, 10), (2, 10)))
    query, key, value = (t.to(dtype) for t in (query, key, value))
    attend = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    attend[0, ..., :4] = False  # a left-padded row
    attend[2, ..., 7:] = False  # cache positions not written yet
    mask = attend if boolean_mask else torch.zeros(attend.shape).masked_fill(~attend, float("-inf"))
    repeated = [t.float().repeat_interleave(3, dim=1) for t in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query.float(), *repeated, attn_mask=mask, scale=0.3)
    out = grouped_one_token_attention(query, key, value, mask.to(dtype) if not boolean_mask else mask, scaling=0.3)
    assert out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.transpose(1, 2), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("implementation", ["sdpa_grouped_decode", "torch_varlen"])
def test_decoding_takes_the_grouped_path_and_gives_the_sdpa_tokens(llama_dir: str, implementation: str,
                                                                   monkeypatch) -> None:
    """A model built with the default attention (sdpa_grouped_decode) or the packing one (torch_varlen, what
    bf16 engines on CUDA use) decodes greedily what the SDPA model decodes, its one-token steps through
    grouped_one_token_attention."""
    from nemo_aligner.engines.torch_native import decode_attention, varlen_attention

    decode_attention.register_grouped_decode_attention()
    varlen_attention.register_varlen_attention()
    calls = []
    folded = decode_attention.grouped_one_token_attention
    monkeypatch.setattr(decode_attention, "grouped_one_token_attention", lambda *a, **k: calls.append(1) or folded(*a, **k))
    models = {impl: AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation=impl)
              for impl in ("sdpa", implementation)}
    ids, mask = _left_padded(0)
    run = lambda impl: generate(models[impl], ids, mask, sampling=SamplingParams(use_greedy=True),  # noqa: E731
                                length=LengthParams(max_length=6), eos_token_id=99, pad_token_id=0, generator=None,
                                dp_group=None)
    assert torch.equal(run(implementation).tokens, run("sdpa").tokens)
    assert len(calls) == 5 * models["sdpa"].config.num_hidden_layers  # every decode step after the prefill
