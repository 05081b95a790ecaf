"""The megatron engine's parallel layout: megatron's parallel_state groups (tensor, pipeline, data) for a
model, checked against the model before anything is built, and the pipeline broadcasts the Engine
contract needs (what only the last stage computes, every model-parallel rank returns)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import PretrainedConfig


@dataclass(frozen=True)
class MegatronLayout:
    """This rank's place in the tensor x pipeline x data-parallel grid and the groups of each."""

    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    vp_size: int  # chunks of layers per pipeline stage (1: no virtual pipeline)
    dp_size: int
    dp_rank: int
    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    model_parallel_group: dist.ProcessGroup | None
    last_stage_rank: int  # the global rank of this rank's pipeline's last stage
    vocab_start_index: int  # the first vocabulary entry of this rank's slice of the output layer
    sequence_parallel: bool

    def layer_offset(self, config: PretrainedConfig, chunk: int) -> int:
        """The first (whole-model) layer of this stage's chunk `chunk`: chunk c of stage s holds layers
        (c x pp + s) x k ... of k = layers / (pp x vp) each, as megatron interleaves them."""
        per_chunk = config.num_hidden_layers // (self.pp_size * self.vp_size)
        return (chunk * self.pp_size + self.pp_rank) * per_chunk

    @property
    def sequence_multiple(self) -> int:
        """What a sequence's length must divide by: the TP ranks' shares of it under sequence parallelism."""
        return self.tp_size if self.sequence_parallel else 1

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def from_last_stage_object(self, value: object) -> object:
        """The last stage's `value` on every stage of this pipeline (pickled; for small dicts of metrics)."""
        if self.pp_size == 1:
            return value
        box = [value if self.is_last_stage else None]
        dist.broadcast_object_list(box, src=self.last_stage_rank, group=self.pp_group)
        return box[0]

    def from_last_stage_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's `tensor` on every stage (the others pass one of the same shape and dtype)."""
        if self.pp_size > 1:
            dist.broadcast(tensor, src=self.last_stage_rank, group=self.pp_group)
        return tensor


def check_layout(config: PretrainedConfig, tp: int, pp: int, *, vp: int | None = None,
                 sequence_parallel: bool = False) -> MegatronLayout:
    """Fail early, naming the config key, if `tp` x `pp` cannot split this world and this model; then set up
    (or, in a process that already has it, reuse) megatron's parallel_state for it."""
    world = dist.get_world_size()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    checks = [
        (world % (tp * pp) == 0, f"model.tensor_model_parallel_size ({tp}) x model.pipeline_model_parallel_size ({pp}) "
                                 f"must divide the world size {world}"),
        (heads % tp == 0 and kv_heads % tp == 0, f"model.tensor_model_parallel_size={tp} must divide the "
                                                 f"{heads} attention and {kv_heads} key/value heads"),
        (config.vocab_size % tp == 0, f"model.tensor_model_parallel_size={tp} must divide the vocabulary "
                                      f"({config.vocab_size} entries)"),
        (config.num_hidden_layers % (pp * (vp or 1)) == 0,
         f"model.pipeline_model_parallel_size={pp} x model.virtual_pipeline_model_parallel_size={vp} must divide "
         f"the {config.num_hidden_layers} layers"),
        (not sequence_parallel or tp > 1, "model.sequence_parallel=true needs model.tensor_model_parallel_size > 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if parallel_state.model_parallel_is_initialized():
        sizes = (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size(),
                 parallel_state.get_virtual_pipeline_model_parallel_world_size())
        if sizes != (tp, pp, vp):
            raise ValueError(f"this process already runs megatron with tp, pp, vp = {sizes}, not {(tp, pp, vp)}")
    else:
        parallel_state.initialize_model_parallel(tp, pp, virtual_pipeline_model_parallel_size=vp)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    return MegatronLayout(
        tp_size=tp, tp_rank=tp_rank, pp_size=pp, pp_rank=parallel_state.get_pipeline_model_parallel_rank(), vp_size=vp or 1,
        dp_size=parallel_state.get_data_parallel_world_size(), dp_rank=parallel_state.get_data_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group() if tp > 1 else None,
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        model_parallel_group=parallel_state.get_model_parallel_group() if tp * pp > 1 else None,
        last_stage_rank=parallel_state.get_pipeline_model_parallel_last_rank(),
        vocab_start_index=tp_rank * config.vocab_size // tp, sequence_parallel=sequence_parallel)
