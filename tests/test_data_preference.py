"""Preference data: chat rendering, the prompt/response token boundary, the length policy, the pair layout."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from tokenizers import Tokenizer, models, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from nemo_aligner.data.collate import pair_collate
from nemo_aligner.data.jsonl import DataFormatError
from nemo_aligner.data.length_policy import LengthPolicy, LengthStats, fit_prompt
from nemo_aligner.data.preference import PreferenceDataset
from nemo_aligner.data.tokenization import render_prompt, tokenize_prompt_and_response, tokenize_response

PAD, BOS, EOS = 0, 1, 2
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the first message must not be the assistant') }}"
    "{% endif %}{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _make_tokenizer(chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerBase:
    """A tiny BPE tokenizer that prepends BOS and merges across spaces (so ' the cat' is one token)."""
    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz :.?!\n"))
    corpus = ["the cat sat on the mat.", "user: where is the cat?\nassistant: the cat sat."]
    tok.train_from_iterator(corpus * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD, BOS, EOS)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return _make_tokenizer()


def _write(tmp_path: os.PathLike[str], records: list[dict], name: str = "pairs.jsonl") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return path


def _dataset(path: str, tokenizer: PreTrainedTokenizerBase, max_seq_length: int = 64,
             policy: LengthPolicy = LengthPolicy.truncate_prompt_left) -> PreferenceDataset:
    return PreferenceDataset(path, tokenizer, max_seq_length=max_seq_length, length_policy=policy,
                             default_chosen_reward=0.75, default_rejected_reward=-0.25)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


# --- tokenization ---------------------------------------------------------------------------------


def test_prompt_response_boundary_is_never_spanned_by_a_token(tokenizer):
    prompt, response = "where is the", " cat?"
    joint = tokenizer(prompt + response, add_special_tokens=False, return_offsets_mapping=True)
    assert any(start < len(prompt) < end for start, end in joint["offset_mapping"]), "example must merge across"

    prompt_ids, response_ids = tokenize_prompt_and_response(tokenizer, prompt, response, from_template=False)
    assert prompt_ids == _ids(tokenizer, prompt, special=True) and prompt_ids[0] == BOS
    assert response_ids == _ids(tokenizer, response, special=False) + [EOS]
    assert BOS not in response_ids


def test_response_ends_with_exactly_one_eos(tokenizer):
    assert tokenize_response(tokenizer, "") == [EOS]
    assert tokenize_response(tokenizer, "the cat</s>") == _ids(tokenizer, "the cat", special=False) + [EOS]


def test_chat_prompt_is_rendered_with_the_template_and_gets_no_second_bos(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "where is the cat?"}]
    text, from_template = render_prompt(messages, tokenizer)
    assert from_template and text == "<s>system: be brief\nuser: where is the cat?\nassistant:"
    prompt_ids, _ = tokenize_prompt_and_response(tokenizer, text, "the cat", from_template=True)
    assert prompt_ids == _ids(tokenizer, text, special=False) and prompt_ids.count(BOS) == 1 and prompt_ids[0] == BOS
    assert render_prompt("where is the cat?", tokenizer) == ("where is the cat?", False)


def test_chat_prompt_without_a_chat_template_names_the_fix(tmp_path):
    bare = _make_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat template.*chat_template"):
        render_prompt([{"role": "user", "content": "hi"}], bare)
    path = _write(tmp_path, [{"prompt": "a", "chosen_response": "b", "rejected_response": "c"},
                             {"prompt": [{"role": "user", "content": "hi"}], "chosen_response": "b",
                              "rejected_response": "c"}])
    with pytest.raises(DataFormatError, match=rf"{path}:2: field 'prompt': .*no chat template"):
        _dataset(path, bare)


def test_chat_template_error_names_file_and_line(tmp_path, tokenizer):
    path = _write(tmp_path, [{"prompt": [{"role": "assistant", "content": "hi"}], "chosen_response": "b",
                              "rejected_response": "c"}])
    with pytest.raises(DataFormatError, match=rf"{path}:1: field 'prompt': .*must not be the assistant"):
        _dataset(path, tokenizer)


# --- the dataset ----------------------------------------------------------------------------------


def test_dataset_items_and_reward_defaults(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "where is the cat?"}]
    path = _write(tmp_path, [
        {"prompt": "where is the", "chosen_response": " cat?", "rejected_response": " mat."},
        {"prompt": chat, "chosen_response": "the cat sat.", "rejected_response": "no", "chosen_reward": 3,
         "rejected_reward": 1.5},
    ])
    data = _dataset(path, tokenizer)
    assert len(data) == 2 and data.stats == LengthStats(total=2, kept=2, truncated=0, dropped=0)
    first, second = data[0], data[1]
    assert first["prompt_ids"].tolist() == _ids(tokenizer, "where is the", special=True)
    assert first["chosen_ids"].tolist() == _ids(tokenizer, " cat?", special=False) + [EOS]
    assert first["rejected_ids"].tolist() == _ids(tokenizer, " mat.", special=False) + [EOS]
    assert first["prompt_ids"].dtype == torch.long
    assert (first["chosen_reward"], first["rejected_reward"]) == (0.75, -0.25)
    assert (second["chosen_reward"], second["rejected_reward"]) == (3.0, 1.5)
    assert second["prompt_ids"].tolist() == _ids(tokenizer, render_prompt(chat, tokenizer)[0], special=False)


def test_dataset_reports_every_bad_record_with_file_line_and_field(tmp_path, tokenizer):
    path = _write(tmp_path, [
        {"prompt": "a", "chosen_response": "b", "rejected_response": "c"},
        {"prompt": "a", "chosen_response": "", "rejected_response": "c"},
        {"prompt": "a", "chosen_response": "b"},
        {"prompt": "a", "chosen_response": "b", "rejected_response": "c", "chosen_reward": "high"},
        {"prompt": [{"role": "user", "text": "a"}], "chosen_response": "b", "rejected_response": "c"},
    ])
    with pytest.raises(DataFormatError) as err:
        _dataset(path, tokenizer)
    message = str(err.value)
    for expected in (f"{path}:2: field 'chosen_response': empty string",
                     f"{path}:3: field 'rejected_response': missing",
                     f"{path}:4: field 'chosen_reward': expected a number",
                     f"{path}:5: field 'prompt': message 0: missing 'content'"):
        assert expected in message
    assert f"{path}:1:" not in message


# --- the length policy ----------------------------------------------------------------------------


@pytest.mark.parametrize("bos", [BOS, None])
def test_fit_prompt_truncates_from_the_left_keeping_bos(bos):
    prompt = [BOS, 10, 11, 12, 13, 14]
    fit = dict(max_seq_length=8, bos_token_id=bos)
    assert fit_prompt(prompt, [[20, EOS], [21, EOS]], policy=LengthPolicy.truncate_prompt_left, **fit) == prompt
    cut = fit_prompt(prompt, [[20, EOS], [21, 22, 23, EOS]], policy=LengthPolicy.truncate_prompt_left, **fit)
    assert cut == ([BOS, 12, 13, 14] if bos is not None else [11, 12, 13, 14])
    assert fit_prompt(prompt, [[20, EOS], [21, 22, 23, EOS]], policy=LengthPolicy.drop, **fit) is None


@pytest.mark.parametrize("policy", list(LengthPolicy))
def test_fit_prompt_drops_when_not_even_one_prompt_token_fits(policy):
    no_bos_room = [30] * 7 + [EOS]  # leaves room for 0 prompt tokens
    assert fit_prompt([10, 11], [no_bos_room], max_seq_length=8, policy=policy, bos_token_id=None) is None
    bos_only_room = [30] * 6 + [EOS]  # room for BOS alone, which is not enough
    assert fit_prompt([BOS, 10, 11], [bos_only_room], max_seq_length=8, policy=policy, bos_token_id=BOS) is None
    if policy is LengthPolicy.truncate_prompt_left:
        assert fit_prompt([10, 11], [bos_only_room], max_seq_length=8, policy=policy, bos_token_id=BOS) == [11]
        assert fit_prompt([BOS, 10, 11], [[30] * 5 + [EOS]], max_seq_length=8, policy=policy,
                          bos_token_id=BOS) == [BOS, 11]


LONG_PROMPT = "the cat sat on the mat. " * 4 + "where is the"
OVERSIZED = [
    {"prompt": "where is the", "chosen_response": " cat?", "rejected_response": " mat."},  # fits
    {"prompt": LONG_PROMPT, "chosen_response": " cat?", "rejected_response": " mat. the cat sat."},  # prompt too long
    {"prompt": "where", "chosen_response": "the cat sat on the mat. " * 6, "rejected_response": "no"},  # response
]


def test_truncate_policy_keeps_the_prompt_end_and_counts(tmp_path, tokenizer, caplog):
    path = _write(tmp_path, OVERSIZED)
    max_len = 16
    assert len(tokenize_response(tokenizer, OVERSIZED[2]["chosen_response"])) >= max_len - 1  # response alone too long
    with caplog.at_level(logging.INFO, logger="nemo_aligner.data.length_policy"):
        data = _dataset(path, tokenizer, max_seq_length=max_len)
    assert data.stats == LengthStats(total=3, kept=2, truncated=1, dropped=1)
    assert f"{path}: 3 pairs, 1 truncated (prompt cut from the left), 1 dropped (longer than max_seq_length=16)" \
        in caplog.text
    full = _ids(tokenizer, LONG_PROMPT, special=True)
    item = data[1]
    longest = max(len(item["chosen_ids"]), len(item["rejected_ids"]))
    assert len(item["prompt_ids"]) + longest == max_len
    assert item["prompt_ids"].tolist() == [BOS] + full[len(full) - (max_len - longest - 1):]


def test_texts_longer_than_the_tokenizer_limit_give_no_indexing_warning(tmp_path, capfd):
    """The length policy reports over-long examples; transformers' "indexing errors" warning would mislead."""
    short_limit = _make_tokenizer()
    short_limit.model_max_length = 4
    _dataset(_write(tmp_path, OVERSIZED), short_limit, max_seq_length=64)
    assert "indexing errors" not in capfd.readouterr().err


