"""Hugging Face weights in and out of the megatron engine: the HF state read (or randomly initialised as the
torch_native engine initialises it, from the same seed), converted and cut into this rank's pipeline
stage and tensor-parallel slice; the whole model gathered back, converted and written as an HF directory."""

from __future__ import annotations

import contextlib
import copy
import glob
import os
import shutil
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from huggingface_hub import save_torch_state_dict
from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from nemo_aligner.engines.megatron.convert import (hf_to_megatron, megatron_to_hf, pipeline_stage_state,
                                                   stage_to_model_names, tensor_parallel_shard, tensor_parallel_unshard)
from nemo_aligner.engines.megatron.layout import MegatronLayout


def hf_state(config: PretrainedConfig, restore_from_path: str | None, seed: int) -> dict[str, torch.Tensor]:
    """The whole model's fp32 weights under transformers' names: read from the safetensors of
    `restore_from_path` (through transformers where it has none), or initialised by transformers from
    `seed` (the torch_native engine's random init, so both engines start from the same weights)."""
    if restore_from_path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32).state_dict()
    files = sorted(glob.glob(os.path.join(restore_from_path, "*.safetensors")))
    if not files:
        return AutoModelForCausalLM.from_pretrained(restore_from_path, dtype=torch.float32,
                                                    local_files_only=True).state_dict()
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update({name: tensor.float() for name, tensor in load_file(file).items()})
    if config.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return state


def num_parameters(state: dict[str, torch.Tensor], config: PretrainedConfig) -> int:
    """Elements of the model's distinct weights (a tied output layer counted once)."""
    tied = config.tie_word_embeddings and "lm_head.weight" in state
    return sum(t.numel() for t in state.values()) - (state["lm_head.weight"].numel() if tied else 0)


def load_local(module: nn.Module, state: dict[str, torch.Tensor], config: PretrainedConfig, layout: MegatronLayout) -> None:
    """Fill `module` (this rank's stage of megatron's GPTModel) with its slice of the HF weights `state`;
    every weight of the stage must be found."""
    stage = pipeline_stage_state(hf_to_megatron(state, config), config, layout.pp_rank, layout.pp_size)
    params = dict(module.named_parameters())
    local = {name: tensor_parallel_shard(name, tensor, layout.tp_rank, layout.tp_size).to(params[name].dtype)
             for name, tensor in stage.items() if name in params}
    missing, unexpected = module.load_state_dict(local, strict=False)
    missing = [name for name in missing if not name.endswith("._extra_state")]
    if missing or unexpected:
        raise KeyError(f"the {config.model_type} weights do not fill megatron's model: missing {missing[:5]}, "
                       f"unexpected {unexpected[:5]}")


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
                    adam.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
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


def whole_megatron_state(module: nn.Module, config: PretrainedConfig, layout: MegatronLayout) -> dict[str, torch.Tensor]:
    """Every weight of the model under megatron's whole-model names, on global rank 0 ({} elsewhere):
    tensor-parallel slices gathered within each stage, stages gathered on the first."""
    local = {}
    for name, param in module.named_parameters():
        piece = param.detach()
        if layout.tp_size > 1:
            pieces = [torch.empty_like(piece) for _ in range(layout.tp_size)]
            dist.all_gather(pieces, piece.contiguous(), group=layout.tp_group)
            piece = tensor_parallel_unshard(name, pieces)
        local[name] = piece.cpu()
    stage = stage_to_model_names(local, config, layout.pp_rank, layout.pp_size)
    if layout.tp_rank != 0 or layout.dp_rank != 0:
        return {}
    if layout.pp_size == 1:
        return stage
    stages: list[dict[str, torch.Tensor] | None] = [None] * layout.pp_size if layout.pp_rank == 0 else None
    dist.gather_object(stage, stages, dst=dist.get_global_rank(layout.pp_group, 0), group=layout.pp_group)
    if layout.pp_rank != 0:
        return {}
    return {name: tensor for piece in stages for name, tensor in piece.items()}  # type: ignore[union-attr]


def export_hf(module: nn.Module, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, layout: MegatronLayout,
              path: str, *, dtype: torch.dtype) -> None:
    """Write a Hugging Face directory (safetensors in `dtype`, sharded with an index when large; config;
    tokenizer) that transformers loads as is: gathered on global rank 0, written to `path.tmp` and
    renamed, so an interrupted export never looks complete."""
    whole = whole_megatron_state(module, config, layout)
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
