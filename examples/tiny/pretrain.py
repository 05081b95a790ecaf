"""Builds the tiny Llama model and pretrains it on the arithmetic task in plain PyTorch on CPU.

Each sequence is ``<s> prompt answer </s>``, with the prompt and the answer tokenised apart (as
nemo_aligner's data code does, so no token spans the boundary); the loss covers the answer
tokens and EOS only. Training stops on purpose as soon as a held-out accuracy reaches a target
(about half), so the shipped model is imperfect and alignment has something to improve.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from examples.tiny.evaluate import evaluate_accuracy
from examples.tiny.make_tokenizer import MODEL_MAX_LENGTH

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PretrainConfig:
    """Optimisation and early-stopping settings of the pretraining run."""

    max_steps: int = 3000
    """Optimizer steps at most, if the monitored accuracy never reaches ``target_accuracy``."""
    batch_size: int = 64
    """Sequences per step."""
    lr: float = 5e-4
    """AdamW learning rate, constant after the warm-up (no gradient clipping: it slows learning here)."""
    warmup_steps: int = 100
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    eval_every: int = 25
    """Measure the monitored accuracy every this many steps."""
    target_accuracy: float = 0.5
    """Stop as soon as the greedy accuracy on the monitored examples reaches this."""
    eval_batch_size: int = 100
    """Prompts per generation batch when measuring accuracy."""
    log_every: int = 100
    """Log the loss every this many steps."""


def build_model_config(tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The tiny Llama: 4 layers, 4 query heads and 2 KV heads (tensor-parallel size 2 divides both)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MODEL_MAX_LENGTH,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama in fp32 whose generation config greedily stops at EOS."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_model_config(tokenizer))
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def make_batch(tokenizer: PreTrainedTokenizerBase, problems: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Tokenises ``(prompt, answer)`` pairs into right-padded ``<s> prompt answer </s>`` sequences.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: each ``[B, T]``; labels are
        ``IGNORE_INDEX`` on ``<s>``, prompt and padding tokens.
    """
    prompt_ids = tokenizer([prompt for prompt, _ in problems])["input_ids"]
    answer_ids = tokenizer([answer for _, answer in problems], add_special_tokens=False)["input_ids"]
    sequences = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompt_ids, answer_ids, strict=True)]
    length = max(len(sequence) for sequence in sequences)
    input_ids = torch.full((len(problems), length), tokenizer.pad_token_id)
    labels = torch.full((len(problems), length), IGNORE_INDEX)
    attention_mask = torch.zeros((len(problems), length), dtype=torch.long)
    for row, (prompt, sequence) in enumerate(zip(prompt_ids, sequences, strict=True)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(sequence[len(prompt) :])
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: Iterator[tuple[str, str]],
    monitor: Sequence[Mapping[str, str]],
    cfg: PretrainConfig,
) -> int:
    """Trains ``model`` in place on batches drawn from ``problems`` until it is good enough.

    Accuracy on the ``{"input", "output"}`` examples of ``monitor`` jumps from a few percent to
    most of them within a few hundred steps, at a step that depends on the seed and on rounding.
    Stopping when it first reaches ``cfg.target_accuracy`` therefore lands in the middle of that
    jump far more reliably than any fixed step count.

    Returns:
        The number of optimizer steps taken.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps))
    for step in range(1, cfg.max_steps + 1):
        model.train()
        loss = model(**make_batch(tokenizer, list(itertools.islice(problems, cfg.batch_size)))).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0:
            logger.info("step %d loss %.4f", step, loss.item())
        if step % cfg.eval_every == 0:
            accuracy = evaluate_accuracy(model, tokenizer, monitor, cfg.eval_batch_size)
            if accuracy >= cfg.target_accuracy:
                logger.info("step %d: monitored accuracy %.3f >= %.3f, stopping", step, accuracy, cfg.target_accuracy)
                return step
    logger.warning("monitored accuracy never reached %.3f in %d steps", cfg.target_accuracy, cfg.max_steps)
    return cfg.max_steps
