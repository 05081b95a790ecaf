"""The megatron engine: megatron-core's GPTModel under its tensor, pipeline and data parallelism, with
megatron's DistributedDataParallel and distributed optimizer (fp32 main weights sharded over the
data-parallel ranks), behind the Engine protocol (nemo_aligner/engines/base.py).

`build_megatron_engine` is its entry in the engine registry. It runs wherever megatron-core imports:
on GPUs over NCCL, and on CPUs over gloo (tests), where build.cuda_placements_on_cpu keeps megatron's
few CUDA placements on the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from concurrent.futures import Future
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.tensor_parallel.random import initialize_rng_tracker
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from nemo_aligner.config.schema import ModelConfig, OptimConfig, Precision, PretrainedCheckpointConfig, TrainerConfig
from nemo_aligner.engines.base import NonFiniteGradientError, ReduceOp, WeightPlace
from nemo_aligner.engines.megatron import torch_kernels, weights_io
from nemo_aligner.engines.megatron.build import build_gpt_model, compile_with_static_batch, cuda_placements_on_cpu
from nemo_aligner.engines.megatron.generation import generate
from nemo_aligner.engines.megatron.layout import MegatronLayout, check_layout
from nemo_aligner.engines.megatron.schedule import forward_backward, same_length
from nemo_aligner.engines.decoding import generation_bytes_per_row, rollout_generator
from nemo_aligner.engines.hf_dir import load_hf_config, load_tokenizer
from nemo_aligner.types import Batch, DataParallel, Generations, LengthParams, LossFn, SamplingParams, check_same_weights
from nemo_aligner.utils.distributed import all_reduce_max, all_reduce_sum, check_world_size, init_distributed, log_rank0
from nemo_aligner.utils.lr_schedule import lr_at
from nemo_aligner.utils.offload import HostOffload

logger = logging.getLogger(__name__)


class MegatronEngine:
    """Owns megatron's GPTModel (this rank's stage, as one chunk of layers or several under a virtual
    pipeline, and its tensor-parallel slice), its DDP wrappers and the distributed optimizer; speaks only
    in batches and tensors."""

    has_adapters = False  # model.peft.peft_scheme=lora is refused at build
    checkpoint_formats = ("torch_dist",)  # dist_checkpointing, written synchronously

    def __init__(self, *, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, layout: MegatronLayout,
                 device: torch.device, restore_from_path: str | None, compute_dtype: torch.dtype, seed: int,
                 log_prob_chunk_size: int, compile_layers: bool) -> None:
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.layout = layout
        self.device = device
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.chunk_size = log_prob_chunk_size
        self.data_parallel = DataParallel(rank=layout.dp_rank, size=layout.dp_size)
        self.model_parallel_group = layout.model_parallel_group
        # dropout is 0 throughout (policy and reference log-probs must be deterministic), so megatron's RNG
        # tracker forks nothing: its no-op (inference) tracker, which also needs no CUDA RNG to seed
        initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        # this stage's chunks of layers (one without a virtual pipeline), each with its DDP wrapper
        self.chunks = [build_gpt_model(hf_config, dtype=compute_dtype, pipeline_stages=layout.pp_size,
                                       sequence_parallel=layout.sequence_parallel, chunks=layout.vp_size,
                                       chunk=chunk if layout.vp_size > 1 else None)
                       for chunk in range(layout.vp_size)]
        source = weights_io.HFSource.open(hf_config, restore_from_path, seed)
        self._num_parameters = weights_io.num_parameters(source, hf_config)
        self.compiled = compile_layers
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                                   overlap_grad_reduce=False)
        self.ddp: list[DistributedDataParallel] = []
        for index, chunk in enumerate(self.chunks):
            weights_io.load_local(chunk, source, hf_config, layout, layer_offset=layout.layer_offset(hf_config, index))
            chunk.to(device).eval()  # dropout is 0 in the config; eval keeps every path deterministic
            if compile_layers:  # each decoder layer whole: no graph breaks (build.RowParallelLinearWithGroup)
                for layer in chunk.decoder.layers:
                    compile_with_static_batch(layer)
            with cuda_placements_on_cpu():
                self.ddp.append(DistributedDataParallel(chunk.config, ddp_config, chunk))
        self.optimizer = None
        self.optim_cfg: OptimConfig | None = None
        self.max_steps = 0
        self.steps = 0
        self.generation_calls = 0
        self._stash: dict[str, torch.Tensor] | None = None
        self._swapped = False
        self._offload = HostOffload(device)

    def adapters_disabled(self) -> contextlib.AbstractContextManager[None]:
        raise RuntimeError("the megatron engine has no adapters")

    def describe(self) -> str:
        name = str(self.compute_dtype).removeprefix("torch.")
        layout = self.layout
        return (f"{type(self.chunks[0]).__name__} (megatron-core) of {self.hf_config.model_type}: "
                f"{self._num_parameters / 1e6:.1f}M parameters, dp={layout.dp_size} tp={layout.tp_size} "
                f"pp={layout.pp_size}{f' x {layout.vp_size} chunks' if layout.vp_size > 1 else ''}"
                f"{' (sequence parallel)' if layout.sequence_parallel else ''}, {name} compute, fp32 main "
                f"weights in the distributed optimizer{', compiled layers' if self.compiled else ''}")

    def num_parameters(self) -> int:
        return self._num_parameters

    # ----------------------------------------------------------------- training
    def setup_optimizer(self, cfg: OptimConfig, *, max_steps: int) -> None:
        config = OptimizerConfig(optimizer="adam", lr=cfg.lr, weight_decay=cfg.weight_decay, adam_beta1=cfg.betas[0],
                                 adam_beta2=cfg.betas[1], adam_eps=cfg.eps, bf16=self.compute_dtype == torch.bfloat16,
                                 params_dtype=self.compute_dtype, use_distributed_optimizer=True, clip_grad=0.0)
        torch_kernels.install()
        with cuda_placements_on_cpu():
            self.optimizer = get_megatron_optimizer(config, self.ddp)
        weights_io.fuse_torch_adam(self.optimizer)
        self.optim_cfg, self.max_steps = cfg, max_steps

    def forward_backward(self, micro_batches: Sequence[Batch], loss_fn: LossFn, *, forward_only: bool) -> dict[str, torch.Tensor]:
        """Megatron's schedule over the micro-batches (1F1B across pipeline stages). The loss is a share of
        the global mean; megatron's DDP averages gradients over data-parallel ranks, so the engine scales
        the backward by their number to make that reduction a sum. The sums are broadcast from the last
        stage to every rank of the model-parallel group."""
        micro_batches = same_length(micro_batches, self.tokenizer.pad_token_id, self.layout.sequence_multiple)
        context = torch.no_grad() if forward_only else contextlib.nullcontext()
        with context:
            sums = forward_backward(self.ddp, micro_batches, loss_fn, forward_only=forward_only,
                                    tp_group=self.layout.tp_group, vocab_start_index=self.layout.vocab_start_index,
                                    chunk_size=self.chunk_size, loss_multiplier=self.layout.dp_size,
                                    sequence_parallel=self.layout.sequence_parallel)
        sums = self.layout.from_last_stage_object(sums)
        tokens = sum(mb["attention_mask"].sum() for mb in micro_batches).to(self.device).float()
        return {**{name: value.to(self.device) for name, value in sums.items()}, "num_tokens": tokens}

    @torch.no_grad()
    def logprobs(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        width = max(mb["input_ids"].shape[1] for mb in micro_batches)
        padded = same_length(micro_batches, self.tokenizer.pad_token_id, self.layout.sequence_multiple)
        pieces: list[torch.Tensor] = []

        def keep(logprobs: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            pieces.append(logprobs.detach().float())
            return logprobs.sum() * 0, {}

        forward_backward(self.ddp, padded, keep, forward_only=True, tp_group=self.layout.tp_group,
                         vocab_start_index=self.layout.vocab_start_index, chunk_size=self.chunk_size,
                         sequence_parallel=self.layout.sequence_parallel)
        rows = sum(mb["input_ids"].shape[0] for mb in padded)
        out = torch.cat(pieces) if pieces else torch.zeros(rows, padded[0]["input_ids"].shape[1] - 1)
        out = self.layout.from_last_stage_tensor(out.to(self.device))
        return out[:, : width - 1]

    def reduce_data_parallel(self, tensor: torch.Tensor, op: ReduceOp) -> torch.Tensor:
        reduce = all_reduce_sum if op == "sum" else all_reduce_max
        return reduce(tensor.detach().clone().to(self.device), self.layout.dp_group)

    def optimizer_step(self, max_grad_norm: float) -> tuple[float, float]:
        """Reduce the gradients (data parallel, tied embeddings across stages), take the global norm of
        the fp32 main gradients, refuse a non-finite one before any weight changes, clip, step."""
        if self.optimizer is None or self.optim_cfg is None:
            raise RuntimeError("setup_optimizer() must be called before optimizer_step()")
        lr = lr_at(self.steps, lr=self.optim_cfg.lr, sched=self.optim_cfg.sched, max_steps=self.max_steps)
        for group in self.optimizer.param_groups:  # what megatron's own scheduler sets (wd_mult: 0 for norms, biases)
            group["lr"] = lr
            group["weight_decay"] = self.optim_cfg.weight_decay * group.get("wd_mult", 1.0)
        with cuda_placements_on_cpu():
            finalize_model_grads(self.ddp)
            self.optimizer.prepare_grads()
            grad_norm = float(self.optimizer.get_grad_norm())
            if math.isfinite(grad_norm):
                if max_grad_norm > 0:
                    for optimizer in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
                        clip_grad_by_total_norm_fp32(optimizer.get_parameters(), max_norm=max_grad_norm,
                                                     total_norm=grad_norm)
                self.optimizer.step_with_ready_grads()
        for chunk in self.ddp:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        if not math.isfinite(grad_norm):
            raise NonFiniteGradientError(f"gradient norm is {grad_norm}; the step was not applied")
        self.steps += 1
        return grad_norm, lr

    # --------------------------------------------------------------- generation
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingParams,
                 length: LengthParams) -> Generations:
        """Sample continuations of left-padded prompts; reproducible from (seed, dp rank, sampling calls so far)."""
        if self.layout.pp_size > 1:
            raise ValueError("generation with model.engine=megatron needs model.pipeline_model_parallel_size=1 "
                             "(SPIN and RS generate; DPO does not)")
        generator = rollout_generator(self.seed, self.layout.dp_rank, self.generation_calls, self.device)
        self.generation_calls += not sampling.use_greedy
        # Compiled layers (compile_layers) run eagerly here: megatron's KV-cache bookkeeping (a cache slot per
        # layer number, the cache's growing offset) would make dynamo specialise each layer and recompile it
        # at every step until its recompile limit.
        with torch.compiler.set_stance("force_eager"):
            return generate(self.chunks[0], input_ids, attention_mask, sampling=sampling, length=length,
                            eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                            generator=generator, layout=self.layout)

    def generation_rows_that_fit(self, positions: int, memory_fraction: float) -> int | None:
        """Rows whose KV cache (megatron's, exactly `positions` long) and sampling buffers fit in
        `memory_fraction` of the free device memory; None on CPU."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        per_row = generation_bytes_per_row(self.hf_config, positions, compute_bytes=self.compute_dtype.itemsize,
                                           tp=self.layout.tp_size)
        return max(1, int(free * memory_fraction) // per_row)

    # ---------------------------------------------------------- optimizer offload
    def offload_optimizer_state(self) -> None:
        """The distributed optimizer's own state (fp32 main weights, Adam's moments) into host memory."""
        if self._offload.active or self.optimizer is None:
            return
        self._offload.offload(weights_io.optimizer_tensors(self.optimizer))

    def onload_optimizer_state(self) -> None:
        self._offload.onload()

    # ----------------------------------------------------------- weight buffers
    def _params(self) -> dict[str, torch.Tensor]:
        if len(self.chunks) == 1:
            return dict(self.chunks[0].named_parameters())
        return {f"chunk{index}.{name}": param for index, chunk in enumerate(self.chunks)
                for name, param in chunk.named_parameters()}

    def allocate_weights(self, where: WeightPlace, *, compute_dtype: bool = False) -> dict[str, torch.Tensor]:
        device = torch.device("cpu") if where == "host" else self.device
        pin = device.type == "cpu" and torch.cuda.is_available()
        return {name: torch.empty(p.shape, dtype=self.compute_dtype if compute_dtype else p.dtype, device=device,
                                  pin_memory=pin) for name, p in self._params().items()}

    @torch.no_grad()
    def copy_weights_to(self, buffers: dict[str, torch.Tensor]) -> None:
        check_same_weights(self._params(), buffers, "weight buffers")
        for name, param in self._params().items():
            buffers[name].copy_(param)

    @contextlib.contextmanager
    def swapped_weights(self, buffers: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model's parameters (the bf16 copies the forward reads; the distributed optimizer keeps the
        fp32 main weights apart) hold `buffers` inside the block and their own values again after it."""
        if self._swapped:
            raise RuntimeError("weights are already swapped in; swapped_weights blocks cannot nest")
        params = self._params()
        check_same_weights(params, buffers, "weight buffers")
        if self._stash is None:
            self._stash = {name: torch.empty_like(p) for name, p in params.items()}
        with torch.no_grad():
            for name, param in params.items():
                self._stash[name].copy_(param)
                param.copy_(buffers[name])
        self._swapped = True
        try:
            yield
        finally:
            self._swapped = False
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(self._stash[name])

    def weights_fingerprint(self) -> str:
        """Per parameter of this rank its sum and sum of squares (float64), gathered from every rank."""
        digest = hashlib.sha256()
        for name, param in self._params().items():
            values = param.detach().double()
            digest.update(f"{name}:{tuple(param.shape)}:{values.sum().item():.10e}:{values.square().sum().item():.10e};".encode())
        local = [digest.hexdigest()]
        every: list[list[str]] = [[] for _ in range(dist.get_world_size())]
        dist.all_gather_object(every, local)
        return hashlib.sha256("".join(d[0] for d in every).encode()).hexdigest()

    # -------------------------------------------------------------- checkpoints
    def save(self, path: str, *, asynchronous: bool = False, weights_format: str = "torch_dist") -> Future | None:
        """megatron's dist_checkpointing (sharded tensors with their global layout, so a checkpoint loads into
        another tensor / pipeline / data-parallel layout), weights and the distributed optimizer's state."""
        if self.optimizer is None:
            raise RuntimeError("setup_optimizer() must be called before save()")
        if weights_format != "torch_dist":
            raise ValueError(f"model.engine=megatron saves checkpoints as torch_dist, not {weights_format}")
        _write_sharded(self._sharded_state(with_optimizer=True, loading=False), path)
        return None

    def load(self, path: str, *, with_optimizer: bool) -> None:
        state = self._sharded_state(with_optimizer=with_optimizer, loading=True)
        with cuda_placements_on_cpu():
            loaded = dist_checkpointing.load(state, path)
        for key, chunk in zip(self._model_keys(), self.chunks):
            missing, unexpected = chunk.load_state_dict(loaded[key], strict=False)  # megatron's _extra_state entries
            missing = [name for name in missing if not name.endswith("._extra_state")]
            if missing or unexpected:
                raise KeyError(f"checkpoint {path} does not fill the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if with_optimizer:
            with weights_io.step_kept_apart(self.optimizer):
                self.optimizer.load_state_dict(loaded["optimizer"])

    def save_weights(self, path: str) -> None:
        _write_sharded(self._sharded_state(with_optimizer=False, loading=False), path)

    def _sharded_state(self, *, with_optimizer: bool, loading: bool) -> dict[str, object]:
        """The model's sharded tensors (each with its place in the whole model) and the distributed optimizer's
        state in its fully reshardable form (gathered over data-parallel ranks to save, sliced on load), so a
        checkpoint loads into any other tensor / pipeline / data-parallel layout."""
        with cuda_placements_on_cpu():
            model = {key: chunk.sharded_state_dict() for key, chunk in zip(self._model_keys(), self.chunks)}
            state: dict[str, object] = dict(model)
            if with_optimizer and self.optimizer is not None:
                if loading:
                    weights_io.initialise_adam_state(self.optimizer)
                state["optimizer"] = self.optimizer.sharded_state_dict(
                    model, is_loading=loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        return state

    def _model_keys(self) -> list[str]:
        """Megatron's names for the chunks' entries of a checkpoint ("model", or "model0", "model1", ...); the
        tensors in them are keyed by their place in the whole model, so any layout loads them."""
        return ["model"] if len(self.chunks) == 1 else [f"model{index}" for index in range(len(self.chunks))]

    def export_hf(self, path: str) -> None:
        weights_io.export_hf(self.chunks, self.hf_config, self.tokenizer, self.layout, path, dtype=self.compute_dtype)

    def state_dict(self) -> dict[str, object]:
        """Training state that is not weights: the optimizer steps taken (the LR schedule's position)
        and the generation counter."""
        return {"steps": self.steps, "generation_calls": self.generation_calls}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.steps = int(state["steps"])  # type: ignore[arg-type]
        self.generation_calls = int(state["generation_calls"])  # type: ignore[arg-type]


def _write_sharded(state: dict[str, object], path: str) -> None:
    """dist_checkpointing.save into the new directory `path` (it refuses one that holds anything)."""
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    with cuda_placements_on_cpu():
        dist_checkpointing.save(state, path)


def build_megatron_engine(model: ModelConfig, pretrained: PretrainedCheckpointConfig, trainer: TrainerConfig) -> MegatronEngine:
    """Check the layout against the launch and the model, then build the engine (the registry's `megatron`)."""
    device = init_distributed()
    check_world_size(trainer.devices, trainer.num_nodes, dist.get_world_size())
    hf_config = load_hf_config(pretrained.restore_from_path, pretrained.model_config)
    if model.peft.lora:
        raise ValueError("model.peft.peft_scheme=lora needs model.engine=torch_native: the megatron engine has no "
                         "adapters yet")
    if trainer.precision is Precision.bf16_pure:
        raise ValueError("model.engine=megatron keeps fp32 main weights in its distributed optimizer: set "
                         "trainer.precision=bf16 (or fp32); bf16_pure is a torch_native mode")
    data = getattr(model, "data", None)
    if data is not None:
        if data.packing:
            raise ValueError("model.data.packing=true is not supported with model.engine=megatron yet; set it to false")
        data.packing = False
    window = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", True) else None
    if window and window < model.encoder_seq_length:
        raise ValueError(f"model.engine=megatron has no sliding-window attention: {hf_config.model_type}'s window of "
                         f"{window} tokens is shorter than model.encoder_seq_length={model.encoder_seq_length}")
    layout = check_layout(hf_config, model.tensor_model_parallel_size, model.pipeline_model_parallel_size,
                          vp=model.virtual_pipeline_model_parallel_size, sequence_parallel=model.sequence_parallel)
    tokenizer_path = pretrained.tokenizer_path or pretrained.restore_from_path
    if tokenizer_path is None:
        raise ValueError("pretrained_checkpoint.tokenizer_path must be set when the model is built from model_config")
    log_rank0(logger, "megatron layout: dp=%d tp=%d pp=%d", layout.dp_size, layout.tp_size, layout.pp_size)
    return MegatronEngine(hf_config=hf_config, tokenizer=load_tokenizer(tokenizer_path), layout=layout, device=device,
                          restore_from_path=pretrained.restore_from_path,
                          compute_dtype=torch.float32 if trainer.precision is Precision.fp32 else torch.bfloat16,
                          seed=model.seed, log_prob_chunk_size=model.log_prob_chunk_size,
                          compile_layers=model.torch_compile if model.torch_compile is not None else device.type == "cuda")
