"""Generates the tiny default's JSONL datasets (SFT, preference pairs, prompts, test) from the task.

All splits are cut from one pool of distinct problems, so no prompt appears in two files; the
pretraining stream (``pretraining_problems``) skips the prompts it is told to, which the build
uses to keep the validation and test problems unseen by the shipped model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Container, Iterator
from pathlib import Path

from examples.tiny.task import make_problem, wrong_answer

# Number of problems per file, in the order the pool is cut (changing it changes every file).
SPLIT_SIZES: dict[str, int] = {
    "sft_train": 1000,
    "sft_val": 200,
    "preference_train": 1000,
    "preference_val": 200,
    "prompts_train": 500,
    "prompts_val": 100,
    "test": 500,
}

Record = dict[str, str]


def _distinct_problems(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Draws problems until ``count`` distinct prompts are collected, in draw order."""
    problems: dict[str, str] = {}
    while len(problems) < count:
        prompt, answer = make_problem(rng)
        problems.setdefault(prompt, answer)
    return list(problems.items())


def _records(split: str, problems: list[tuple[str, str]], rng: random.Random) -> list[Record]:
    """Formats ``problems`` as the records of ``split`` (its file name without ``.jsonl``)."""
    kind = split.rsplit("_", 1)[0]
    if kind in ("sft", "test"):
        return [{"input": prompt, "output": answer} for prompt, answer in problems]
    if kind == "preference":
        return [
            {"prompt": prompt, "chosen_response": answer, "rejected_response": wrong_answer(answer, rng)}
            for prompt, answer in problems
        ]
    if kind == "prompts":
        return [{"text": prompt} for prompt, _ in problems]
    raise ValueError(f"unknown split {split!r}; known: {list(SPLIT_SIZES)}")


def generate_datasets(seed: int) -> dict[str, list[Record]]:
    """Builds every dataset; the same ``seed`` gives the same output.

    Returns:
        Split name (e.g. ``"sft_train"``) to its records, in ``SPLIT_SIZES`` order.
    """
    rng = random.Random(seed)
    pool = _distinct_problems(rng, sum(SPLIT_SIZES.values()))
    datasets: dict[str, list[Record]] = {}
    start = 0
    for split, size in SPLIT_SIZES.items():
        datasets[split] = _records(split, pool[start : start + size], rng)
        start += size
    return datasets


def prompt_of(record: Record) -> str:
    """The prompt of a record of any split."""
    for key in ("input", "prompt", "text"):
        if key in record:
            return record[key]
    raise KeyError(f"record has no prompt key: {record}")


def pretraining_problems(seed: int, exclude: Container[str]) -> Iterator[tuple[str, str]]:
    """An endless stream of problems whose prompts are not in ``exclude``."""
    rng = random.Random(seed)
    while True:
        prompt, answer = make_problem(rng)
        if prompt not in exclude:
            yield prompt, answer


def write_jsonl(path: Path, records: list[Record]) -> None:
    """Writes one JSON object per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[Record]:
    """Reads one JSON object per line."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_datasets(datasets: dict[str, list[Record]], data_dir: Path) -> None:
    """Writes each split to ``<data_dir>/<split>.jsonl``."""
    for split, records in datasets.items():
        write_jsonl(data_dir / f"{split}.jsonl", records)
