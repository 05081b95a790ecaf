"""What the reward server runs: an HF sequence-classification model or a Python reward function.

A scorer works in two steps so that a bad item fails only its own request: `prepare` turns one
request's (prompt, response) pairs into items (run when the request arrives; raises
`InvalidItemError` naming the item), and `score_batch` scores items gathered from several requests
(run on the batching worker's thread). `score_batch` returns one float per item, or the exception
that item raised, so the batcher can fail just the request that owns it.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Protocol, Sequence

import torch

from nemo_aligner.config.loader import instantiate_target
from nemo_aligner.config.reward_server import RewardModelConfig, RewardModelMode

logger = logging.getLogger(__name__)


class InvalidItemError(ValueError):
    """An item of a request cannot be scored (e.g. too long); the message names its index."""


class Scorer(Protocol):
    """The reward server's model interface."""

    description: str

    def prepare(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Any]: ...

    def score_batch(self, items: Sequence[Any]) -> list[float | Exception]: ...


class FunctionScorer:
    """Calls `fn(prompt, response) -> float` once per item."""

    def __init__(self, fn: Callable[[str, str], float], name: str) -> None:
        self._fn = fn
        self.description = f"function {name}"

    def prepare(self, prompts: Sequence[str], responses: Sequence[str]) -> list[tuple[str, str]]:
        return list(zip(prompts, responses))

    def score_batch(self, items: Sequence[tuple[str, str]]) -> list[float | Exception]:
        out: list[float | Exception] = []
        for prompt, response in items:
            try:
                out.append(float(self._fn(prompt, response)))
            except Exception as err:  # reported to the owning request as a 500 naming the item
                out.append(err)
        return out


class SequenceClassificationScorer:
    """Scores `prompt + response` with an HF `AutoModelForSequenceClassification` (one label).

    The text is `prompt + response` exactly as sent (a chat template is the caller's to apply),
    tokenised with the model's tokenizer and its special tokens when the request arrives (so an
    over-long item is rejected before it is queued), then right-padded per batch; the model reads
    the logit at the last non-pad token.
    """

    def __init__(self, model_path: str, *, max_length: int, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"reward_model.model_path: model directory '{model_path}' does not exist")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        # dtype="auto": the dtype the checkpoint was saved in (bf16 reward models stay bf16 on GPU).
        self.model, loading = AutoModelForSequenceClassification.from_pretrained(
            model_path, local_files_only=True, dtype="auto", output_loading_info=True)
        if loading["missing_keys"]:  # e.g. a causal LM: its classification head would be random
            raise ValueError(f"'{model_path}' is not a sequence-classification reward model: the checkpoint lacks "
                             f"{sorted(loading['missing_keys'])[:5]}, which would be randomly initialised")
        config = self.model.config
        if config.num_labels != 1:
            raise ValueError(f"reward model '{model_path}' has num_labels={config.num_labels}; a reward model needs 1")
        if config.pad_token_id is None:
            if self.tokenizer.pad_token_id is None:
                raise ValueError(f"reward model '{model_path}' has no pad_token_id and its tokenizer no pad token; "
                                 "set pad_token_id in config.json")
            config.pad_token_id = self.tokenizer.pad_token_id
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise ValueError(f"reward_model.max_length={max_length} is invalid: it must be <= the model's "
                             f"max_position_embeddings ({limit})")
        self.pad_token_id = int(config.pad_token_id)
        self.max_length = max_length
        self.device = device
        self.model.to(device).eval()
        self._tokenizer_lock = threading.Lock()  # fast tokenizers must not be used from two threads at once
        self.description = f"sequence classification model {model_path} on {device} ({self.model.dtype})"

    def prepare(self, prompts: Sequence[str], responses: Sequence[str]) -> list[list[int]]:
        texts = [p + r for p, r in zip(prompts, responses)]
        with self._tokenizer_lock:
            ids = self.tokenizer(texts)["input_ids"]
        for index, row in enumerate(ids):
            if len(row) > self.max_length:
                raise InvalidItemError(f"item {index}: prompt + response is {len(row)} tokens, more than "
                                       f"reward_model.max_length={self.max_length}; it is not truncated")
            if not row:
                raise InvalidItemError(f"item {index}: prompt + response is empty after tokenisation")
        return ids

    @torch.inference_mode()
    def score_batch(self, items: Sequence[list[int]]) -> list[float | Exception]:
        longest = max(len(row) for row in items)
        ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(items), longest), dtype=torch.long)
        for i, row in enumerate(items):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return logits[:, 0].float().cpu().tolist()


def build_reward_function(spec: dict[str, Any]) -> Callable[[str, str], float]:
    """The callable a `reward_model.function` spec names (`_partial_` defaults to true)."""
    spec = {"_partial_": True, **spec}
    fn = instantiate_target(spec, key="reward_model.function")
    if not callable(fn):
        raise ValueError(f"reward_model.function={spec!r} built {type(fn).__name__}, which is not callable")
    return fn


def build_scorer(cfg: RewardModelConfig) -> Scorer:
    """The scorer `reward_model` describes, on cuda:0 when CUDA is available, else on CPU."""
    if cfg.mode is RewardModelMode.function:
        assert cfg.function is not None  # checked by the schema
        scorer: Scorer = FunctionScorer(build_reward_function(cfg.function), cfg.function["_target_"])
    else:
        assert cfg.model_path is not None  # checked by the schema
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        scorer = SequenceClassificationScorer(cfg.model_path, max_length=cfg.max_length, device=device)
    logger.info("reward server scores with %s", scorer.description)
    return scorer
