"""LoRA adapters on the Hugging Face module, through peft (model.peft.peft_scheme=lora).

peft injects its `lora.Linear` around each target linear layer (`inject_adapter_in_model`, on the meta
model, before it is parallelised): the base layer moves to `<name>.base_layer` and the adapters are
`<name>.lora_A.default` (r x in) and `<name>.lora_B.default` (out x r); the layer computes
base(x) + (alpha / r) · B(A(dropout(x))). Only the adapters train: every other parameter is frozen and
held in the compute dtype, with no master copy, gradient or optimizer state. A is drawn as peft draws it
(Kaiming-uniform), B is zero, so training starts from the base model exactly; the draw is seeded and made
whole on every rank, so every parallel layout starts from the same adapters.

Names: a base weight's state-dict name has `.base_layer` where the Hugging Face name has none
(`hf_name`); merged exports and loads from an HF directory go through it.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Iterator

import torch
import torch.distributed as dist
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from nemo_aligner.config.schema import LoraTuningConfig

ADAPTER = "default"  # peft's name of the one adapter
BASE_LAYER = ".base_layer"
PEFT_PREFIX = "base_model.model."  # the names a PeftModel's adapter files use


def peft_config(cfg: LoraTuningConfig) -> LoraConfig:
    return LoraConfig(r=cfg.adapter_dim, lora_alpha=cfg.alpha, lora_dropout=cfg.adapter_dropout,
                      target_modules=cfg.hf_target_modules(), bias="none", task_type="CAUSAL_LM")


def inject_lora(module: nn.Module, cfg: LoraTuningConfig, *, compute_dtype: torch.dtype) -> None:
    """Put adapters on the target layers of the (meta) `module` in place; freeze everything else and hold it
    in `compute_dtype`. A target that matches no layer is an error naming the model's linear layers."""
    try:
        inject_adapter_in_model(peft_config(cfg), module)
    except ValueError as err:
        linear = sorted({name.rpartition(".")[2] for name, m in module.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"model.peft.lora_tuning.target_modules={cfg.target_modules}: {err} "
                         f"(this model's linear layers: {', '.join(linear)})") from None
    frozen: dict[int, nn.Parameter] = {}  # tied parameters stay one parameter
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.requires_grad:
                if id(param) not in frozen:
                    frozen[id(param)] = nn.Parameter(param.detach().to(compute_dtype), requires_grad=False)
                sub._parameters[name] = frozen[id(param)]


def lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def hf_name(name: str) -> str:
    """A state-dict name in the Hugging Face model's terms (the base layer's weight is the layer's)."""
    return name.replace(BASE_LAYER + ".", ".")


def init_adapters(module: nn.Module, seed: int) -> None:
    """A ~ Kaiming-uniform(a=√5) (peft's default), B = 0, drawn whole from `seed` on every rank (the same
    values everywhere) and each rank keeping its own piece."""
    generator = torch.Generator().manual_seed(seed)
    full: dict[str, torch.Tensor] = {}
    for name, param in sorted(module.named_parameters()):
        if ".lora_A." in name:
            weight = torch.empty(param.shape, dtype=torch.float32)
            bound = 1 / math.sqrt(weight.shape[1])  # kaiming_uniform_(a=√5)'s bound: √3 · √(2 / (1 + 5)) / √fan_in
            full[name] = weight.uniform_(-bound, bound, generator=generator).to(param.dtype)
        elif ".lora_B." in name:
            full[name] = torch.zeros(param.shape, dtype=param.dtype)
    set_model_state_dict(module, full, options=StateDictOptions(full_state_dict=True, strict=False))


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """The base network inside the block (peft's enable_adapters(False) on every LoRA layer): exactly the
    model the adapters started from. peft also switches the adapters' requires_grad off and on; that is
    undone, so which parameters train (the engine's weight buffers, checkpoints) never depends on the block,
    and compiled layers see no guard change but the flag."""
    layers = lora_layers(module).values()
    trains = {param: param.requires_grad for layer in layers for param in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    _set_requires_grad(trains)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        _set_requires_grad(trains)


def _set_requires_grad(trains: dict[nn.Parameter, bool]) -> None:
    for param, requires_grad in trains.items():
        param.requires_grad_(requires_grad)


@contextlib.contextmanager
def adapter_dropout_active(module: nn.Module) -> Iterator[None]:
    """The adapters' dropout in training mode inside the block (the rest of the network keeps dropout off)."""
    dropouts = [d for layer in lora_layers(module).values() for d in layer.lora_dropout.values()]
    for dropout in dropouts:
        dropout.train(True)
    try:
        yield
    finally:
        for dropout in dropouts:
            dropout.train(False)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def merged_weights(module: nn.Module, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every weight under its Hugging Face name, each LoRA layer's as base + (alpha / r) · B·A (in fp32),
    this rank's piece of it (placed like the base weight). `trained` holds the adapters' training values by
    state-dict name (the masters where they exist); the frozen base comes from the module. Collective: the
    adapters (small) are made whole on every rank."""
    merged = {hf_name(name): p for name, p in module.state_dict(keep_vars=True).items() if not is_adapter(name)}
    for path, layer in lora_layers(module).items():
        scale = layer.scaling[ADAPTER]
        a = _full(trained[f"{path}.lora_A.{ADAPTER}.weight"]).float()
        b = _full(trained[f"{path}.lora_B.{ADAPTER}.weight"]).float()
        base = layer.get_base_layer().weight
        delta = scale * (b @ a)
        if isinstance(base, DTensor):
            delta = distribute_tensor(delta, base.device_mesh, base.placements, src_data_rank=None)
        merged[f"{path}.weight"] = base.detach().float() + delta
    return merged


def save_peft_adapter(module: nn.Module, trained: dict[str, torch.Tensor], cfg: LoraTuningConfig,
                      base_model: str | None, path: str) -> None:
    """`path` as `PeftModel.save_pretrained` writes it (adapter_config.json, adapter_model.safetensors in
    fp32), which `PeftModel.from_pretrained(base, path)` loads. Collective; rank 0 writes."""
    adapters = {PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."): _full(tensor).detach().float().cpu().contiguous()
                for name, tensor in trained.items() if is_adapter(name)}
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        save_file(adapters, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
        config = peft_config(cfg)
        config.base_model_name_or_path = base_model
        config.target_modules = sorted({name.rpartition(".")[2] for name in lora_layers(module)})
        config.save_pretrained(path)
    dist.barrier()
