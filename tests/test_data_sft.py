"""SFT data: both record forms, every bad line at once, the response budget, and the SFT/prompt/pair batches."""

from __future__ import annotations

import logging

import pytest
import torch
from test_data_preference import BOS, EOS, PAD, _ids, _make_tokenizer, _write
from transformers import PreTrainedTokenizerBase

from nemo_aligner.data.collate import pair_collate, prompt_collate, sft_collate
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.length_policy import LengthPolicy, LengthStats
from nemo_aligner.data.sft import SFTDataset
from nemo_aligner.data.tokenization import render_prompt


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return _make_tokenizer()


def _dataset(path: str, tokenizer: PreTrainedTokenizerBase, max_seq_length: int = 64,
             policy: LengthPolicy = LengthPolicy.truncate_prompt_left, response_budget: int = 0) -> SFTDataset:
    return SFTDataset(path, tokenizer, max_seq_length=max_seq_length, length_policy=policy,
                      response_budget=response_budget)


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is the cat?"},
        {"role": "assistant", "content": "the cat sat."}]


# --- the dataset ----------------------------------------------------------------------------------


def test_input_output_and_messages_forms(tmp_path, tokenizer):
    path = _write(tmp_path, [{"input": "where is the", "output": " cat?"}, {"messages": CHAT}], "sft.jsonl")
    data = _dataset(path, tokenizer)
    assert len(data) == 2 and data.stats == LengthStats(total=2, kept=2, truncated=0, dropped=0)
    plain, chat = data[0], data[1]
    assert set(plain) == {"prompt_ids", "response_ids"} and plain["prompt_ids"].dtype == torch.long
    assert plain["prompt_ids"].tolist() == _ids(tokenizer, "where is the", special=True)
    assert plain["response_ids"].tolist() == _ids(tokenizer, " cat?", special=False) + [EOS]
    # the chat's prompt is every message but the last, with the template's generation prompt
    prompt_text = render_prompt(CHAT[:-1], tokenizer)[0]
    assert prompt_text == "<s>system: be brief\nuser: where is the cat?\nassistant:"
    assert chat["prompt_ids"].tolist() == _ids(tokenizer, prompt_text, special=False)
    assert chat["response_ids"].tolist() == _ids(tokenizer, "the cat sat.", special=False) + [EOS]
    assert chat["response_ids"].dtype == torch.long


