"""The prompt dataset of rejection sampling: a validated, tokenised, length-checked JSONL file.

One record per line: ``{"text": "..."}`` or ``{"messages": [{"role": "user", "content": "..."}, ...]}``
(a chat rendered with the tokenizer's template and its generation prompt). Every prompt keeps room
for a generated response of `response_budget` tokens (the length policy decides the rest).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from nemo_aligner.data.jsonl import FieldSpec, FieldType, load_jsonl_records
from nemo_aligner.data.length_policy import LengthFitter, LengthPolicy
from nemo_aligner.data.tokenization import render_prompt, tokenize_record_prompt

PROMPT_SCHEMA = {
    "text": FieldSpec(FieldType.TEXT, required=False),
    "messages": FieldSpec(FieldType.MESSAGES, required=False),
}


def prompt_record_problems(fields: Mapping[str, Any]) -> list[str]:
    """Exactly one of 'text' and 'messages' (a jsonl RecordCheck)."""
    present = [name for name in ("text", "messages") if name in fields]
    if len(present) == 1:
        return []
    what = "both are given" if present else "neither is given"
    return [f"field 'text': a record holds either 'text' (a string) or 'messages' (a chat), {what}"]


def _prompt_text(fields: Mapping[str, Any], field: str, tokenizer: PreTrainedTokenizerBase, fitted: list[int],
                 original_length: int) -> str:
    """What a reward sees as the prompt: the text as written (a chat: as rendered by the template),
    or, when the length policy cut the prompt, the kept tokens decoded."""
    if len(fitted) < original_length:
        return tokenizer.decode(fitted, skip_special_tokens=True)
    return fields["text"] if field == "text" else render_prompt(fields["messages"], tokenizer)[0]


class PromptDataset(Dataset):
    """Prompts tokenised at construction. An item: prompt_ids [P] int64 and prompt_text (what a
    reward model or function sees as the prompt, see _prompt_text)."""

    def __init__(self, path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int,
                 length_policy: LengthPolicy, response_budget: int) -> None:
        fitter = LengthFitter(max_seq_length=max_seq_length, policy=length_policy, bos_token_id=tokenizer.bos_token_id,
                              response_budget=response_budget)
        self.stats = fitter.stats
        self._items: list[dict[str, Any]] = []
        for record in load_jsonl_records(path, PROMPT_SCHEMA, record_check=prompt_record_problems):
            field = "text" if "text" in record.fields else "messages"
            prompt_ids = tokenize_record_prompt(tokenizer, record.fields[field], where=f"{path}:{record.line}: field '{field}'")
            fitted = fitter.fit(prompt_ids, [])
            if fitted is not None:
                self._items.append({"prompt_ids": torch.tensor(fitted, dtype=torch.long),
                                    "prompt_text": _prompt_text(record.fields, field, tokenizer, fitted, len(prompt_ids))})
        fitter.finish(source=os.fspath(path), unit="prompts")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self._items[index])