def test_drop_policy_drops_and_counts(tmp_path, tokenizer):
    data = _dataset(_write(tmp_path, OVERSIZED), tokenizer, max_seq_length=16, policy=LengthPolicy.drop)
    assert data.stats == LengthStats(total=3, kept=1, truncated=0, dropped=2)
    assert len(data) == 1 and data[0]["prompt_ids"].tolist() == _ids(tokenizer, "where is the", special=True)


def test_nothing_left_is_an_error(tmp_path, tokenizer):
    path = _write(tmp_path, OVERSIZED[2:])
    with pytest.raises(ValueError, match=r"all 1 pairs are longer than max_seq_length=16"):
        _dataset(path, tokenizer, max_seq_length=16)


# --- collate --------------------------------------------------------------------------------------


def _pair(prompt, chosen, rejected, rewards=(1.0, 0.0), as_tensor=False):
    conv = (lambda ids: torch.tensor(ids)) if as_tensor else list
    return {"prompt_ids": conv(prompt), "chosen_ids": conv(chosen), "rejected_ids": conv(rejected),
            "chosen_reward": rewards[0], "rejected_reward": rewards[1]}


def test_collate_interleaves_pairs_and_masks_responses():
    pairs = [_pair([BOS, 10, 11], [20, EOS], [21, 22, 23, EOS], (2.0, -1.0)),
             _pair([BOS, 12], [24, 25, EOS], [EOS], (0.5, 0.25), as_tensor=True)]
    batch = pair_collate(pairs, pad_token_id=PAD)
    rows = [[BOS, 10, 11, 20, EOS], [BOS, 10, 11, 21, 22, 23, EOS], [BOS, 12, 24, 25, EOS], [BOS, 12, EOS]]
    prompt_lens = [3, 3, 2, 2]
    assert batch["input_ids"].shape == (4, 7) and batch["input_ids"].dtype == torch.long
    for r, (row, p) in enumerate(zip(rows, prompt_lens)):
        assert batch["input_ids"][r].tolist() == row + [PAD] * (7 - len(row))
        assert batch["attention_mask"][r].tolist() == [1] * len(row) + [0] * (7 - len(row))
        assert batch["loss_mask"][r].tolist() == [0.0] * p + [1.0] * (len(row) - p) + [0.0] * (7 - len(row))
    assert batch["attention_mask"].dtype == torch.long and batch["loss_mask"].dtype == torch.float32
    assert batch["rewards"].tolist() == [2.0, -1.0, 0.5, 0.25]
    # the masked response tokens of each row are exactly that row's response ids, EOS included
    responses = [[20, EOS], [21, 22, 23, EOS], [24, 25, EOS], [EOS]]
    for r, resp in enumerate(responses):
        assert batch["input_ids"][r][batch["loss_mask"][r].bool()].tolist() == resp


def test_collate_pads_to_a_multiple():
    pairs = [_pair([BOS, 10], [20, EOS], [21, 22, EOS])]
    assert pair_collate(pairs, pad_token_id=PAD, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    assert pair_collate(pairs, pad_token_id=PAD, pad_to_multiple_of=5)["input_ids"].shape == (2, 5)
    padded = pair_collate(pairs, pad_token_id=7, pad_to_multiple_of=4)
    assert padded["input_ids"].shape == (2, 8) and padded["input_ids"][0, 4:].tolist() == [7] * 4
    assert padded["attention_mask"].sum().item() == 4 + 5


def test_dataset_to_batch(tmp_path, tokenizer):
    data = _dataset(_write(tmp_path, OVERSIZED[:2]), tokenizer, max_seq_length=16)
    batch = pair_collate([data[0], data[1]], pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (4, 16)
    assert batch["rewards"].tolist() == [0.75, -0.25, 0.75, -0.25]
    for r in range(4):
        item, side = data[r // 2], ("chosen_ids", "rejected_ids")[r % 2]
        assert batch["input_ids"][r][batch["loss_mask"][r].bool()].tolist() == item[side].tolist()
        assert batch["attention_mask"][r].sum().item() == len(item["prompt_ids"]) + len(item[side])
