"""The DPO preference-pair dataset: a validated, tokenised, length-checked JSONL file of prompt + chosen/rejected.

One record per line::

    {"prompt": "..." | [{"role": "user", "content": "..."}, ...],
     "chosen_response": "...", "rejected_response": "...",
     "chosen_reward": 1.0, "rejected_reward": 0.0}          # the rewards are optional

Everything is checked, tokenised and fitted to max_seq_length when the dataset is built, so a bad
file fails before training starts and every item costs nothing to fetch.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from nemo_aligner.data.jsonl import FieldSpec, FieldType, JsonlRecord, load_jsonl_records
from nemo_aligner.data.length_policy import LengthFitter, LengthPolicy
from nemo_aligner.data.tokenization import tokenize_record_prompt, tokenize_response

logger = logging.getLogger(__name__)

PREFERENCE_SCHEMA = {
    "prompt": FieldSpec(FieldType.TEXT_OR_MESSAGES),
    "chosen_response": FieldSpec(FieldType.TEXT),
    "rejected_response": FieldSpec(FieldType.TEXT),
    "chosen_reward": FieldSpec(FieldType.NUMBER, required=False),
    "rejected_reward": FieldSpec(FieldType.NUMBER, required=False),
}
"""The fields of a preference-pair record."""


class PreferenceDataset(Dataset):
    """Preference pairs from a JSONL file, tokenised at construction.

    An item is a dict:
        prompt_ids [P] int64, the prompt (the tokenizer's BOS included, or the chat template's text);
        chosen_ids [Rc] int64 and rejected_ids [Rr] int64, each response ending with one EOS;
        chosen_reward, rejected_reward: float, from the record or the defaults given here;
        chosen_ref_logps, rejected_ref_logps: float, once reference log-probs are attached
        (nemo_aligner/reference/precomputed.py).
    P + max(Rc, Rr) <= max_seq_length for every item (see length_policy.fit_prompt).

    Attributes:
        stats: what the length policy did (total, kept, truncated, dropped).
    """

    def __init__(self, path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int,
                 length_policy: LengthPolicy, default_chosen_reward: float, default_rejected_reward: float) -> None:
        """Reads, validates, tokenises and length-fits the whole file.

        Args:
            path: the JSONL file.
            tokenizer: the policy's tokenizer (with a chat template if any prompt is a message list).
            max_seq_length: the longest prompt + response allowed.
            length_policy: what happens to a pair longer than that.
            default_chosen_reward: chosen_reward of records that have none.
            default_rejected_reward: rejected_reward of records that have none.

        Raises:
            DataFormatError: the file cannot be read, holds an invalid record (all are listed), or a
                chat prompt cannot be rendered.
            ValueError: max_seq_length < 2, or no pair is left after the length policy.
        """
        fitter = LengthFitter(max_seq_length=max_seq_length, policy=length_policy, bos_token_id=tokenizer.bos_token_id)
        self.stats = fitter.stats
        self._items: list[dict[str, Any]] = []
        for record in load_jsonl_records(path, PREFERENCE_SCHEMA):
            item = _tokenize(record, path, tokenizer, fitter)
            if item is not None:
                item["chosen_reward"] = float(record.fields.get("chosen_reward", default_chosen_reward))
                item["rejected_reward"] = float(record.fields.get("rejected_reward", default_rejected_reward))
                self._items.append(item)
        fitter.finish(source=os.fspath(path), unit="pairs")

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The pair at index: prompt_ids [P], chosen_ids [Rc], rejected_ids [Rr], chosen_reward, rejected_reward."""
        return dict(self._items[index])

    def fingerprint(self) -> str:
        """A digest of every pair's token ids, in order: changes with the data, the tokenizer and the length policy."""
        digest = hashlib.sha256()
        for item in self._items:
            for side in ("prompt_ids", "chosen_ids", "rejected_ids"):
                digest.update(item[side].numpy().tobytes() + b"|")
        return digest.hexdigest()

    def attach_reference_logps(self, logps: torch.Tensor) -> None:
        """Give pair i the reference's Σ_t log-probs of its chosen and rejected responses, logps[i] ([N, 2])."""
        if tuple(logps.shape) != (len(self._items), 2):
            raise ValueError(f"reference log-probs of shape {tuple(logps.shape)} for {len(self._items)} pairs")
        for item, (chosen, rejected) in zip(self._items, logps.tolist()):
            item["chosen_ref_logps"], item["rejected_ref_logps"] = chosen, rejected


def _tokenize(record: JsonlRecord, path: str | os.PathLike[str], tokenizer: PreTrainedTokenizerBase,
              fitter: LengthFitter) -> dict[str, Any] | None:
    """One record's ids fitted to max_seq_length (counted by the fitter), or None if dropped."""
    where = f"{path}:{record.line}: field 'prompt'"
    prompt_ids = tokenize_record_prompt(tokenizer, record.fields["prompt"], where=where)
    chosen_ids = tokenize_response(tokenizer, record.fields["chosen_response"])
    rejected_ids = tokenize_response(tokenizer, record.fields["rejected_response"])
    fitted = fitter.fit(prompt_ids, (chosen_ids, rejected_ids))
    if fitted is None:
        return None
    return {"prompt_ids": torch.tensor(fitted, dtype=torch.long),
            "chosen_ids": torch.tensor(chosen_ids, dtype=torch.long),
            "rejected_ids": torch.tensor(rejected_ids, dtype=torch.long)}
