"""The torch_native engine: an HF causal LM under FSDP2 + DTensor TP, with its optimizer.

`build_torch_native_engine` is its entry in the engine registry (nemo_aligner/engines/registry.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from nemo_aligner.config.schema import (LoraTuningConfig, ModelConfig, OptimConfig, Precision, PretrainedCheckpointConfig,
                                        TrainerConfig)
from nemo_aligner.engines.base import NonFiniteGradientError, ReduceOp, WeightPlace
from nemo_aligner.engines.torch_native import checkpoint, lora, weights
from nemo_aligner.engines.hf_dir import load_hf_config, load_tokenizer
from nemo_aligner.engines.torch_native.build import attention_implementation, build_meta_model, random_init_on_rank0
from nemo_aligner.engines.torch_native.fsdp import decoder_layers, gathered_for_decoding, reshard_fsdp
from nemo_aligner.engines.decoding import generation_bytes_per_row, rollout_generator
from nemo_aligner.engines.torch_native.generation import Decoder, cache_length, generate
from nemo_aligner.engines.torch_native.hf_load import load_full_state_dict, load_hf_weights
from nemo_aligner.engines.torch_native.layout import (ParallelDims, build_mesh, check_no_pipeline,
                                                      check_tensor_parallel, resolve_packing, resolve_sharding)
from nemo_aligner.engines.torch_native.optim import build_optimizer, clip_grads_, global_grad_norm
from nemo_aligner.engines.torch_native.parallelize import materialize, parallelize
from nemo_aligner.engines.torch_native.replicated import ReplicatedParameters
from nemo_aligner.engines.torch_native.scoring import batch_logprobs
from nemo_aligner.types import Batch, DataParallel, Generations, LengthParams, LossFn, SamplingParams
from nemo_aligner.utils.distributed import all_reduce_max, all_reduce_sum, check_world_size, init_distributed, log_rank0
from nemo_aligner.utils.lr_schedule import build_scheduler
from nemo_aligner.utils.offload import HostOffload

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"  # under LoRA, the HF export's subdirectory holding the adapters alone (peft's format)


@dataclass(frozen=True)
class ComputeOptions:
    """How the network computes: dtypes, kernels, compilation, recomputation."""

    compute_dtype: torch.dtype  # what the forward and backward run in
    master_dtype: torch.dtype  # what the weights and optimizer state are stored in
    attn_implementation: str
    compile_layers: bool
    activation_checkpointing: bool
    activation_checkpoint_layers: int | None  # the first N decoder layers; None: all
    log_prob_chunk_size: int

    @classmethod
    def from_config(cls, model: ModelConfig, precision: Precision, hf_config: PretrainedConfig,
                    device: torch.device) -> "ComputeOptions":
        """bf16: bf16 compute, fp32 weights and optimizer state; bf16_pure: everything bf16; fp32: fp32."""
        compute = torch.float32 if precision is Precision.fp32 else torch.bfloat16
        compile_layers = model.torch_compile if model.torch_compile is not None else device.type == "cuda"
        return cls(compute_dtype=compute, master_dtype=torch.bfloat16 if precision is Precision.bf16_pure else torch.float32,
                   attn_implementation=attention_implementation(
                       hf_config, model.attn_implementation,
                       packed_on_cuda=(device.type == "cuda" and compute != torch.float32
                                       and getattr(model, "data", None) is not None and model.data.packing)),
                   compile_layers=compile_layers,
                   activation_checkpointing=model.activations_checkpoint_granularity == "full",
                   activation_checkpoint_layers=model.activations_checkpoint_num_layers,
                   log_prob_chunk_size=model.log_prob_chunk_size)


class TorchNativeEngine:
    """Owns the parallel module, optimizer and scheduler; speaks only in batches and tensors."""

    checkpoint_formats = checkpoint.CHECKPOINT_FORMATS

    def __init__(
        self,
        *,
        hf_config: PretrainedConfig,
        tokenizer: PreTrainedTokenizerBase,
        mesh: DeviceMesh,
        device: torch.device,
        restore_from_path: str | None,
        options: ComputeOptions,
        data_parallel_sharding: str,
        seed: int,
        lora_tuning: LoraTuningConfig | None = None,
    ) -> None:
        """`lora_tuning`: train LoRA adapters on a frozen base (lora.py); None: every weight trains."""
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.device = device
        self.options = options
        self.compute_dtype = options.compute_dtype
        self.seed = seed
        self.dp_group = mesh["dp"].get_group()
        self.tp_group = mesh["tp"].get_group()
        self.dp_size, self.dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
        self.tp_size, self.tp_rank = mesh["tp"].size(), mesh["tp"].get_local_rank()
        self.data_parallel = DataParallel(rank=self.dp_rank, size=self.dp_size)
        self.model_parallel_group = self.tp_group
        self.module: nn.Module = build_meta_model(hf_config, options.attn_implementation, dtype=options.master_dtype)
        self.architecture = type(self.module).__name__
        self.lora_tuning = lora_tuning
        self.base_model_path = restore_from_path
        if lora_tuning is not None:
            lora.inject_lora(self.module, lora_tuning, compute_dtype=options.compute_dtype)
        replicate = resolve_sharding(data_parallel_sharding, self.num_parameters(), self.tp_size, device)
        parallelize(self.module, mesh, compute_dtype=options.compute_dtype, fsdp=not replicate,
                    activation_checkpointing=options.activation_checkpointing,
                    activation_checkpoint_layers=options.activation_checkpoint_layers,
                    compile_layers=options.compile_layers)
        materialize(self.module, device)
        if restore_from_path is not None:
            load_hf_weights(self.module, restore_from_path)
        else:
            load_full_state_dict(self.module, random_init_on_rank0(hf_config, seed))
        if lora_tuning is not None:
            lora.init_adapters(self.module, seed)
        # replicated: gradients, their reduction and the masters live here (FSDP owns them otherwise)
        self.replicated = (ReplicatedParameters(self.module, self.dp_group, compute_dtype=options.compute_dtype)
                           if replicate else None)
        # Dropout stays off (as TRL's disable_dropout): policy and reference log-probs must be the
        # same deterministic function of the weights, and results must not depend on the layout.
        self.module.eval()
        self.optimizer: torch.optim.AdamW | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.generation_calls = 0
        self._offload = HostOffload(device)  # optimizer state parked on the host while generating
        self._stashes: dict[str, dict[str, torch.Tensor]] = {}  # training weights set aside, by place
        self._checkpoint_group: dist.ProcessGroup | None = None  # asynchronous saves' own (made at the first)
        self._checkpoint_stager: checkpoint.HostStager | None = None  # their host buffers (made at the first)
        self._async_write: Future | None = None  # the last asynchronous save's write
        self._swapped = False
        self._host_copy_stream: torch.cuda.Stream | None = None
        self._decoder: Decoder | None = None  # made at the first generate call; keeps its KV cache for the next

    def describe(self) -> str:
        options, name = self.options, lambda dtype: str(dtype).removeprefix("torch.")
        sharding = "replicated" if self.replicated else "FSDP"
        return (f"{self.architecture}: {self.num_parameters() / 1e6:.1f}M parameters, dp={self.dp_size} ({sharding}) "
                f"tp={self.tp_size}, {name(options.compute_dtype)} compute on {name(options.master_dtype)} weights, "
                f"{options.attn_implementation} attention{', compiled layers' if options.compile_layers else ''}"
                f"{', activation checkpointing' if options.activation_checkpointing else ''}"
                f"{f' of {options.activation_checkpoint_layers} layers' if options.activation_checkpoint_layers else ''}"
                f"{self._describe_adapters()}")

    def _describe_adapters(self) -> str:
        if self.lora_tuning is None:
            return ""
        trained = sum(p.numel() for p in self.module.parameters() if p.requires_grad)
        return (f", LoRA r={self.lora_tuning.adapter_dim} on {len(lora.lora_layers(self.module))} layers "
                f"({trained / 1e6:.2f}M trained parameters)")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())  # DTensor numel is the global size

    # ------------------------------------------------------------------ adapters
    @property
    def has_adapters(self) -> bool:
        return self.lora_tuning is not None

    def adapters_disabled(self) -> contextlib.AbstractContextManager[None]:
        """The network without its adapters inside the block: the base model, exactly."""
        if self.lora_tuning is None:
            raise RuntimeError("the model has no adapters (model.peft.peft_scheme=none)")
        return lora.adapters_disabled(self.module)

    # ----------------------------------------------------------------- training
    def setup_optimizer(self, cfg: OptimConfig, *, max_steps: int) -> None:
        params = (self.replicated.optimizer_parameters() if self.replicated
                  else [p for p in self.module.parameters() if p.requires_grad])
        self.optimizer = build_optimizer(params, cfg, fused=self.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, cfg, max_steps=max_steps)

    def forward_backward(self, micro_batches: Sequence[Batch], loss_fn: LossFn, *, forward_only: bool) -> dict[str, torch.Tensor]:
        """Run `loss_fn` on each micro-batch's log-probs; accumulate gradients unless forward_only.

        Returns this rank's metric sums (summed over micro-batches), including `loss` and
        `num_tokens` (real tokens processed).
        """
        totals: dict[str, torch.Tensor] = {}
        # LoRA's adapter dropout acts in training forwards (and their recomputation under checkpointing) only
        training_adapters = (self.lora_tuning is not None and self.lora_tuning.adapter_dropout > 0 and not forward_only)
        with lora.adapter_dropout_active(self.module) if training_adapters else contextlib.nullcontext():
            for mb in micro_batches:
                with torch.set_grad_enabled(not forward_only):
                    loss, metrics = loss_fn(self._logprobs(mb), mb)
                if not forward_only:
                    # FSDP averages gradients over dp ranks; the loss is already a share of the global
                    # mean, so scale back up to make the reduction a sum (replicated sums them).
                    (loss if self.replicated else loss * self.dp_size).backward()
                    if self.replicated:
                        self.replicated.accumulate_gradients()
                metrics = {**metrics, "num_tokens": mb["attention_mask"].sum()}
                for name, value in {"loss": loss, **metrics}.items():
                    value = value.detach().float()
                    totals[name] = totals[name] + value if name in totals else value
        if forward_only:
            reshard_fsdp(self.module)
        return totals

    @torch.no_grad()
    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """Per-token log-probs [rows, T-1] of the micro-batches, concatenated, without gradients."""
        logprobs = [self._logprobs(mb) for mb in micro_batches]
        reshard_fsdp(self.module)  # keep the sharded weights the only live copy (see reshard_fsdp)
        return torch.cat(logprobs)

    def reduce_data_parallel(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        reduce = all_reduce_sum if op == "sum" else all_reduce_max
        return reduce(tensor.detach().clone().to(self.device), self.dp_group)

    def optimizer_step(self, max_grad_norm: float) -> tuple[float, float]:
        """Clip to `max_grad_norm` (0 disables), step, advance the schedule; returns (grad_norm, lr)."""
        if self.optimizer is None or self.scheduler is None:
            raise RuntimeError("setup_optimizer() must be called before optimizer_step()")
        lr = self.optimizer.param_groups[0]["lr"]
        if self.replicated:
            grad_norm = float(self.replicated.step(self.optimizer, max_grad_norm))
        else:
            params = [p for p in self.module.parameters() if p.requires_grad]
            norm = global_grad_norm(params)
            grad_norm = float(norm)
            if math.isfinite(grad_norm):
                clip_grads_(params, norm, max_grad_norm)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(grad_norm):
            raise NonFiniteGradientError(f"gradient norm is {grad_norm}; the step was not applied")
        self.scheduler.step()
        return grad_norm, lr

    def _logprobs(self, mb: Batch) -> torch.Tensor:
        return batch_logprobs(self.module, self.hf_config, mb, tp_group=self.tp_group, tp_rank=self.tp_rank,
                              tp_size=self.tp_size, chunk_size=self.options.log_prob_chunk_size)

    # --------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                 length: LengthParams) -> Generations:
        """Sample continuations of left-padded prompts; reproducible from (seed, dp rank, sampling calls so far)."""
        generator = rollout_generator(self.seed, self.dp_rank, self.generation_calls, self.device)
        self.generation_calls += not sampling.use_greedy  # greedy calls (e.g. evaluations) leave later samples as they were
        if self._decoder is None:
            # CUDA graphs over the decode step where one captured graph holds the whole forward: compiled
            # layers on CUDA, replicated weights (no FSDP hooks), no tensor-parallel collectives
            self._decoder = Decoder(self.module, cuda_graphs=(self.options.compile_layers and self.device.type == "cuda"
                                                              and self.replicated is not None and self.tp_size == 1))
        with gathered_for_decoding(self.module, layers_reshard_after_forward=self.dp_size > 1):
            return generate(self.module, input_ids, attention_mask, sampling=sampling, length=length,
                            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                            generator=generator, dp_group=self.dp_group, decoder=self._decoder)

    def generation_rows_that_fit(self, positions: int, memory_fraction: float) -> int | None:
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        per_row = generation_bytes_per_row(self.hf_config, cache_length(positions), compute_bytes=self.compute_dtype.itemsize,
                                           tp=self.tp_size)
        return max(1, int(free * memory_fraction) // per_row)

    # ---------------------------------------------------------- optimizer offload
    def offload_optimizer_state(self) -> None:
        """Every optimizer-state tensor (and, replicated, the masters and gradient buffers) into host
        memory (utils.offload.HostOffload), freeing its device storage."""
        if self._offload.active or self.optimizer is None:
            return
        tensors = [value for state in self.optimizer.state.values() for value in state.values()]
        tensors += self.replicated.training_tensors() if self.replicated else []
        self._offload.offload([t.to_local() if isinstance(t, DTensor) else t for t in tensors])

    def onload_optimizer_state(self) -> None:
        """Restore what `offload_optimizer_state` moved, bit for bit, into the same tensors."""
        self._offload.onload()

    # ----------------------------------------------------------- weight buffers
    def allocate_weights(self, where: WeightPlace, *, compute_dtype: bool = False) -> dict[str, torch.Tensor]:
        device = torch.device("cpu") if where == "host" else self.device
        return weights.allocate_weights(self.module, device, self.compute_dtype if compute_dtype else None)

    def copy_weights_to(self, buffers: dict[str, torch.Tensor]) -> None:
        weights.copy_weights_to(self.module, buffers)

    @contextlib.contextmanager
    def swapped_weights(self, buffers: dict[str, torch.Tensor]) -> Iterator[None]:
        """The network computes with `buffers` inside the block; see the Protocol. With replicated masters
        the training weights are never set aside: on exit the compute weights are rebuilt from the
        masters on the device. Otherwise they wait in a stash (allocated once, where the buffers live).
        Host buffers of a replicated model stream in one decoder layer at a time, overlapped with the
        forwards inside (weights.streamed_weights_from); otherwise the copy in is not waited for either:
        the forwards queue behind it on the device. The device is synchronised on exit, before
        `buffers` may change."""
        if self._swapped:
            raise RuntimeError("weights are already swapped in; swapped_weights blocks cannot nest")
        from_masters = self.replicated is not None and self.replicated.has_masters
        place = "host" if next(iter(buffers.values())).device.type == "cpu" else "device"
        if not from_masters:
            if place not in self._stashes:
                self._stashes[place] = self.allocate_weights(place)  # type: ignore[arg-type]
            weights.copy_weights_to(self.module, self._stashes[place])
        try:
            with contextlib.ExitStack() as copy_in:  # names and shapes are checked before any weight changes
                if self.replicated is not None and place == "host":
                    copy_in.enter_context(weights.streamed_weights_from(
                        self.module, buffers, decoder_layers(self.module), self._copy_stream()))
                else:
                    weights.copy_weights_from(self.module, buffers, wait=False)
                self._swapped = True
                yield
        finally:
            self._swapped = False
            if from_masters:
                self.replicated.refresh_compute_weights()  # type: ignore[union-attr]
            else:
                weights.copy_weights_from(self.module, self._stashes[place], wait=False)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def _copy_stream(self) -> torch.cuda.Stream | None:
        """The side stream host-to-device weight copies run on (CUDA only; made once)."""
        if self.device.type != "cuda":
            return None
        if self._host_copy_stream is None:
            self._host_copy_stream = torch.cuda.Stream(self.device)
        return self._host_copy_stream

    def weights_fingerprint(self) -> str:
        return weights.weights_fingerprint(self.module)

    # -------------------------------------------------------------- checkpoints
    def save(self, path: str, *, asynchronous: bool = False, weights_format: str = "torch_dist") -> Future | None:
        """Weights and optimizer state, in `weights_format` (checkpoint.CHECKPOINT_FORMATS). Asynchronously
        (torch_dist): staged in host memory before this returns (training may change them then), written
        by a background thread, coordinated over a process group of its own so that training's
        collectives never interleave with it; safetensors checkpoints are written synchronously. The host
        buffers are reused by the next asynchronous save, which first waits for this one's write."""
        if self.optimizer is None:
            raise RuntimeError("setup_optimizer() must be called before save()")
        state = (checkpoint.replicated_state(self.module, self.replicated, self.optimizer) if self.replicated
                 else checkpoint.sharded_state(self.module, self.optimizer))
        if not asynchronous or weights_format != "torch_dist":
            checkpoint.write_state(state, path, weights_format=weights_format)
            return None
        if self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
            self._checkpoint_stager = checkpoint.HostStager(self.device)
        if self._async_write is not None:
            self._async_write.result()  # its staged tensors are about to be overwritten
        self._async_write = dcp.async_save(state, checkpoint_id=path, process_group=self._checkpoint_group,
                                           async_stager=self._checkpoint_stager)
        return self._async_write

    def load(self, path: str, *, with_optimizer: bool) -> None:
        optimizer = self.optimizer if with_optimizer else None
        if self.replicated and not self._swapped:
            checkpoint.load_replicated(self.module, self.replicated, optimizer, path)
        else:  # FSDP, or the swapped-in weights (the module's parameters)
            checkpoint.load_sharded(self.module, optimizer, path)

    def save_weights(self, path: str) -> None:
        if self.replicated and not self._swapped:
            dcp.save(checkpoint.replicated_state(self.module, self.replicated, None), checkpoint_id=path)
        else:
            checkpoint.save_weights(self.module, path)

    def export_hf(self, path: str) -> None:
        """The HF directory at `path`; under LoRA the merged weights (base + scaled B·A), and the adapters
        alone in `path`/adapter as peft writes them (PeftModel.from_pretrained loads it on the base)."""
        reshard_fsdp(self.module)
        trained = (self.replicated.model_state_dict(self.module) if self.replicated
                   else get_model_state_dict(self.module))  # the training weights, each rank its pieces
        if self.lora_tuning is None:
            checkpoint.export_hf(self.module, trained, self.hf_config, self.architecture, self.tokenizer, path,
                                 dtype=self.compute_dtype)
            return
        cfg = self.lora_tuning
        checkpoint.export_hf(self.module, lora.merged_weights(self.module, trained), self.hf_config, self.architecture,
                             self.tokenizer, path, dtype=self.compute_dtype,
                             also=lambda tmp: lora.save_peft_adapter(self.module, trained, cfg, self.base_model_path,
                                                                     os.path.join(tmp, ADAPTER_DIR)))

    def state_dict(self) -> dict[str, object]:
        """Engine-level training state that is not weights: scheduler and generation counter."""
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "generation_calls": self.generation_calls}

    def load_state_dict(self, state: dict[str, object]) -> None:
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])  # type: ignore[arg-type]
        self.generation_calls = int(state["generation_calls"])  # type: ignore[arg-type]


