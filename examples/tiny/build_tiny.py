"""Regenerates the tiny default deterministically: datasets, tokenizer and pretrained model.

Usage (from the repository root; about two minutes on one CPU core):
    python examples/tiny/build_tiny.py [--out-dir examples/tiny] [--seed 0] [--target-accuracy 0.5]

Writes ``<out-dir>/data/*.jsonl`` and ``<out-dir>/model/`` (an HF checkpoint directory with its
tokenizer), then prints the model's greedy exact-match accuracy on ``test.jsonl``. Pretraining
stops when the accuracy on ``sft_val.jsonl`` first reaches the target. Everything
runs on one CPU thread with deterministic algorithms and fixed seeds, so a rebuild on the same
machine and software reproduces the files byte for byte.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import `examples.tiny` from the repository root
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch

from examples.tiny.evaluate import evaluate_accuracy
from examples.tiny.make_data import generate_datasets, pretraining_problems, prompt_of, write_datasets
from examples.tiny.make_tokenizer import VOCAB_SIZE, save_tokenizer, task_corpus, train_bpe, wrap_for_transformers
from examples.tiny.pretrain import PretrainConfig, build_model, pretrain
from examples.tiny.task import make_problem

logger = logging.getLogger(__name__)

TINY_DIR = Path(__file__).resolve().parent
TOKENIZER_CORPUS_SIZE = 20_000
# Splits whose prompts pretraining never sees. The train splits may overlap it: the smallest
# problems (1-digit operands) are so few that excluding every shipped prompt would hide most of
# them from pretraining.
HELD_OUT_SPLITS = ("sft_val", "preference_val", "prompts_val", "test")
# Offsets from --seed of the independent random streams, so that changing one leaves the others.
DATA_SEED, TOKENIZER_SEED, INIT_SEED, PRETRAIN_SEED = 0, 1, 2, 3


def make_deterministic(seed: int) -> None:
    """One CPU thread, deterministic kernels and seeded RNGs: identical runs give identical bits."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    random.seed(seed)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out-dir", type=Path, default=TINY_DIR, help="writes <out-dir>/data and <out-dir>/model")
    parser.add_argument("--seed", type=int, default=0, help="base seed of every random stream")
    parser.add_argument(
        "--target-accuracy",
        type=float,
        default=PretrainConfig.target_accuracy,
        help="stop pretraining once greedy accuracy on sft_val reaches this",
    )
    return parser.parse_args(argv)


def build(out_dir: Path, seed: int, target_accuracy: float) -> float:
    """Writes the datasets, the tokenizer and the pretrained model under ``out_dir``.

    Returns:
        Greedy exact-match accuracy of the saved model on the test split.
    """
    make_deterministic(seed)
    datasets = generate_datasets(seed + DATA_SEED)
    write_datasets(datasets, out_dir / "data")
    logger.info("wrote %s", ", ".join(f"{split} ({len(rows)})" for split, rows in datasets.items()))

    corpus_rng = random.Random(seed + TOKENIZER_SEED)
    corpus = task_corpus(make_problem(corpus_rng) for _ in range(TOKENIZER_CORPUS_SIZE))
    tokenizer = wrap_for_transformers(train_bpe(corpus, VOCAB_SIZE))
    logger.info("tokenizer: %d tokens", len(tokenizer))

    model = build_model(tokenizer, seed + INIT_SEED)
    logger.info("model: %d parameters", sum(p.numel() for p in model.parameters()))
    held_out = {prompt_of(record) for split in HELD_OUT_SPLITS for record in datasets[split]}
    problems = pretraining_problems(seed + PRETRAIN_SEED, exclude=held_out)
    cfg = PretrainConfig(target_accuracy=target_accuracy)
    steps = pretrain(model, tokenizer, problems, datasets["sft_val"], cfg)
    logger.info("pretrained for %d steps", steps)

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    logger.info("saved model and tokenizer to %s", model_dir)
    return evaluate_accuracy(model, tokenizer, datasets["test"], cfg.eval_batch_size)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI entry point: builds everything and prints the test accuracy and the build time."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parse_args(argv)
    start = time.perf_counter()
    accuracy = build(args.out_dir, args.seed, args.target_accuracy)
    print(f"accuracy: {accuracy:.4f}")
    print(f"build time: {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
