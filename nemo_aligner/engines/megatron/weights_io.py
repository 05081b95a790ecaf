"""Hugging Face weights in and out of the megatron engine: each weight of this rank's pipeline stage made from
the HF tensors it needs (read one at a time, or randomly initialised as the torch_native engine
initialises them, from the same seed) and cut to this rank's tensor-parallel slice; the whole model
gathered back, converted and written as an HF directory."""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import math
import os
import shutil
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from huggingface_hub import save_torch_state_dict
from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from nemo_aligner.engines.hf_dir import random_init
from nemo_aligner.engines.megatron.convert import (HF_LAYER, check_all_converted, conversions, megatron_to_hf,
                                                   renumbered, stage_to_model_names, tensor_parallel_shard,
                                                   tensor_parallel_unshard)
from nemo_aligner.engines.megatron.layout import MegatronLayout


class HFSource:
    """A Hugging Face model's tensors by transformers' names, read one at a time (fp32) when asked for:
    from a directory's safetensors (its index, else the files' headers, say where each one is), or from
    a state dict already in memory."""

    def __init__(self, files: dict[str, str] | None = None, state: dict[str, torch.Tensor] | None = None) -> None:
        self._files = files or {}
        self._state = state or {}
        self.names = set(self._files) | set(self._state)

    @classmethod
    def open(cls, config: PretrainedConfig, restore_from_path: str | None, seed: int) -> "HFSource":
        """The weights of `restore_from_path` (through transformers where it has no safetensors), or
        transformers' random init from `seed`: the torch_native engine's, so both start from the same."""
        if restore_from_path is None:
            return cls(state=random_init(config, seed))
        index = os.path.join(restore_from_path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return cls(files={name: os.path.join(restore_from_path, file) for name, file in weight_map.items()})
        files = sorted(glob.glob(os.path.join(restore_from_path, "*.safetensors")))
        if not files:
            return cls(state=AutoModelForCausalLM.from_pretrained(restore_from_path, dtype=torch.float32,
                                                                  local_files_only=True).state_dict())
        located = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                located.update({name: file for name in f.keys()})
        return cls(files=located)

    def read(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.names:  # tied: transformers saves the embedding only
            name = "model.embed_tokens.weight"
        if name in self._state:
            return self._state[name].float()
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name).float()

    def numel(self, name: str) -> int:
        if name in self._state:
            return self._state[name].numel()
        with safe_open(self._files[name], framework="pt") as f:
            return math.prod(f.get_slice(name).get_shape())


def num_parameters(source: HFSource, config: PretrainedConfig) -> int:
    """Elements of the model's distinct weights (a tied output layer counted once)."""
    names = source.names - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    return sum(source.numel(name) for name in names)


def load_local(module: nn.Module, source: HFSource, config: PretrainedConfig, layout: MegatronLayout, *,
               layer_offset: int) -> None:
    """Fill `module` (this rank's stage, or a chunk of it, of megatron's GPTModel, whose first layer is the
    whole model's `layer_offset`) with its slices of the HF weights, made one weight at a time from the
    tensors it needs: a rank never holds more than its own weights and one whole tensor being sliced.
    Every HF tensor must have a megatron counterpart."""
    qkv_bias = f"{HF_LAYER.format(0)}self_attn.q_proj.bias" in source.names
    check_all_converted(source.names - {"lm_head.weight"} if config.tie_word_embeddings else source.names, config,
                        qkv_bias=qkv_bias)
    makers = conversions(config, source.read, qkv_bias=qkv_bias)
    with torch.no_grad():
        for name, param in module.named_parameters():
            whole = renumbered(name, layer_offset)
            if name == "output_layer.weight" and config.tie_word_embeddings:  # the last stage's copy of the embedding
                whole = "embedding.word_embeddings.weight"
            if whole not in makers:
                raise KeyError(f"the {config.model_type} weights have nothing for megatron's {name}")
            param.copy_(tensor_parallel_shard(name, makers[whole](), layout.tp_rank, layout.tp_size))


def optimizer_tensors(optimizer: object) -> list[torch.Tensor]:
    """The distributed optimizer's own tensors (fp32 main weights where they are copies, Adam's moments),
    never views of the model's parameter buffer."""
    tensors = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(inner, "shard_fp32_from_float16_groups", []):
            tensors += [t for t in group if t is not None]
        for state in inner.optimizer.state.values():
            tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return [t for t in tensors if t.untyped_storage().nbytes() == t.numel() * t.element_size()]


def fuse_torch_adam(optimizer: object) -> None:
    """Step megatron's torch AdamW with the fused kernel. megatron-core without TransformerEngine or apex
    builds torch's AdamW with its defaults, the foreach kernels (one launch per op and tensor list: 9.8 ms
    a step for the 0.5B shape on an H200, against 4.5 ms for the torch_native engine's fused AdamW). The
    flag is read by every step, and the step counts then live on the parameters' device, as the fused
    kernel needs (torch places those it creates or loads there itself)."""
    if not USING_PYTORCH_OPTIMIZER:  # TransformerEngine's or apex's FusedAdam is fused already
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in inner.optimizer.param_groups:
            group["fused"], group["foreach"] = True, False


def initialise_adam_state(optimizer: object) -> None:
    """Give every main parameter without optimizer state zero moments and step 0, as a checkpoint load
    expects: megatron's distributed optimizer reads the (single) step of its torch Adam before it can
    load into it, and megatron-core without TransformerEngine or apex initialises no step itself."""
    if not USING_PYTORCH_OPTIMIZER:  # TransformerEngine's or apex's FusedAdam keeps its step per group
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = inner.optimizer
        for group in adam.param_groups:
            for param in group["params"]:
                if not adam.state[param]:
                    step = torch.zeros((), device=param.device) if group.get("fused") else torch.tensor(0.0)
                    adam.state[param] = {"step": step, "exp_avg": torch.zeros_like(param),
                                         "exp_avg_sq": torch.zeros_like(param)}


@contextlib.contextmanager
def step_kept_apart(optimizer: object) -> Iterator[None]:
    """Around a distributed optimizer's load_state_dict of a fully reshardable checkpoint: megatron-core
    0.16.1 with torch's Adam (no TransformerEngine or apex) copies every state key of a main parameter
    from the checkpoint's tensors, "step" included, which that format keeps apart (KeyError: 'step'). Inside
    the block each main parameter and its moments are copied and the step, which load_state_dict has
    already set from the checkpoint, is left as it is. That step is one tensor shared by every parameter's
    state, which torch's Adam would then advance once per parameter; after the block each has its own."""
    if not USING_PYTORCH_OPTIMIZER:
        yield
        return
    inners = list(getattr(optimizer, "chained_optimizers", [optimizer]))

    def copier(inner: object) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], None]:
        def set_states(model_param: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
            group_index, group_order = inner.model_param_group_index_map[model_param]  # type: ignore[attr-defined]
            main_param = inner.optimizer.param_groups[group_index]["params"][group_order]  # type: ignore[attr-defined]
            state = inner.optimizer.state[main_param]  # type: ignore[attr-defined]
            for key, value in tensors.items():
                (main_param if key == "param" else state[key]).detach().copy_(value)
        return set_states

    for inner in inners:
        inner._set_main_param_and_optimizer_states = copier(inner)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for inner in inners:
            del inner._set_main_param_and_optimizer_states  # type: ignore[attr-defined]
            for state in inner.optimizer.state.values():  # type: ignore[attr-defined]
                if "step" in state:
                    state["step"] = state["step"].detach().clone()


def whole_megatron_state(chunks: list[nn.Module], config: PretrainedConfig, layout: MegatronLayout) -> dict[str, torch.Tensor]:
    """Every weight of the model under megatron's whole-model names, on global rank 0 ({} elsewhere):
    tensor-parallel slices gathered within each stage, the stage's chunks renamed, stages gathered on
    the first."""
    stage: dict[str, torch.Tensor] = {}
    for index, chunk in enumerate(chunks):
        local = {}
        for name, param in chunk.named_parameters():
            piece = param.detach()
            if layout.tp_size > 1:
                pieces = [torch.empty_like(piece) for _ in range(layout.tp_size)]
                dist.all_gather(pieces, piece.contiguous(), group=layout.tp_group)
                piece = tensor_parallel_unshard(name, pieces)
            local[name] = piece.cpu()
        stage.update(stage_to_model_names(local, config, layout.layer_offset(config, index)))
    if layout.tp_rank != 0 or layout.dp_rank != 0:
        return {}
    if layout.pp_size == 1:
        return stage
    stages: list[dict[str, torch.Tensor] | None] = [None] * layout.pp_size if layout.pp_rank == 0 else None
    dist.gather_object(stage, stages, dst=dist.get_global_rank(layout.pp_group, 0), group=layout.pp_group)
    if layout.pp_rank != 0:
        return {}
    return {name: tensor for piece in stages for name, tensor in piece.items()}  # type: ignore[union-attr]


def export_hf(chunks: list[nn.Module], config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
              layout: MegatronLayout, path: str, *, dtype: torch.dtype) -> None:
    """Write a Hugging Face directory (safetensors in `dtype`, sharded with an index when large; config;
    tokenizer) that transformers loads as is: gathered on global rank 0, written to `path.tmp` and
    renamed, so an interrupted export never looks complete."""
    whole = whole_megatron_state(chunks, config, layout)
    if dist.get_rank() == 0:
        weights = megatron_to_hf(whole, config)
        if config.tie_word_embeddings:
            weights.pop("lm_head.weight")
        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_torch_state_dict({name: t.to(dtype).clone() for name, t in weights.items()}, tmp)  # views share storage
        out_config = copy.deepcopy(config)
        out_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        out_config.dtype = str(dtype).removeprefix("torch.")
        out_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()