def build_torch_native_engine(model: ModelConfig, pretrained: PretrainedCheckpointConfig,
                              trainer: TrainerConfig) -> TorchNativeEngine:
    """Check the layout against the launch and the model, then build the engine (the registry's
    `torch_native`): FSDP2 over dp, DTensor tensor parallel over tp, bf16 or fp32 compute."""
    check_no_pipeline(model.pipeline_model_parallel_size)
    if model.sequence_parallel:
        raise ValueError("model.sequence_parallel=true needs model.engine=megatron: the torch_native engine has no "
                         "sequence parallelism")
    device = init_distributed()
    check_world_size(trainer.devices, trainer.num_nodes, dist.get_world_size())
    hf_config = load_hf_config(pretrained.restore_from_path, pretrained.model_config)
    check_tensor_parallel(hf_config, model.tensor_model_parallel_size)
    data = getattr(model, "data", None)  # the algorithms' model sections have one
    if data is not None:  # resolved here, where the device is known; the data loaders read the result
        data.packing = resolve_packing(hf_config, data.packing, device, trainer.precision)
        log_rank0(logger, "model.data.packing: %s", data.packing)
    dims = ParallelDims.from_world(dist.get_world_size(), model.tensor_model_parallel_size)
    tokenizer_path = pretrained.tokenizer_path or pretrained.restore_from_path
    if tokenizer_path is None:
        raise ValueError("pretrained_checkpoint.tokenizer_path must be set when the model is built from model_config")
    return TorchNativeEngine(
        hf_config=hf_config, tokenizer=load_tokenizer(tokenizer_path), mesh=build_mesh(dims, device), device=device,
        restore_from_path=pretrained.restore_from_path,
        options=ComputeOptions.from_config(model, trainer.precision, hf_config, device),
        data_parallel_sharding=model.data_parallel_sharding, seed=model.seed,
        lora_tuning=model.peft.lora_tuning if model.peft.lora else None,
    )

