"""Parallel HF load (engines/torch_native/hf_load.py): the weights each rank reads for itself equal what
the rank-0 path (transformers' from_pretrained, broadcast) gives, bit for bit, for every stored layout."""

from __future__ import annotations

import logging
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import FAMILIES, FP32, model_cfg, pretrained
from nemo_aligner.engines.torch_native.hf_load import load_full_state_dict
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel


def _weights(model: GPTModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.engine.module.named_parameters()}


def _rank0_path(path: str) -> dict[str, torch.Tensor]:
    """The same model filled by the rank-0 path (transformers' own loading, then broadcast), starting from
    zeroed weights so that a load that changed nothing would show."""
    model = GPTModel(model_cfg(), pretrained(path), FP32)
    with torch.no_grad():
        for param in model.engine.module.parameters():
            param.zero_()
    load_full_state_dict(model.engine.module,
                         AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict())
    return _weights(model)


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_in_parallel_as_the_rank0_path_does(family: str, family_dir, caplog) -> None:
    path = family_dir(family)
    with caplog.at_level(logging.INFO, logger="nemo_aligner.engines.torch_native.hf_load"):
        loaded = _weights(GPTModel(model_cfg(), pretrained(path), FP32))
    assert "each rank reading its own part" in caplog.text  # the parallel path, not the fallback
    _assert_equal(loaded, _rank0_path(path))


def test_sharded_and_bf16_directories_load_in_parallel(llama_dir: str, tmp_path) -> None:
    """An index with several shards, and tensors stored in bf16 (cast once into the fp32 parameters)."""
    for name, kwargs in (("sharded", dict(max_shard_size="20KB")), ("bf16", dict(dtype=torch.bfloat16))):
        path = str(tmp_path / name)
        model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=kwargs.pop("dtype", torch.float32))
        model.save_pretrained(path, **kwargs)
        for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(llama_dir, tokenizer_file), path)
        if name == "sharded":
            assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
        _assert_equal(_weights(GPTModel(model_cfg(), pretrained(path), FP32)), _rank0_path(path))


def test_a_directory_without_safetensors_falls_back_to_the_rank0_path(llama_dir: str, tmp_path, caplog) -> None:
    """A PyTorch-pickle checkpoint (pytorch_model.bin) has no safetensors to read in parallel: it is loaded
    through transformers on rank 0 and broadcast, and the log says so."""
    path = str(tmp_path / "bin")
    shutil.copytree(llama_dir, path)
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(llama_dir).state_dict(), os.path.join(path, "pytorch_model.bin"))
    with caplog.at_level(logging.INFO, logger="nemo_aligner.engines.torch_native.hf_load"):
        loaded = _weights(GPTModel(model_cfg(), pretrained(path), FP32))
    assert "no safetensors files: loading it on rank 0 through transformers" in caplog.text
    _assert_equal(loaded, _weights(GPTModel(model_cfg(), pretrained(llama_dir), FP32)))
