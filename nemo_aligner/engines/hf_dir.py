"""A Hugging Face model's config, tokenizer and random init for every engine: read from a local directory
only (never a hub), with errors that name the config key to change."""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase


def load_hf_config(restore_from_path: str | None, model_config: dict[str, Any] | None) -> PretrainedConfig:
    """The model's HF config, from `restore_from_path/config.json` or from a dict with `model_type`."""
    if restore_from_path is not None:
        _check_model_dir(restore_from_path)
        return AutoConfig.from_pretrained(restore_from_path, local_files_only=True)
    assert model_config is not None
    kwargs = dict(model_config)
    if "model_type" not in kwargs:
        raise ValueError("pretrained_checkpoint.model_config needs a 'model_type' key (e.g. llama, qwen2)")
    if "attn_implementation" in kwargs:
        raise ValueError("pretrained_checkpoint.model_config.attn_implementation is not read; set "
                         f"model.attn_implementation={kwargs['attn_implementation']} instead")
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def random_init(config: PretrainedConfig, seed: int) -> dict[str, torch.Tensor]:
    """transformers' random init of `config` in fp32 from `seed` (the global RNG left as it was): the same
    weights whichever engine and layout asks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside a model (local files only); pad falls back to EOS."""
    _check_model_dir(path, need_config=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} defines no EOS token; generation and response masking need one")
    return tokenizer


def _check_model_dir(path: str, need_config: bool = True) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model directory '{path}' does not exist or is not a directory; set "
            "pretrained_checkpoint.restore_from_path to a local Hugging Face model directory"
        )
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"model directory '{path}' is not readable by this user")
    if need_config and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"'{path}' has no config.json, so it is not a Hugging Face model directory; point "
            "pretrained_checkpoint.restore_from_path at the folder that holds config.json and *.safetensors"
        )

