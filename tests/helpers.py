"""Test helpers: tiny random HF model directories, small configs and batches, a torchrun launcher."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from nemo_aligner.config.schema import ModelConfig, OptimConfig, Precision, PretrainedCheckpointConfig, SchedConfig, TrainerConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL_DIR = os.path.join(REPO, "examples", "tiny", "model")

_SHAPE = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _tokenizer(path: str) -> None:
    tok = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=_SHAPE["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=list("0123456789+-= "))
    tok.train_from_iterator(["12+34=46", "5-3=2", "100+250=350", "77-7=70"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>").save_pretrained(path)


# The families README.md names: each trains with data parallel (tests/test_gpt_model.py); the
# first four also with tensor parallel.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt2")


def make_model_dir(path: str, family: str, seed: int = 0) -> str:
    """A random-init HF model directory of `family` (one of FAMILIES) with a tokenizer; Llama ties
    its embeddings, Qwen2 does not."""
    if family == "gpt2":
        config = GPT2Config(vocab_size=_SHAPE["vocab_size"], n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif family == "llama":
        config = LlamaConfig(**_SHAPE, tie_word_embeddings=True)
    elif family == "qwen2":
        config = Qwen2Config(**_SHAPE, tie_word_embeddings=False)
    else:
        config = AutoConfig.for_model(family, **_SHAPE, head_dim=_SHAPE["hidden_size"] // _SHAPE["num_attention_heads"])
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    _tokenizer(path)
    return path


def model_cfg(**overrides: object) -> ModelConfig:
    """A small fp32 training config; keyword overrides replace ModelConfig fields.

    Adam eps=1e-4 keeps the first update a smooth function of the gradient: with 1e-8, gradients at
    the 1e-9 rounding-noise level flip the sign of a full lr-sized update and no comparison holds.
    """
    base = dict(micro_batch_size=2, global_batch_size=4, seed=3, log_prob_chunk_size=7,
                optim=OptimConfig(lr=1e-2, weight_decay=0.1, eps=1e-4, sched=SchedConfig(warmup_steps=0, min_lr=0.0)))
    base.update(overrides)
    return ModelConfig(**base)  # type: ignore[arg-type]


def loader_args(policy: object, model: ModelConfig, *, global_batch: bool = True) -> dict[str, object]:
    """The plain values the data builders take, from a built policy and its model config."""
    args = dict(tokenizer=policy.tokenizer, data=model.data, max_seq_length=model.encoder_seq_length,  # type: ignore[attr-defined]
                data_parallel=policy.data_parallel)  # type: ignore[attr-defined]
    return {**args, "global_batch_size": model.global_batch_size} if global_batch else args


def pretrained(path: str) -> PretrainedCheckpointConfig:
    return PretrainedCheckpointConfig(restore_from_path=path)


FP32 = TrainerConfig(devices=1, num_nodes=1, precision=Precision.fp32)


def right_padded_batch(rows: int, seq: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random right-padded rows; the first 2 tokens of each row are an untrained prompt."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, seq), generator=gen)
    lengths = torch.randint(4, seq + 1, (rows,), generator=gen)
    attention = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    loss_mask = attention.float()
    loss_mask[:, :2] = 0
    return {"input_ids": ids * attention, "attention_mask": attention, "loss_mask": loss_mask}


def torchrun_command(nproc: int, script: str, *args: str) -> list[str]:
    """The command line that runs `script` under torchrun with `nproc` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def torchrun(nproc: int, script: str, *args: str, timeout: int = 300) -> str:
    """Run `script` under torchrun with `nproc` CPU processes; fail the test with its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = torchrun_command(nproc, script, *args)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc.stdout + proc.stderr


def write_pairs(path: str, pairs: int, seed: int = 0) -> str:
    """A preference JSONL of addition problems: chosen correct, rejected off by one."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(pairs):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "chosen_response": str(a + b),
                                "rejected_response": str(a + b + 1), "chosen_reward": 2.0}) + "\n")
    return path


def write_sft(path: str, examples: int, seed: int = 0) -> str:
    """An SFT JSONL of addition problems (input/output)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(examples):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            f.write(json.dumps({"input": f"{a}+{b}=", "output": str(a + b)}) + "\n")
    return path


def accumulated_grads(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """A torch_native model's accumulated gradients by parameter name, as full tensors, under either
    data-parallel sharding (replicated: the engine's fp32 buffers; FSDP: the parameters' .grad)."""
    engine = model.engine
    grads = (engine.replicated.gradients() if engine.replicated
             else {name: p.grad for name, p in engine.module.named_parameters()})
    return {name: g.full_tensor() if hasattr(g, "full_tensor") else g for name, g in grads.items()}


def finish_check(results: dict, out: str | None) -> None:
    """End a GPU check script: results (with "passed") printed, written to `out` if given, and the
    exit status 0 only if it passed."""
    print(json.dumps(results, indent=2))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
    sys.exit(0 if results["passed"] else 1)
