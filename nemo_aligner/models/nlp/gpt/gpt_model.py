"""GPTModel: the policy base that DPO, SPIN and rejection-sampling models extend.

It builds the network on the engine `model.engine` names (through the registry; it imports no
engine implementation), owns the batch semantics (micro-batch / global-batch sizes in examples,
rows per example), and offers the operations every algorithm needs: forward/backward of a loss
over per-token log-probs, forward-only log-probs, an optimizer step, generation, optimizer-state
offload, checkpoint save/load and Hugging Face export. Algorithms talk to this class, never to engines.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from typing import Sequence

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from nemo_aligner.config.schema import ModelConfig, PretrainedCheckpointConfig, TrainerConfig, check_batch_sizes
from nemo_aligner.data.collate import prompt_collate
from nemo_aligner.data.packing import pack_micro_batch
from nemo_aligner.engines.base import Engine
from nemo_aligner.engines.registry import build_engine
from nemo_aligner.types import Batch, DataParallel, Generations, LengthParams, LossFn, SamplingParams, with_scored_index
from nemo_aligner.utils.distributed import log_rank0

logger = logging.getLogger(__name__)


class GPTModel:
    """A causal LM policy with micro-batch / global-batch semantics.

    Batch sizes count examples; an example is `rows_per_example` rows of a batch (one sequence
    here; a preference pair, two rows, in the pairwise subclasses). `global_batch_size =
    micro_batch_size x dp x accumulation_steps`; each data-parallel rank receives
    `global_batch_size / dp` examples per step and splits them into micro-batches.
    """

    rows_per_example = 1
    config_class: type[ModelConfig] = ModelConfig  # the schema of `cfg` (the `model` section)

    def __init__(self, cfg: ModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> None:
        self.cfg = cfg
        self.engine: Engine = build_engine(cfg, pretrained, trainer)
        self.accumulation_steps = check_batch_sizes(cfg.global_batch_size, cfg.micro_batch_size, self.data_parallel.size)
        log_rank0(logger, "built %s; %d micro-batches of %d per step", self.engine.describe(), self.accumulation_steps,
                  cfg.micro_batch_size)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def data_parallel(self) -> DataParallel:
        """This rank's data-parallel rank and the data-parallel size."""
        return self.engine.data_parallel

    @property
    def model_parallel_group(self) -> dist.ProcessGroup | None:
        """The ranks that hold the same data-parallel share (see Engine.model_parallel_group)."""
        return self.engine.model_parallel_group

    @property
    def local_batch_size(self) -> int:
        """Examples this data-parallel rank processes per optimizer step."""
        return self.cfg.global_batch_size // self.data_parallel.size

    def setup_optimizer(self, max_steps: int) -> None:
        """Build AdamW and the LR schedule; `max_steps` optimizer steps is the decay horizon."""
        self.engine.setup_optimizer(self.cfg.optim, max_steps=max_steps)

    # ------------------------------------------------------------------ compute
    def forward_backward(self, batch: Batch, loss_fn: LossFn, *, forward_only: bool = False,
                         micro_batch_size: int | None = None,
                         rows_per_example: int | None = None) -> dict[str, torch.Tensor]:
        """Apply `loss_fn` over this rank's batch in micro-batches (see micro_batches); returns
        metrics summed over data-parallel ranks.

        `loss_fn` must return each micro-batch's share of the global loss (see engines/base.py).
        A NaN or inf loss raises FloatingPointError after the backward, before any optimizer step.
        """
        micro_batches = self.micro_batches(batch, micro_batch_size, rows_per_example=rows_per_example)
        metrics = self.engine.forward_backward(micro_batches, loss_fn, forward_only=forward_only)
        metrics = {name: self.global_sum(value) for name, value in metrics.items()}
        if not torch.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss'].item()}")
        return metrics

    @torch.no_grad()
    def get_logprobs(self, batch: Batch, micro_batch_size: int | None = None) -> torch.Tensor:
        """Per-token log-probs [B, T-1] of the whole `batch`, in micro-batches of `micro_batch_size` examples."""
        return self.engine.logprobs(self.micro_batches(batch, micro_batch_size))

    def optimizer_step(self, max_grad_norm: float) -> tuple[float, float]:
        """Clip by the global gradient norm, step, advance the LR; returns (grad_norm, lr)."""
        return self.engine.optimizer_step(max_grad_norm)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                 length: LengthParams) -> Generations:
        """Continue left-padded prompts [B, P] (see Engine.generate)."""
        return self.engine.generate(input_ids, attention_mask, sampling, length)

    @torch.no_grad()
    def generate_responses(self, prompts: list[torch.Tensor], sampling: SamplingParams, length: LengthParams, *,
                           micro_batch_size: int | None, memory_fraction: float,
                           offload_optimizer: bool) -> list[torch.Tensor]:
        """Each prompt's response (new tokens, EOS included when produced), generated in chunks of
        `micro_batch_size` left-padded prompts (None: the most whose generation fits in `memory_fraction`
        of the free device memory on every rank, all of them where memory is no limit); with
        `offload_optimizer` the optimizer state waits on the host meanwhile and is restored exactly.
        Every data-parallel rank must pass as many prompts."""
        if offload_optimizer:
            self.engine.offload_optimizer_state()
        responses: list[torch.Tensor] = []
        try:
            if micro_batch_size is None:
                micro_batch_size = self.rows_that_fit(prompts, length, memory_fraction)
            for start in range(0, len(prompts), micro_batch_size):
                chunk = prompt_collate(prompts[start : start + micro_batch_size], pad_token_id=self.tokenizer.pad_token_id)
                out = self.generate(chunk["input_ids"].to(self.device), chunk["attention_mask"].to(self.device),
                                    sampling, length)
                width = chunk["input_ids"].shape[1]
                responses += [out.tokens[i, width : width + n].cpu() for i, n in enumerate(out.response_lengths.tolist())]
        finally:
            if offload_optimizer:
                self.engine.onload_optimizer_state()
        return responses

    def rows_that_fit(self, prompts: list[torch.Tensor], length: LengthParams, memory_fraction: float) -> int:
        """The most prompts per generate call whose generation fits in `memory_fraction` of the free device
        memory, the same on every data-parallel rank (their smallest; ranks must make as many calls)."""
        positions = max((len(p) for p in prompts), default=0) + length.max_length
        rows = self.engine.generation_rows_that_fit(positions, memory_fraction)
        if rows is None:
            rows = max(len(prompts), 1)
        rows = int(-self.global_max(torch.tensor(-rows)).item())
        log_rank0(logger, "generating in chunks of up to %d prompts (%d positions each)", rows, positions)
        return max(1, min(rows, len(prompts)))

    # ------------------------------------------------------------------ helpers
    def global_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over data-parallel ranks (e.g. a global token count for normalising)."""
        return self.engine.reduce_data_parallel(value, "sum")

    def global_max(self, value: torch.Tensor) -> torch.Tensor:
        """Max over data-parallel ranks (min: -global_max(-x))."""
        return self.engine.reduce_data_parallel(value, "max")

    def gather_data_parallel(self, values: torch.Tensor) -> torch.Tensor:
        """Every data-parallel rank's `values` (the same length on every rank), concatenated in rank order."""
        dp = self.data_parallel
        slots = values.new_zeros(dp.size, *values.shape)
        slots[dp.rank] = values
        return self.global_sum(slots).flatten(0, 1)

    def global_examples(self, batch: Batch) -> torch.Tensor:
        """The number of examples in `batch` summed over data-parallel ranks (a loss's normaliser)."""
        rows = next(iter(batch.values())).shape[0]
        return self.global_sum(torch.tensor(rows // self.rows_per_example, dtype=torch.float32))

    def on_device(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`batch` moved to the device once, so the reference's and the policy's passes over it copy nothing.
        With packing it stays where it is: each pass packs its micro-batches on the host (micro_batches) and
        moves only the packed rows, instead of copying the padded batch back. Rows are checked to be
        right-padded first, while the batch is on the host (see micro_batches)."""
        _check_right_padded(batch["attention_mask"])
        if self.packing:
            return dict(batch)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @property
    def packing(self) -> bool:
        """Whether micro-batches are packed (model.data.packing, resolved by the engine when it was null)."""
        data = getattr(self.cfg, "data", None)
        return bool(data is not None and data.packing)

    def global_mean(self, values: torch.Tensor) -> float:
        """The mean of every rank's `values` together (each rank may hold a different number)."""
        return (self.global_sum(values.sum()) / self.global_sum(torch.tensor(float(values.numel())))).item()

    def micro_batches(self, batch: Batch, micro_batch_size: int | None = None, *,
                      rows_per_example: int | None = None) -> Sequence[Batch]:
        """Split a batch along dim 0 into micro-batches of `micro_batch_size` examples (default: the
        config's), i.e. `micro_batch_size x rows_per_example` rows (default: this model's examples),
        moved to the device; the last one holds what is left. Examples are never split.

        Rows must be right-padded (types.Batch); that is checked here while a batch is still on the
        host (the data loaders' batches), where it costs no device synchronisation. Batches built on
        the device (rollouts) are right-padded by construction. With `model.data.packing` each
        micro-batch also carries its rows packed end to end (data/packing.py), which the engine runs."""
        per_example = rows_per_example or self.rows_per_example
        size = (micro_batch_size or self.cfg.micro_batch_size) * per_example
        rows = next(iter(batch.values())).shape[0]
        if rows % per_example:
            raise ValueError(f"a batch of {rows} rows is not whole examples of {per_example} rows")
        _check_right_padded(batch["attention_mask"])
        micro_batches = [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size)]
        if self.packing:  # laid out on the host, where the row lengths are known
            micro_batches = [pack_micro_batch({k: v.cpu() for k, v in mb.items()}, pad_token_id=self.tokenizer.pad_token_id,
                                              multiple_of=self.cfg.data.pad_to_multiple_of)  # type: ignore[attr-defined]
                             for mb in micro_batches]
        # every micro-batch's scored positions are located now, before any forward is queued (types.py)
        return [{k: v.to(self.device) for k, v in with_scored_index(mb).items()} for mb in micro_batches]

    # -------------------------------------------------------------- checkpoints
    @property
    def checkpoint_formats(self) -> tuple[str, ...]:
        """The checkpoint formats (exp_manager.checkpoint_callback_params.model_save_format) the engine writes."""
        return self.engine.checkpoint_formats

    def save(self, path: str, *, asynchronous: bool = False, weights_format: str = "torch_dist") -> Future | None:
        """Weights and optimizer state (weights as DCP or HF safetensors); asynchronously, a future that
        completes when they are on disk."""
        return self.engine.save(path, asynchronous=asynchronous, weights_format=weights_format)

    def load(self, path: str, *, with_optimizer: bool = True) -> None:
        self.engine.load(path, with_optimizer=with_optimizer)

    def state_dict(self) -> dict[str, object]:
        """Non-weight training state (LR scheduler, generation counter), for the checkpoint."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.engine.load_state_dict(state)

    def export_hf(self, path: str) -> None:
        """Write a Hugging Face model directory (bf16 weights when training in bf16)."""
        self.engine.export_hf(path)


def _check_right_padded(attention_mask: torch.Tensor) -> None:
    """Refuse rows that are not right-padded (types.Batch), checked only on the host: on the device the
    check would cost a synchronisation, and device batches (rollouts) are right-padded by construction."""
    if (attention_mask.device.type == "cpu" and attention_mask.shape[1] > 1
            and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())):
        raise ValueError("training batches must be right-padded (attention_mask 1...1 0...0 per row)")
