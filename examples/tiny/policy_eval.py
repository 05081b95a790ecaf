"""Held-out task accuracy of a nemo_aligner policy during training (greedy, data-parallel).

Used by the entry scripts through their `task_eval` config key:
    task_eval:
      _target_: examples.tiny.policy_eval.TinyTaskAccuracy
      data_path: examples/tiny/data/test.jsonl
      ...
"""

from __future__ import annotations

import json
import math

import torch

from examples.tiny.task import is_correct
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.types import LengthParams, SamplingParams


class TinyTaskAccuracy:
    """Exact-match accuracy of greedy answers on the first `limit` problems of `data_path`."""

    def __init__(self, data_path: str, limit: int, batch_size: int, max_new_tokens: int) -> None:
        with open(data_path) as f:
            self.examples = [json.loads(line) for line in f if line.strip()][:limit]
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens

    def __call__(self, policy: GPTModel) -> dict[str, float]:
        dp, rank = policy.data_parallel.size, policy.data_parallel.rank
        shard = self.examples[rank::dp]
        # every rank runs the same number of generate calls (they are collective under FSDP)
        batches = math.ceil(math.ceil(len(self.examples) / dp) / self.batch_size)
        correct = 0
        for b in range(batches):
            chunk = shard[b * self.batch_size : (b + 1) * self.batch_size]
            if chunk:
                correct += self._count_correct(policy, chunk)
            else:  # keep this rank's (collective) generate calls in step with the others
                self._count_correct(policy, self.examples[:1])
        total = policy.global_sum(torch.tensor(float(correct))).item()
        return {"task_accuracy": total / len(self.examples)}

    def _count_correct(self, policy: GPTModel, chunk: list[dict]) -> int:
        tok = policy.tokenizer
        enc = tok([ex["input"] for ex in chunk], return_tensors="pt", padding=True, padding_side="left")
        out = policy.generate(enc["input_ids"].to(policy.device), enc["attention_mask"].to(policy.device),
                              SamplingParams(use_greedy=True), LengthParams(max_length=self.max_new_tokens))
        responses = tok.batch_decode(out.tokens[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return sum(is_correct(r, ex["output"]) for r, ex in zip(responses, chunk))
