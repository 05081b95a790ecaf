"""The SFT dataset: a validated, tokenised, length-checked JSONL file of prompt + response (SPIN's data).

One record per line, in either of two forms::

    {"input": "...", "output": "..."}
    {"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", "content": "..."}]}

In the chat form the last message is the response and the ones before it are the prompt, rendered
with the tokenizer's chat template and its generation prompt. As for preference pairs, everything
is checked, tokenised and fitted to max_seq_length when the dataset is built.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from nemo_aligner.data.jsonl import FieldSpec, FieldType, load_jsonl_records
from nemo_aligner.data.length_policy import LengthFitter, LengthPolicy
from nemo_aligner.data.tokenization import tokenize_record_prompt, tokenize_response

SFT_SCHEMA = {
    "input": FieldSpec(FieldType.TEXT, required=False),
    "output": FieldSpec(FieldType.TEXT, required=False),
    "messages": FieldSpec(FieldType.MESSAGES, required=False),
}
"""The fields of an SFT record; which of them a record must hold is checked by sft_record_problems."""

_FORMS = ("a record holds either 'input' and 'output' (strings) or 'messages' (a chat ending with the assistant's "
          "response)")


def sft_record_problems(fields: Mapping[str, Any]) -> list[str]:
    """What is wrong with an SFT record beyond its fields' types (a jsonl RecordCheck).

    Exactly one form must be present: both of input/output, or messages. A chat needs at least one
    message before its last, and the last must be a non-empty assistant message.

    Args:
        fields: a record whose fields match SFT_SCHEMA.

    Returns:
        Its problems, each ``"field 'name': problem"``; empty if none.
    """
    pair = [name for name in ("input", "output") if name in fields]
    if "messages" in fields:
        if pair:
            return [f"field 'messages': given together with {' and '.join(repr(n) for n in pair)}; {_FORMS}, not both"]
        return _chat_problems(fields["messages"])
    if not pair:
        return [f"field 'input': missing, and so is 'messages'; {_FORMS}"]
    if len(pair) == 1:
        missing = "output" if pair == ["input"] else "input"
        return [f"field '{missing}': missing (required with '{pair[0]}': a string)"]
    return []


def _chat_problems(messages: list[dict[str, str]]) -> list[str]:
    """The problems of a chat whose messages are each a valid {role, content}."""
    last = messages[-1]
    if last["role"] != "assistant":
        return [f"field 'messages': the last message must be the assistant's response, got role {last['role']!r}"]
    problems = []
    if len(messages) < 2:
        problems.append("field 'messages': no prompt: the assistant's response must follow at least one message")
    if not last["content"]:
        problems.append("field 'messages': the assistant's response (the last message) is an empty string")
    return problems


def _prompt_and_response(fields: Mapping[str, Any]) -> tuple[str, str | list[dict[str, str]], str]:
    """(the prompt's field name, the prompt, the response text) of a valid SFT record."""
    if "messages" in fields:
        return "messages", fields["messages"][:-1], fields["messages"][-1]["content"]
    return "input", fields["input"], fields["output"]


class SFTDataset(Dataset):
    """Prompt + response examples from a JSONL file, tokenised at construction.

    An item is a dict:
        prompt_ids [P] int64, the prompt (the tokenizer's BOS included, or the chat template's text);
        response_ids [R] int64, the response ending with one EOS.
    P + max(R, response_budget) <= max_seq_length for every item (see length_policy.LengthFitter).

    Attributes:
        stats: what the length policy did (total, kept, truncated, dropped).
    """

    def __init__(self, path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int,
                 length_policy: LengthPolicy, response_budget: int = 0) -> None:
        """Reads, validates, tokenises and length-fits the whole file.

        Args:
            path: the JSONL file.
            tokenizer: the policy's tokenizer (with a chat template if any record is a chat).
            max_seq_length: the longest prompt + response allowed.
            length_policy: what happens to an example longer than that.
            response_budget: the most tokens a response generated for a prompt takes (its EOS
                included), e.g. SPIN's generation length; each prompt keeps room for it too.

        Raises:
            DataFormatError: the file cannot be read, holds an invalid record (all are listed), or a
                chat prompt cannot be rendered.
            ValueError: max_seq_length < 2, response_budget outside [0, max_seq_length), or no
                example is left after the length policy.
        """
        fitter = LengthFitter(max_seq_length=max_seq_length, policy=length_policy, bos_token_id=tokenizer.bos_token_id,
                              response_budget=response_budget)
        self.stats = fitter.stats
        self._items: list[dict[str, torch.Tensor]] = []
        for record in load_jsonl_records(path, SFT_SCHEMA, record_check=sft_record_problems):
            field, prompt, response = _prompt_and_response(record.fields)
            prompt_ids = tokenize_record_prompt(tokenizer, prompt, where=f"{path}:{record.line}: field '{field}'")
            response_ids = tokenize_response(tokenizer, response)
            fitted = fitter.fit(prompt_ids, [response_ids])
            if fitted is not None:
                self._items.append({"prompt_ids": torch.tensor(fitted, dtype=torch.long),
                                    "response_ids": torch.tensor(response_ids, dtype=torch.long)})
        fitter.finish(source=os.fspath(path), unit="examples")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The example at index: prompt_ids [P], response_ids [R]."""
        return dict(self._items[index])
