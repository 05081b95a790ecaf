"""The embedded tiny default (examples/tiny): task, shipped tokenizer, model and data, and determinism."""

from __future__ import annotations

import json
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # plain `pytest` puts tests/, not the repository root, on the path
    sys.path.insert(0, str(REPO))

from examples.tiny.build_tiny import DATA_SEED  # noqa: E402
from examples.tiny.evaluate import evaluate_accuracy  # noqa: E402
from examples.tiny.make_data import SPLIT_SIZES, generate_datasets, prompt_of  # noqa: E402
from examples.tiny.task import answer_of, exact_match_reward, is_correct, make_problem, wrong_answer  # noqa: E402

TINY = REPO / "examples" / "tiny"
MODEL_DIR = TINY / "model"
DATA_DIR = TINY / "data"
SPLIT_KEYS = {
    "sft": {"input", "output"},
    "test": {"input", "output"},
    "preference": {"prompt", "chosen_response", "rejected_response"},
    "prompts": {"text"},
}
NUMBER = re.compile(r"0|[1-9]\d*")


def _read(split: str) -> list[dict[str, str]]:
    with (DATA_DIR / f"{split}.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Greedy decoding of a tiny model is fastest, and immune to a busy core, on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _spans_boundary(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str) -> bool:
    """Whether tokenising ``prompt + response`` in one piece gives a token that crosses the join."""
    offsets = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return any(start < len(prompt) < end for start, end in offsets)


# ---- task ----------------------------------------------------------------------------------


def test_is_correct_strips_whitespace_only() -> None:
    assert is_correct(" 357\n", "357")
    assert not is_correct("358", "357")
    assert not is_correct("0357", "357")
    assert not is_correct("35 7", "357")


def test_exact_match_reward_parses_the_prompt() -> None:
    assert exact_match_reward("12+345=", "357") == 1.0
    assert exact_match_reward("12+345=", " 357 ") == 1.0
    assert exact_match_reward("12+345=", "356") == 0.0
    assert exact_match_reward("999-1=", "998") == 1.0
    assert exact_match_reward("7-7=", "0") == 1.0
    assert exact_match_reward("<s>Q:12+3=\nA:", "15") == 1.0  # chat-rendered prompt
    with pytest.raises(ValueError, match="no arithmetic problem"):
        exact_match_reward("hello", "1")


def test_make_problem_format_and_answer() -> None:
    rng = random.Random(0)
    for _ in range(500):
        prompt, answer = make_problem(rng)
        assert re.fullmatch(r"\d{1,3}[+-]\d{1,3}=", prompt), prompt
        assert NUMBER.fullmatch(answer), answer
        assert answer_of(prompt) == answer


@pytest.mark.parametrize("answer", ["0", "1", "9", "10", "99", "100", "357", "1000", "1998"])
def test_wrong_answer_is_plausible_and_wrong(answer: str) -> None:
    rng = random.Random(answer)
    for _ in range(50):
        wrong = wrong_answer(answer, rng)
        assert wrong != answer
        assert NUMBER.fullmatch(wrong), wrong
        assert abs(len(wrong) - len(answer)) <= 1
    assert wrong_answer(answer, random.Random(1)) == wrong_answer(answer, random.Random(1))


# ---- shipped data --------------------------------------------------------------------------


def test_data_files_parse_with_their_keys_and_correct_answers() -> None:
    for split, size in SPLIT_SIZES.items():
        records = _read(split)
        assert len(records) == size, split
        for record in records:
            assert set(record) == SPLIT_KEYS[split.rsplit("_", 1)[0]], (split, record)
            assert all(isinstance(value, str) for value in record.values())
            if "output" in record:
                assert exact_match_reward(record["input"], record["output"]) == 1.0
            if "chosen_response" in record:
                assert exact_match_reward(record["prompt"], record["chosen_response"]) == 1.0
                assert record["rejected_response"] != record["chosen_response"]


def test_data_splits_are_disjoint() -> None:
    prompts = {split: [prompt_of(record) for record in _read(split)] for split in SPLIT_SIZES}
    all_prompts = [prompt for split_prompts in prompts.values() for prompt in split_prompts]
    assert len(set(all_prompts)) == len(all_prompts)


def test_generate_datasets_is_deterministic_and_matches_shipped_files() -> None:
    first, second = generate_datasets(DATA_SEED), generate_datasets(DATA_SEED)  # the build's default seed
    assert first == second
    assert generate_datasets(DATA_SEED + 1) != first
    assert {split: _read(split) for split in SPLIT_SIZES} == first


# ---- shipped tokenizer and model -----------------------------------------------------------


def test_tokenizer_special_tokens_and_round_trip(tokenizer: PreTrainedTokenizerBase) -> None:
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.padding_side == "right"
    for record in _read("test")[:100]:
        text = record["input"] + record["output"]
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_has_merges_across_the_prompt_response_boundary(tokenizer: PreTrainedTokenizerBase) -> None:
    assert tokenizer.convert_ids_to_tokens(tokenizer("5+5=10", add_special_tokens=False)["input_ids"]) == [
        "5", "+", "5", "=10",
    ]  # fmt: skip
    assert tokenizer("10", add_special_tokens=False)["input_ids"] == tokenizer.convert_tokens_to_ids(["1", "0"])
    assert _spans_boundary(tokenizer, "5+5=", "10")
    crossing = [r for r in _read("test") if _spans_boundary(tokenizer, r["input"], r["output"])]
    assert len(crossing) > 100


def test_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "5+5="}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == "<s>Q:5+5=\nA:"
    messages.append({"role": "assistant", "content": "10"})
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "<s>Q:5+5=\nA:10</s>\n"


def test_model_config_fits_tensor_parallel_two(tokenizer: PreTrainedTokenizerBase) -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    config = model.config
    assert config.model_type == "llama"
    assert config.vocab_size == len(tokenizer)
    for size in (config.vocab_size, config.num_attention_heads, config.num_key_value_heads, config.intermediate_size):
        assert size % 2 == 0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_shipped_model_is_imperfect(tokenizer: PreTrainedTokenizerBase, one_thread: None) -> None:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
    accuracy = evaluate_accuracy(model, tokenizer, _read("test")[:200], batch_size=50)
    assert 0.1 < accuracy < 0.9
