"""The interface between GPTModel and an engine that builds, runs and saves the network.

GPTModel talks to an engine only through `Engine`; it picks one by name from the registry
(nemo_aligner/engines/registry.py), which calls the engine's `EngineBuilder`. Everything an engine
needs to know about the model's layout (device mesh or process groups, the HF config, the
tokenizer, checks that the layout fits the model) is built inside the engine package.

Contracts every engine honours, also one that pipelines the network over stages:
- Batches and log-probs follow nemo_aligner/types.py. A loss function receives the per-token
  log-probs [B, T-1] fp32 of one micro-batch and the micro-batch itself, and returns its *share of
  the global mean* (already divided by a count summed over data-parallel ranks) and metric sums in
  the same sense. The engine backpropagates that loss as given: summing it over micro-batches and
  data-parallel ranks must give the global mean's gradient. An engine whose schedule divides by
  the number of micro-batches, or whose data-parallel reduction averages, multiplies that back.
- Under pipeline parallelism only the last stage holds log-probs and calls the loss function; the
  metric sums `forward_backward` returns, and the log-probs `logprobs` returns, are broadcast to
  every rank of the model-parallel group, so every rank returns the same values.
- `forward_backward` returns this rank's sums over its micro-batches: `loss`, every metric of the
  loss function, and `num_tokens` (real tokens processed). Reducing them over data-parallel ranks
  is the caller's (`reduce_data_parallel`), identical on every engine.
- `forward_only=True` computes no gradients and leaves parameters, gradients and optimizer state
  as they were; afterwards the sharded (or otherwise canonical) weights are again the only live
  copy, so host copies and checkpoints read and write the weights the optimizer updates.
- Weight buffers (`allocate_weights`, `copy_weights_to`, `swapped_weights`), on the host or the
  device, are this rank's local pieces of every distinct parameter, by name; they carry the
  reference policy (nemo_aligner/reference/). They hold the weights the forward computes with
  (bf16 copies of fp32 masters where an engine keeps masters apart); in the parameters' dtype they
  survive any number of round trips bit for bit.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable, ContextManager, Literal, Protocol, Sequence

import torch
import torch.distributed as dist

from nemo_aligner.types import Batch, DataParallel, Generations, LengthParams, LossFn, SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from nemo_aligner.config.schema import ModelConfig, OptimConfig, PretrainedCheckpointConfig, TrainerConfig

ReduceOp = Literal["sum", "max"]
WeightPlace = Literal["host", "device"]


class NonFiniteGradientError(FloatingPointError):
    """What Engine.optimizer_step raises for a NaN or inf gradient norm: the step was skipped, no weight
    changed, and the gradients are cleared."""


class Engine(Protocol):
    """What GPTModel needs from an engine; algorithms never see it."""

    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    compute_dtype: torch.dtype  # what the forward computes in (bf16 under mixed precision)
    data_parallel: DataParallel
    # The ranks that hold the same data-parallel share (tensor x pipeline); None for a world of one.
    # Work done once per share (e.g. a call to a reward server) runs on its first rank and is broadcast.
    model_parallel_group: dist.ProcessGroup | None
    has_adapters: bool  # LoRA (model.peft.peft_scheme=lora): only adapters train; the weight buffers hold them
    checkpoint_formats: tuple[str, ...]  # the weights_format values `save` writes (model_save_format's choices)

    def describe(self) -> str:
        """One line for the log: architecture, parameter count, layout, precision."""
        ...

    def num_parameters(self) -> int:
        """Elements of the whole model's distinct parameters (not this rank's shard)."""
        ...

    def adapters_disabled(self) -> ContextManager[None]:
        """Inside the block the network computes without its adapters: the base model (has_adapters only)."""
        ...

    # ------------------------------------------------------------------ training
    def setup_optimizer(self, cfg: OptimConfig, *, max_steps: int) -> None:
        """Build the optimizer and the LR schedule; `max_steps` optimizer steps is the decay horizon."""
        ...

    def forward_backward(self, micro_batches: Sequence[Batch], loss_fn: LossFn, *,
                         forward_only: bool) -> dict[str, torch.Tensor]:
        """Run `loss_fn` on every micro-batch's log-probs, accumulating gradients unless forward_only."""
        ...

    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Per-token log-probs [rows, T-1] of the micro-batches, concatenated, without gradients."""
        ...

    def optimizer_step(self, max_grad_norm: float) -> tuple[float, float]:
        """Clip to `max_grad_norm` (0 disables) by the global norm, step, advance the schedule, zero
        the gradients; returns (grad_norm, lr used). A non-finite norm raises FloatingPointError
        without changing any weight."""
        ...

    def reduce_data_parallel(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        """`tensor` (a copy, on this engine's device) reduced over the data-parallel ranks."""
        ...

    # ---------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                 length: LengthParams) -> Generations:
        """Continue left-padded prompts [B, P]; every data-parallel rank must call it as often."""
        ...

    def generation_rows_that_fit(self, positions: int, memory_fraction: float) -> int | None:
        """How many rows generating over `positions` positions (prompt + new tokens) fit in `memory_fraction`
        of the device memory free now, on this rank; None where device memory is not the limit (CPU)."""
        ...

    def offload_optimizer_state(self) -> None:
        """Move optimizer state to host memory, freeing device memory (no-op if already there)."""
        ...

    def onload_optimizer_state(self) -> None:
        """Restore what offload_optimizer_state moved, bit for bit."""
        ...

    # ------------------------------------------------------------- weight buffers
    def allocate_weights(self, where: WeightPlace, *, compute_dtype: bool = False) -> dict[str, torch.Tensor]:
        """Buffers shaped like this rank's local weights, by name, on the host (pinned where CUDA
        exists) or this engine's device, in the parameters' dtype or the compute dtype."""
        ...

    def copy_weights_to(self, buffers: dict[str, torch.Tensor]) -> None:
        """Copy the weights the forward computes with into `buffers` (from allocate_weights)."""
        ...

    def swapped_weights(self, buffers: dict[str, torch.Tensor]) -> ContextManager[None]:
        """Inside the block the forward computes with `buffers` (names and shapes checked before any
        weight changes), and save_weights / load(with_optimizer=False) / copy_weights_to act on them.
        On exit, also on error, the training weights are in force again bit for bit; optimizer state
        and gradients are untouched throughout. Blocks do not nest."""
        ...

    def weights_fingerprint(self) -> str:
        """A digest of the live weights, the same on every rank (keys caches of reference log-probs)."""
        ...

    # --------------------------------------------------------------- checkpoints
    def save(self, path: str, *, asynchronous: bool = False, weights_format: str = "torch_dist") -> Future | None:
        """Collectively write weights and optimizer state, loadable into any layout; the weights as DCP
        (`torch_dist`) or as Hugging Face safetensors (`safetensors`, where the engine can). With
        asynchronous (where the engine can) the state is staged before this returns and written in the
        background: the returned future completes when this rank's part is on disk; None means it already is."""
        ...

    def load(self, path: str, *, with_optimizer: bool) -> None:
        """Read what save (or save_weights, with_optimizer=False) wrote, into this layout."""
        ...

    def save_weights(self, path: str) -> None:
        """Collectively write the weights only."""
        ...

    def export_hf(self, path: str) -> None:
        """Write a Hugging Face model directory (weights in the training compute dtype, config,
        tokenizer) that transformers loads as is; atomically, so no half-written one looks valid."""
        ...

    def state_dict(self) -> dict[str, object]:
        """Training state that is not weights (LR schedule, generation counter), rank 0's copy."""
        ...

    def load_state_dict(self, state: dict[str, object]) -> None: ...


EngineBuilder = Callable[["ModelConfig", "PretrainedCheckpointConfig", "TrainerConfig"], Engine]
"""Builds an engine from the model, pretrained-checkpoint and trainer config sections; it checks
that the layout fits the model (world size, parallel sizes) before building anything large."""
