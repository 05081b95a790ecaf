"""Greedy exact-match accuracy of a Hugging Face causal LM on the tiny arithmetic task.

Usage (from the repository root):
    python examples/tiny/evaluate.py --model examples/tiny/model [--data FILE] [--limit N] [--batch-size B]

Uses transformers only (no nemo_aligner code), so it scores any HF-format checkpoint directory.
``evaluate_accuracy`` is importable as ``examples.tiny.evaluate``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import `examples.tiny` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from examples.tiny.make_data import read_jsonl
from examples.tiny.task import is_correct

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "test.jsonl"
MAX_NEW_TOKENS = 8  # answers have at most 4 characters, plus EOS


@torch.inference_mode()
def generate_answers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedily decodes a response to each prompt (left-padded batches, stopping at EOS).

    Returns:
        The decoded responses without special tokens, in prompt order.
    """
    model.eval()
    responses: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(
            list(prompts[start : start + batch_size]), padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_tokens = output[:, batch["input_ids"].shape[1] :]
        responses.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    return responses


def count_correct(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, str]],
    batch_size: int,
) -> int:
    """Number of ``{"input": prompt, "output": answer}`` examples the model answers exactly."""
    responses = generate_answers(model, tokenizer, [example["input"] for example in examples], batch_size)
    return sum(is_correct(response, example["output"]) for response, example in zip(responses, examples, strict=True))


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Mapping[str, str]],
    batch_size: int,
) -> float:
    """Greedy exact-match accuracy on ``{"input": prompt, "output": answer}`` examples, in [0, 1]."""
    if not examples:
        raise ValueError("no examples to evaluate")
    return count_correct(model, tokenizer, examples, batch_size) / len(examples)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, required=True, help="HF checkpoint directory (model + tokenizer)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="JSONL with input/output keys")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    parser.add_argument("--batch-size", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: prints ``accuracy: X.XXXX (k/n)``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse_args(argv)
    # A model this small gains nothing from more threads, and loses much when a core is busy.
    torch.set_num_threads(1)
    examples = read_jsonl(args.data)[: args.limit]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    logger.info("evaluating %s on %d examples of %s", args.model, len(examples), args.data)
    correct = count_correct(model, tokenizer, examples, args.batch_size)
    print(f"accuracy: {correct / len(examples):.4f} ({correct}/{len(examples)})")


if __name__ == "__main__":
    main()