def test_every_bad_line_is_named_by_file_line_and_field(tmp_path, tokenizer):
    user = {"role": "user", "content": "hi"}
    records = [
        {"input": "a", "output": "b"},  # good
        {"input": "a", "output": "b", "messages": [user, {"role": "assistant", "content": "c"}]},  # both forms
        {"note": "neither"},
        {"messages": [{"role": "assistant", "content": "c"}, user]},  # last message not assistant
        {"input": "a", "output": ""},
        {"input": 3, "output": "b"},
        {"messages": "hi"},
        {"input": "a"},
        {"output": "b"},
        {"messages": [{"role": "assistant", "content": "c"}]},  # no prompt before the response
        {"messages": [user, {"role": "assistant", "content": ""}]},
        {"messages": [user, {"role": "assistant", "content": 5}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},  # good
    ]
    path = _write(tmp_path, records, "sft.jsonl")
    with pytest.raises(DataFormatError) as err:
        _dataset(path, tokenizer)
    message = str(err.value)
    assert message.startswith(f"{path}: 11 problem(s)")
    for expected in (f"{path}:2: field 'messages': given together with 'input' and 'output'",
                     f"{path}:3: field 'input': missing, and so is 'messages'",
                     f"{path}:4: field 'messages': the last message must be the assistant's response, got role 'user'",
                     f"{path}:5: field 'output': empty string",
                     f"{path}:6: field 'input': expected a string, got a number",
                     f"{path}:7: field 'messages': expected a list of {{role, content}} messages, got a string",
                     f"{path}:8: field 'output': missing (required with 'input'",
                     f"{path}:9: field 'input': missing (required with 'output'",
                     f"{path}:10: field 'messages': no prompt",
                     f"{path}:11: field 'messages': the assistant's response (the last message) is an empty string",
                     f"{path}:12: field 'messages': message 1: 'content' must be a string"):
        assert expected in message
    assert f"{path}:1:" not in message and f"{path}:13:" not in message


def test_chat_without_a_template_names_file_line_and_field(tmp_path):
    path = _write(tmp_path, [{"input": "a", "output": "b"}, {"messages": CHAT}], "sft.jsonl")
    with pytest.raises(DataFormatError, match=rf"{path}:2: field 'messages': cannot render it .*no chat template"):
        _dataset(path, _make_tokenizer(chat_template=None))


# --- the response budget --------------------------------------------------------------------------

# prompt "where is the" is 8 tokens and " cat?" 3 + EOS: 12 tokens, so it fits max_seq_length=12
# as it is, but not with room for a generated response of 6 tokens (8 + 6 > 12).
BUDGET_RECORDS = [{"input": "where", "output": " cat?"}, {"input": "where is the", "output": " cat?"}]


def test_budget_truncates_a_prompt_that_fits_only_its_own_response(tmp_path, tokenizer, caplog):
    path = _write(tmp_path, BUDGET_RECORDS, "sft.jsonl")
    full = _ids(tokenizer, "where is the", special=True)
    assert len(full) + len(_ids(tokenizer, " cat?", special=False)) + 1 == 12
    assert _dataset(path, tokenizer, max_seq_length=12).stats == LengthStats(total=2, kept=2, truncated=0, dropped=0)
    with caplog.at_level(logging.INFO, logger="nemo_aligner.data.length_policy"):
        data = _dataset(path, tokenizer, max_seq_length=12, response_budget=6)
    assert data.stats == LengthStats(total=2, kept=2, truncated=1, dropped=0)
    assert data[0]["prompt_ids"].tolist() == _ids(tokenizer, "where", special=True)
    assert data[1]["prompt_ids"].tolist() == [BOS] + full[-5:]  # 6 tokens: room for the 6-token budget
    assert data[1]["response_ids"].tolist() == _ids(tokenizer, " cat?", special=False) + [EOS]
    assert (f"{path}: 2 examples, 1 truncated (prompt cut from the left), 0 dropped (longer than "
            f"max_seq_length=12 with a response of at least 6 tokens)") in caplog.text


def test_budget_drops_under_the_drop_policy_and_the_longer_response_decides(tmp_path, tokenizer):
    path = _write(tmp_path, BUDGET_RECORDS, "sft.jsonl")
    data = _dataset(path, tokenizer, max_seq_length=12, policy=LengthPolicy.drop, response_budget=6)
    assert data.stats == LengthStats(total=2, kept=1, truncated=0, dropped=1)
    assert len(data) == 1 and data[0]["prompt_ids"].tolist() == _ids(tokenizer, "where", special=True)
    # a budget shorter than the actual response changes nothing: the actual response decides
    small = _dataset(path, tokenizer, max_seq_length=12, policy=LengthPolicy.drop, response_budget=2)
    assert small.stats == LengthStats(total=2, kept=2, truncated=0, dropped=0)


def test_nothing_left_names_the_budget(tmp_path, tokenizer):
    path = _write(tmp_path, BUDGET_RECORDS[1:], "sft.jsonl")
    with pytest.raises(ValueError, match=r"all 1 examples are longer than max_seq_length=12 \(with response_budget=6\) "
                                         r"under length_policy=drop"):
        _dataset(path, tokenizer, max_seq_length=12, policy=LengthPolicy.drop, response_budget=6)


@pytest.mark.parametrize(("max_seq_length", "budget"), [(12, -1), (12, 12), (1, 0)])
def test_bad_limits_are_rejected(tmp_path, tokenizer, max_seq_length, budget):
    with pytest.raises(ValueError, match="max_seq_length"):
        _dataset(_write(tmp_path, BUDGET_RECORDS, "sft.jsonl"), tokenizer, max_seq_length=max_seq_length,
                 response_budget=budget)


# --- collate --------------------------------------------------------------------------------------


def test_sft_collate_masks_the_response_and_pads_right():
    examples = [{"prompt_ids": [BOS, 10, 11], "response_ids": [20, EOS]},
                {"prompt_ids": torch.tensor([BOS, 12]), "response_ids": torch.tensor([21, 22, 23, EOS])},
                {"prompt_ids": [BOS], "response_ids": [EOS]}]
    batch = sft_collate(examples, pad_token_id=PAD)
    rows, prompt_lens = [[BOS, 10, 11, 20, EOS], [BOS, 12, 21, 22, 23, EOS], [BOS, EOS]], [3, 2, 1]
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask"} and batch["input_ids"].shape == (3, 6)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.float32
    for r, (row, p) in enumerate(zip(rows, prompt_lens)):
        pad = 6 - len(row)
        assert batch["input_ids"][r].tolist() == row + [PAD] * pad
        assert batch["attention_mask"][r].tolist() == [1] * len(row) + [0] * pad
        assert batch["loss_mask"][r].tolist() == [0.0] * p + [1.0] * (len(row) - p) + [0.0] * pad
        assert batch["input_ids"][r][batch["loss_mask"][r].bool()].tolist() == row[p:]
    padded = sft_collate(examples, pad_token_id=7, pad_to_multiple_of=4)
    assert padded["input_ids"].shape == (3, 8) and padded["input_ids"][2, 2:].tolist() == [7] * 6


def test_sft_collate_of_dataset_items(tmp_path, tokenizer):
    data = _dataset(_write(tmp_path, [{"input": "where is the", "output": " cat?"}, {"messages": CHAT}],
                           "sft.jsonl"), tokenizer)
    batch = sft_collate([data[0], data[1]], pad_token_id=tokenizer.pad_token_id)
    for r in range(2):
        item = data[r]
        assert batch["input_ids"][r][batch["loss_mask"][r].bool()].tolist() == item["response_ids"].tolist()
        assert batch["attention_mask"][r].sum().item() == len(item["prompt_ids"]) + len(item["response_ids"])


def test_collate_rejects_bad_rows():
    with pytest.raises(ValueError, match="sft_collate got no examples"):
        sft_collate([], pad_token_id=PAD)
    with pytest.raises(ValueError, match="response_ids is empty"):
        sft_collate([{"prompt_ids": [BOS], "response_ids": []}], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"prompt_ids must be a 1-D tensor.*\(1, 2\)"):
        sft_collate([{"prompt_ids": torch.tensor([[BOS, 10]]), "response_ids": [EOS]}], pad_token_id=PAD)
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        sft_collate([{"prompt_ids": [BOS], "response_ids": [EOS]}], pad_token_id=PAD, pad_to_multiple_of=0)


def test_prompt_collate_pads_left():
    prompts = [[BOS, 10, 11, 12], torch.tensor([BOS, 13]), [14]]
    batch = prompt_collate(prompts, pad_token_id=PAD)
    assert set(batch) == {"input_ids", "attention_mask"} and batch["input_ids"].shape == (3, 4)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[BOS, 10, 11, 12], [PAD, PAD, BOS, 13], [PAD, PAD, PAD, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    with pytest.raises(ValueError, match="no prompts"):
        prompt_collate([], pad_token_id=PAD)
    with pytest.raises(ValueError, match=r"empty prompt \(row 1\)"):
        prompt_collate([[BOS], []], pad_token_id=PAD)


def test_dpo_collate_takes_a_generated_rejected_of_only_eos():
    pairs = [{"prompt_ids": torch.tensor([BOS, 10, 11]), "chosen_ids": torch.tensor([20, 21, EOS]),
              "rejected_ids": torch.tensor([EOS]), "chosen_reward": 1.0, "rejected_reward": 0.0},
             {"prompt_ids": [BOS, 12], "chosen_ids": [22, EOS], "rejected_ids": [EOS],
              "chosen_reward": 1.0, "rejected_reward": 0.0}]
    batch = pair_collate(pairs, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[BOS, 10, 11, 20, 21, EOS], [BOS, 10, 11, EOS, PAD, PAD],
                                           [BOS, 12, 22, EOS, PAD, PAD], [BOS, 12, EOS, PAD, PAD, PAD]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 0, 0],
                                           [0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert batch["attention_mask"].sum(dim=1).tolist() == [6, 4, 4, 3]
    assert batch["rewards"].tolist() == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="rejected_ids is empty"):
        pair_collate([{**pairs[1], "rejected_ids": []}], pad_token_id=PAD)
