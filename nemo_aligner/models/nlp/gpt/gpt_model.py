"""GPTModel: the policy base that DPO, SPIN and rejection-sampling models extend.

It validates the parallel layout against the model, builds the network on an engine, and
offers the operations every algorithm needs: forward/backward of a loss over per-token
log-probs, forward-only log-probs, an optimizer step, generation, optimizer-state offload,
checkpoint save/load and Hugging Face export. Algorithms talk to this class, never to engines.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.distributed as dist

from nemo_aligner.config.schema import EngineName, ModelConfig, Precision, PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.data.collate import prompt_collate
from nemo_aligner.engines.base import Batch, Generations, LengthParams, LossFn, SamplingParams
from nemo_aligner.engines.torch_native.build import check_tensor_parallel, load_hf_config, load_tokenizer
from nemo_aligner.engines.torch_native.engine import TorchNativeEngine
from nemo_aligner.utils.distributed import (ParallelDims, all_reduce_max, all_reduce_sum, build_mesh, init_distributed,
                                            log_rank0)

logger = logging.getLogger(__name__)


class GPTModel:
    """A causal LM policy on a (dp, tp) mesh with micro-batch / global-batch semantics.

    `global_batch_size = micro_batch_size x dp x accumulation_steps`; each data-parallel rank
    receives `global_batch_size / dp` sequences per step and splits them into micro-batches.
    """

    def __init__(self, cfg: ModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        if cfg.engine is not EngineName.torch_native:
            raise NotImplementedError(f"model.engine={cfg.engine.value} is not available yet; use torch_native")
        self.cfg = cfg
        device = init_distributed()
        check_world_size(trainer.devices, trainer.num_nodes, dist.get_world_size())
        hf_config = load_hf_config(pretrained.restore_from_path, pretrained.model_config)
        check_tensor_parallel(hf_config, cfg.tensor_model_parallel_size)
        self.dims = ParallelDims.from_world(dist.get_world_size(), cfg.tensor_model_parallel_size)
        self.accumulation_steps = check_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, self.dims.dp)
        tokenizer_path = pretrained.tokenizer_path or pretrained.restore_from_path
        if tokenizer_path is None:
            raise ValueError("pretrained_checkpoint.tokenizer_path must be set when the model is built from model_config")
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.precision = precision = trainer.precision
        param_dtype = torch.bfloat16 if precision is Precision.bf16 else torch.float32
        mesh = build_mesh(self.dims, device)
        self.engine = TorchNativeEngine(
            hf_config=hf_config, tokenizer=self.tokenizer, mesh=mesh, device=device,
            restore_from_path=pretrained.restore_from_path, param_dtype=param_dtype, seed=cfg.seed,
            log_prob_chunk_size=cfg.log_prob_chunk_size,
        )
        self.device = device
        log_rank0(logger, "built %s: %.1fM parameters, dp=%d tp=%d, %d micro-batches of %d per step, %s",
                  self.engine.architecture, self.num_parameters() / 1e6, self.dims.dp, self.dims.tp,
                  self.accumulation_steps, cfg.micro_batch_size, precision.value)

    @property
    def module(self) -> torch.nn.Module:
        """The parallelised network (FSDP/DTensor-wrapped HF module)."""
        return self.engine.module

    @property
    def dp_rank(self) -> int:
        return self.engine.dp_rank

    @property
    def local_batch_size(self) -> int:
        """Sequences this data-parallel rank processes per optimizer step."""
        return self.cfg.global_batch_size // self.dims.dp

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def setup_optimizer(self, max_steps: int) -> None:
        """Build AdamW and the LR schedule; `max_steps` is the decay horizon."""
        self.engine.setup_optimizer(self.cfg.optim, max_steps=max_steps)

    # ------------------------------------------------------------------ compute
    def forward_backward(self, batch: Batch, loss_fn: LossFn, *, forward_only: bool = False,
                         micro_batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """Apply `loss_fn` over this rank's batch in micro-batches of `micro_batch_size` rows
        (default: the config's); returns metrics summed over data-parallel ranks.

        `loss_fn` must return each micro-batch's share of the global loss (see engines/base.py).
        A NaN or inf loss raises FloatingPointError after the backward, before any optimizer step.
        """
        micro_batches = self.micro_batches(batch, micro_batch_size)
        metrics = self.engine.forward_backward(micro_batches, loss_fn, forward_only=forward_only)
        metrics = {name: self.global_sum(value) for name, value in metrics.items()}
        if not torch.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss'].item()}")
        return metrics

    @torch.no_grad()
    def get_logprobs(self, batch: Batch, micro_batch_size: int | None = None) -> torch.Tensor:
        """Per-token log-probs [B, T-1] of the whole `batch`, computed micro-batch by micro-batch."""
        return torch.cat([self.engine.logprobs(mb) for mb in self.micro_batches(batch, micro_batch_size)])

    def optimizer_step(self, max_grad_norm: float) -> tuple[float, float]:
        """Clip by the global gradient norm, step, advance the LR; returns (grad_norm, lr)."""
        return self.engine.optimizer_step(max_grad_norm)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                 length: LengthParams) -> Generations:
        """Continue left-padded prompts [B, P]; see engines/torch_native/generation.py."""
        return self.engine.generate(input_ids, attention_mask, sampling, length)

    @torch.no_grad()
    def generate_responses(self, prompts: list[torch.Tensor], sampling: SamplingParams, length: LengthParams, *,
                           micro_batch_size: int, offload_optimizer: bool) -> list[torch.Tensor]:
        """Each prompt's response (new tokens, EOS included when produced), generated in chunks of
        `micro_batch_size` left-padded prompts; with `offload_optimizer` the optimizer state waits
        on CPU meanwhile and is restored exactly. Every data-parallel rank must pass as many prompts."""
        if offload_optimizer:
            self.offload_optimizer_state()
        responses: list[torch.Tensor] = []
        try:
            for start in range(0, len(prompts), micro_batch_size):
                chunk = prompt_collate(prompts[start : start + micro_batch_size], pad_token_id=self.tokenizer.pad_token_id)
                out = self.generate(chunk["input_ids"].to(self.device), chunk["attention_mask"].to(self.device),
                                    sampling, length)
                width = chunk["input_ids"].shape[1]
                responses += [out.tokens[i, width : width + n].cpu() for i, n in enumerate(out.response_lengths.tolist())]
        finally:
            if offload_optimizer:
                self.onload_optimizer_state()
        return responses

    def offload_optimizer_state(self) -> None:
        self.engine.offload_optimizer_state()

    def onload_optimizer_state(self) -> None:
        self.engine.onload_optimizer_state()

    # ------------------------------------------------------------------ helpers
    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over data-parallel ranks (e.g. a global token count for normalising)."""
        return all_reduce_sum(value.detach().clone().to(self.device), self.engine.dp_group)

    def global_max(self, value: torch.Tensor) -> torch.Tensor:
        """Max over data-parallel ranks (min: -global_max(-x))."""
        return all_reduce_max(value.detach().clone().to(self.device), self.engine.dp_group)

    def micro_batches(self, batch: Batch, micro_batch_size: int | None = None) -> Sequence[Batch]:
        """Split a batch along dim 0 into micro-batches of `micro_batch_size` (default: the config's)."""
        size = micro_batch_size or self.cfg.micro_batch_size
        rows = next(iter(batch.values())).shape[0]
        if rows % size:
            raise ValueError(f"batch of {rows} rows does not split into micro-batches of {size}")
        return [{k: v[i : i + size].to(self.device) for k, v in batch.items()} for i in range(0, rows, size)]

    # -------------------------------------------------------------- checkpoints
    def save(self, path: str) -> None:
        self.engine.save(path)

    def load(self, path: str, *, with_optimizer: bool = True) -> None:
        self.engine.load(path, with_optimizer=with_optimizer)

    def save_weights(self, path: str) -> None:
        """Sharded weights only (no optimizer); `load(path, with_optimizer=False)` reads them."""
        self.engine.save_weights(path)

    def state_dict(self) -> dict[str, object]:
        """Non-weight training state (LR scheduler, generation counter), for the checkpoint."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.engine.load_state_dict(state)

    def export_hf(self, path: str) -> None:
        """Write a Hugging Face model directory (bf16 weights when training in bf16)."""
        self.engine.export_hf(path, torch.bfloat16 if self.precision is Precision.bf16 else torch.float32)


def check_world_size(devices: int, num_nodes: int, world_size: int) -> None:
    """trainer.devices x trainer.num_nodes must be the number of processes torchrun started."""
    if devices * num_nodes != world_size:
        raise ValueError(
            f"trainer.devices ({devices}) x trainer.num_nodes ({num_nodes}) = {devices * num_nodes}, but "
            f"{world_size} processes were launched; set them to match torchrun --nproc_per_node / --nnodes"
        )


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """The gradient-accumulation steps; raises if the global batch does not split evenly."""
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(
            f"model.global_batch_size={global_batch_size} must be a multiple of model.micro_batch_size "
            f"({micro_batch_size}) x data-parallel size ({dp}) = {micro_batch_size * dp}; e.g. set "
            f"model.global_batch_size={max(1, round(global_batch_size / (micro_batch_size * dp))) * micro_batch_size * dp}"
        )
    return global_batch_size // (micro_batch_size * dp)
