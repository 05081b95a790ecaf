"""What happens to an example longer than max_seq_length: its prompt is cut from the left, or it is dropped.

Either way the outcome is counted (LengthStats) and reported in one log line per data file, so no
example is ever shortened or lost silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from nemo_aligner.types import LengthPolicy
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


def fit_prompt(prompt_ids: Sequence[int], response_ids: Sequence[Sequence[int]], *, max_seq_length: int,
               policy: LengthPolicy, bos_token_id: int | None) -> list[int] | None:
    """The prompt that lets every response of an example fit in max_seq_length, or None to drop it.

    Responses are never cut: a response is what the loss trains on, and a cut response would lose
    its EOS. Only the prompt gives way, and only under truncate_prompt_left, which keeps the prompt's
    last tokens (the ones nearest the response). If the prompt starts with ``bos_token_id``, that
    BOS stays first, since the model was trained with BOS at position 0 (dropping it would move every
    truncated example off the training distribution), and the last tokens follow it. At least one
    prompt token other than a leading BOS is kept, so the first response token has real context; an
    example where even that does not fit (the response alone is too long) is dropped under both
    policies.

    Args:
        prompt_ids: [P] the prompt's ids.
        response_ids: the example's responses, each [R_i] (chosen and rejected for a preference
            pair); the longest decides.
        max_seq_length: the longest prompt + response sequence allowed.
        policy: what to do with an example that is too long.
        bos_token_id: the tokenizer's BOS id, or None if it has none.

    Returns:
        The prompt ids unchanged if the example fits, the prompt's kept ids [P'] with P' < P if it
        was truncated, or None if the example is dropped.
    """
    budget = max_seq_length - max(len(ids) for ids in response_ids)
    if len(prompt_ids) <= budget:
        return list(prompt_ids)
    keep_bos = bos_token_id is not None and len(prompt_ids) > 1 and prompt_ids[0] == bos_token_id
    if policy is LengthPolicy.drop or budget < 1 + keep_bos:
        return None
    if keep_bos:
        return [prompt_ids[0], *prompt_ids[len(prompt_ids) - (budget - 1):]]
    return list(prompt_ids[len(prompt_ids) - budget:])


@dataclass
class LengthStats:
    """Counts of what the length policy did to the examples of one data file.

    Attributes:
        total: examples seen.
        kept: examples kept, truncated ones included.
        truncated: kept examples whose prompt was cut from the left.
        dropped: examples left out.
    """

    total: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0

    def count(self, prompt_ids: Sequence[int], fitted: Sequence[int] | None) -> None:
        """Counts one example, given its prompt before and after fit_prompt."""
        self.total += 1
        if fitted is None:
            self.dropped += 1
            return
        self.kept += 1
        self.truncated += int(len(fitted) < len(prompt_ids))


def log_length_stats(stats: LengthStats, *, source: str, unit: str, max_seq_length: int,
                     response_budget: int = 0) -> None:
    """Logs one line (on rank 0) with what the length policy did to a data file.

    Args:
        stats: the file's counts.
        source: the data file, as the user named it.
        unit: what an example is called in the line ("pairs", "examples", ...).
        max_seq_length: the limit that was applied.
        response_budget: the room kept for a generated response (see LengthFitter); named in the
            line only if not 0.
    """
    budget = f" with a response of at least {response_budget} tokens" if response_budget else ""
    log_rank0(logger,
              "%s: %d %s, %d truncated (prompt cut from the left), %d dropped (longer than max_seq_length=%d%s)",
              source, stats.total, unit, stats.truncated, stats.dropped, max_seq_length, budget)


class LengthFitter:
    """Applies the length policy to every example of one data file, counts the outcomes and reports them.

    A dataset calls ``fit`` once per example and ``finish`` once after the last; ``stats`` holds the
    counts. With a response_budget, each example also keeps room for a response of that many tokens
    that will be generated for its prompt later (SPIN, rejection sampling), so the prompt fits with
    the longer of its own responses and the budget.

    Attributes:
        stats: what the policy did so far.
    """

    def __init__(self, *, max_seq_length: int, policy: LengthPolicy, bos_token_id: int | None,
                 response_budget: int = 0) -> None:
        """
        Args:
            max_seq_length: the longest prompt + response allowed.
            policy: what happens to an example longer than that.
            bos_token_id: the tokenizer's BOS id, or None if it has none (see fit_prompt).
            response_budget: the most tokens a generated response takes (its EOS included); 0 for
                data whose responses are all in the file.

        Raises:
            ValueError: max_seq_length < 2, or response_budget is negative or leaves no room for a
                prompt token.
        """
        if max_seq_length < 2:
            raise ValueError(f"max_seq_length must be at least 2 (a prompt token and EOS), got {max_seq_length}")
        if not 0 <= response_budget < max_seq_length:
            raise ValueError(f"response_budget must be in [0, max_seq_length={max_seq_length}) so that a prompt "
                             f"token fits beside it, got {response_budget}")
        self.max_seq_length, self.policy, self.bos_token_id = max_seq_length, policy, bos_token_id
        self.response_budget = response_budget
        self.stats = LengthStats()

    def fit(self, prompt_ids: Sequence[int], response_ids: Sequence[Sequence[int]]) -> list[int] | None:
        """One example's prompt fitted by fit_prompt (counted), or None if it is dropped.

        Args:
            prompt_ids: [P] the prompt's ids.
            response_ids: the example's responses, each [R_i]; the budget joins them as one more.
        """
        candidates = [*response_ids, range(self.response_budget)]
        fitted = fit_prompt(prompt_ids, candidates, max_seq_length=self.max_seq_length, policy=self.policy,
                            bos_token_id=self.bos_token_id)
        self.stats.count(prompt_ids, fitted)
        return fitted

    def finish(self, *, source: str, unit: str) -> None:
        """Logs the file's counts (log_length_stats) and raises if no example was kept.

        Args:
            source: the data file, as the user named it.
            unit: what an example is called ("pairs", "examples", ...).

        Raises:
            ValueError: every example was dropped.
        """
        log_length_stats(self.stats, source=source, unit=unit, max_seq_length=self.max_seq_length,
                         response_budget=self.response_budget)
        if self.stats.kept:
            return
        budget = f" (with response_budget={self.response_budget})" if self.response_budget else ""
        fix = "raise the limit" if self.policy is LengthPolicy.truncate_prompt_left else \
            "raise the limit or use truncate_prompt_left"
        raise ValueError(f"{source}: all {self.stats.total} {unit} are longer than max_seq_length="
                         f"{self.max_seq_length}{budget} under length_policy={self.policy.value}; {fix}")
