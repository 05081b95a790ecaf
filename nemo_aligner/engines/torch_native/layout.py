"""The (dp, tp) layout of the torch_native engine: checks that it fits the model, and its device mesh."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from transformers import PretrainedConfig

from nemo_aligner.config.schema import Precision
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)

# Families whose decoder layers use q/k/v/o and gate/up/down projections (tensor_parallel.py's plan).
TP_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
# Families whose transformers implementation keeps attention within each sequence of a packed row
# (a document mask from restarting position ids), checked against padded rows in tests/test_packing.py.
PACKING_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "gpt2")


@dataclass(frozen=True)
class ParallelDims:
    """The (dp, tp) layout of the job; dp is derived from the world size."""

    dp: int
    tp: int

    @classmethod
    def from_world(cls, world_size: int, tp: int) -> "ParallelDims":
        if world_size % tp != 0:
            raise ValueError(
                f"model.tensor_model_parallel_size={tp} does not divide the world size {world_size} "
                "(trainer.devices x trainer.num_nodes processes); choose a divisor of it"
            )
        return cls(dp=world_size // tp, tp=tp)


def check_no_pipeline(pp: int) -> None:
    """This engine has data and tensor parallelism only."""
    if pp != 1:
        raise ValueError(f"model.pipeline_model_parallel_size={pp} is not supported: the torch_native engine has data "
                         "and tensor parallelism only (set it to 1)")


def check_tensor_parallel(config: PretrainedConfig, tp: int) -> None:
    """Fail early, saying what to change, if `tp` cannot split this model's heads or family."""
    if tp == 1:
        return
    if config.model_type not in TP_FAMILIES:
        raise ValueError(
            f"model.tensor_model_parallel_size={tp} is not supported for model_type "
            f"'{config.model_type}'; tensor parallelism supports {list(TP_FAMILIES)} (use 1)"
        )
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % tp or kv_heads % tp:
        divisors = [d for d in range(1, heads + 1) if heads % d == 0 and kv_heads % d == 0]
        raise ValueError(
            f"model.tensor_model_parallel_size={tp} must divide num_attention_heads={heads} and "
            f"num_key_value_heads={kv_heads}; valid sizes for this model: {divisors}"
        )


# replicated training state per parameter under bf16 mixed precision: bf16 weights and fp32 masters,
# gradient buffer and AdamW moments (2 + 4 + 4 + 8 bytes)
REPLICATED_BYTES_PER_PARAMETER = 18
REPLICATED_SHARE_OF_DEVICE_MEMORY = 0.4


def resolve_sharding(requested: str, parameters: int, tp: int, device: torch.device) -> bool:
    """Whether data-parallel ranks replicate the model (model.data_parallel_sharding; `auto` resolved)."""
    if requested != "auto":
        return requested == "replicate"
    if device.type != "cuda":
        return True
    needed = parameters / tp * REPLICATED_BYTES_PER_PARAMETER
    return needed <= REPLICATED_SHARE_OF_DEVICE_MEMORY * torch.cuda.get_device_properties(device).total_memory


def resolve_packing(config: PretrainedConfig, requested: bool | None, device: torch.device, precision: Precision) -> bool:
    """model.data.packing with null resolved: on where it is faster, i.e. on CUDA in bf16 (variable-length
    flash attention, no padding) for a family whose packed rows keep sequences apart; off on CPU, where
    a packed row's attention is a dense document mask, quadratic in the row. An explicit true is refused
    for any other family."""
    if requested is None:
        return device.type == "cuda" and precision is not Precision.fp32 and config.model_type in PACKING_FAMILIES
    if requested and config.model_type not in PACKING_FAMILIES:
        raise ValueError(f"model.data.packing=true is not supported for model_type '{config.model_type}': packed "
                         f"sequences are kept apart for {list(PACKING_FAMILIES)}; set model.data.packing=false")
    return requested


def build_mesh(dims: ParallelDims, device: torch.device) -> DeviceMesh:
    """A 2-D (dp, tp) device mesh; tp is the inner (fastest varying) dimension."""
    mesh = init_device_mesh(device.type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
    log_rank0(logger, "device mesh: dp=%d tp=%d on %s", dims.dp, dims.tp, device.type)
    return mesh
