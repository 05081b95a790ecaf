"""Typed schema of the Hydra config sections every entry script shares.

Each dataclass mirrors one YAML section with NeMo-Aligner's key names. The shipped YAML files
list every key (a test checks that), the YAML is merged onto these dataclasses in struct mode so
an unknown key fails, and `__post_init__` checks values that span fields.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Sequence

from nemo_aligner.types import LengthPolicy, require


class Precision(enum.Enum):
    """Training precision (README's "Precision").

    bf16: bf16 compute, fp32 master weights, optimizer state and gradient reductions (trains like fp32);
    bf16_pure: weights and optimizer state in bf16 too: faster and half the memory, but small
        updates round away once they are below bf16's resolution of the weight (a speed mode);
    fp32: everything in fp32.
    """

    bf16 = "bf16"
    bf16_pure = "bf16_pure"
    fp32 = "fp32"


class OptimizerName(enum.Enum):
    adamw = "adamw"


class SchedulerName(enum.Enum):
    CosineAnnealing = "CosineAnnealing"
    Constant = "Constant"


@dataclass
class SchedConfig:
    """Learning-rate schedule: linear warm-up, optional constant hold, cosine decay to min_lr."""

    name: SchedulerName = SchedulerName.CosineAnnealing
    warmup_steps: int = 0  # linear ramp from 0 to lr over this many steps
    constant_steps: int = 0  # steps held at lr after warm-up before the decay starts
    min_lr: float = 0.0  # the floor the cosine decays to (at trainer max_steps)

    def __post_init__(self) -> None:
        require(self.warmup_steps >= 0, "model.optim.sched.warmup_steps", self.warmup_steps, ">= 0")
        require(self.constant_steps >= 0, "model.optim.sched.constant_steps", self.constant_steps, ">= 0")
        require(self.min_lr >= 0, "model.optim.sched.min_lr", self.min_lr, ">= 0")


@dataclass
class OptimConfig:
    """AdamW hyper-parameters (fused kernels on GPU). Weight decay skips 1-D params (norms, biases)."""

    name: OptimizerName = OptimizerName.adamw
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    sched: SchedConfig = field(default_factory=SchedConfig)

    def __post_init__(self) -> None:
        require(self.lr > 0, "model.optim.lr", self.lr, "> 0")
        require(self.sched.min_lr <= self.lr, "model.optim.sched.min_lr", self.sched.min_lr, f"<= model.optim.lr ({self.lr})")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "model.optim.betas", self.betas, "two values in [0, 1)")


class ReferenceStrategy(enum.Enum):
    """How the reference policy is held (nemo_aligner/reference/)."""

    auto = "auto"  # DPO: precomputed; SPIN: resident when it fits on the device, else swap
    swap = "swap"  # a host copy of the weights swapped in for each use (no device memory)
    resident = "resident"  # a device copy in the compute dtype, swapped in device to device
    precomputed = "precomputed"  # sequence log-probs computed once before training and cached on disk (DPO)
    adapters_disabled = "adapters_disabled"  # LoRA (DPO): the same network with its adapters switched off


@dataclass
class ReferenceConfig:
    """model.dpo.reference / model.spin.reference: how the reference policy is held."""

    strategy: ReferenceStrategy = ReferenceStrategy.auto
    cache_dir: Optional[str] = None  # precomputed: where caches live; null: <exp_manager.explicit_log_dir>/reference_logps


@dataclass
class PretrainedCheckpointConfig:
    """Where the initial weights come from: a local Hugging Face directory, or a config for random init."""

    restore_from_path: Optional[str] = "examples/tiny/model"  # HF model dir (config.json + safetensors + tokenizer)
    model_config: Optional[dict[str, Any]] = None  # HF config kwargs incl. model_type, for random init
    tokenizer_path: Optional[str] = None  # tokenizer directory when it is not restore_from_path

    def __post_init__(self) -> None:
        if (self.restore_from_path is None) == (self.model_config is None):
            raise ValueError(
                "exactly one of pretrained_checkpoint.restore_from_path (an HF model directory) and "
                "pretrained_checkpoint.model_config (an HF config for random init) must be set; got "
                f"restore_from_path={self.restore_from_path!r}, model_config={self.model_config!r}"
            )


@dataclass
class DataLoadingConfig:
    """What every model.data section shares: the over-length policy, padding and shuffling."""

    length_policy: LengthPolicy = LengthPolicy.truncate_prompt_left  # for examples longer than encoder_seq_length
    pad_to_multiple_of: int = 8
    # Pack each micro-batch's sequences end to end in one row, with no padding (data/packing.py):
    # attention stays within each sequence and the log-probs and losses are those of the padded rows.
    # null: on where it is faster (CUDA in bf16, for the families that keep packed sequences apart), else off.
    packing: Optional[bool] = None
    # Without packing: global batches of examples of similar length (data/sampler.py), so less padding.
    group_by_length: bool = False
    seed: int = 1234  # shuffling order of the training examples per epoch

    def __post_init__(self) -> None:
        require(self.pad_to_multiple_of >= 1, "model.data.pad_to_multiple_of", self.pad_to_multiple_of, ">= 1")


# NeMo-Aligner's LoRA target names -> the Hugging Face module names they cover (peft's names pass as they are)
NEMO_LORA_TARGETS = {"attention_qkv": ["q_proj", "k_proj", "v_proj"], "attention_dense": ["o_proj"],
                     "mlp_fc1": ["gate_proj", "up_proj"], "mlp_fc2": ["down_proj"], "all": ["all-linear"]}


@dataclass
class LoraTuningConfig:
    """model.peft.lora_tuning: LoRA adapters (through peft) on the named linear layers."""

    # Hugging Face module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), all-linear
    # (every linear layer but the LM head), or NeMo-Aligner's attention_qkv, attention_dense, mlp_fc1, mlp_fc2, all
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    adapter_dim: int = 16  # the rank r of B·A
    alpha: float = 32.0  # the update is scaled by alpha / adapter_dim
    adapter_dropout: float = 0.0  # dropout on the adapters' input while training

    def __post_init__(self) -> None:
        require(len(self.target_modules) > 0, "model.peft.lora_tuning.target_modules", self.target_modules, "at least one name")
        require(self.adapter_dim >= 1, "model.peft.lora_tuning.adapter_dim", self.adapter_dim, ">= 1")
        require(self.alpha > 0, "model.peft.lora_tuning.alpha", self.alpha, "> 0")
        require(0 <= self.adapter_dropout < 1, "model.peft.lora_tuning.adapter_dropout", self.adapter_dropout, "in [0, 1)")

    def hf_target_modules(self) -> list[str] | str:
        """The targets in peft's terms: module-name suffixes, or the string all-linear."""
        names = [hf for name in self.target_modules for hf in NEMO_LORA_TARGETS.get(name, [name])]
        return "all-linear" if "all-linear" in names else sorted(set(names))


@dataclass
class PeftConfig:
    """model.peft: parameter-efficient fine-tuning (NeMo-Aligner's keys). lora trains adapters only; the
    base weights stay frozen in the compute dtype and the reference can be the adapter-free network."""

    peft_scheme: str = "none"  # none | lora
    lora_tuning: LoraTuningConfig = field(default_factory=LoraTuningConfig)

    def __post_init__(self) -> None:
        require(self.peft_scheme in ("none", "lora"), "model.peft.peft_scheme", self.peft_scheme, "none or lora")

    @property
    def lora(self) -> bool:
        return self.peft_scheme == "lora"


@dataclass
class ModelConfig:
    """The policy network, its parallel layout, batch sizes and optimizer."""

    engine: str = "torch_native"  # a name in the engine registry (nemo_aligner/engines/registry.py)
    micro_batch_size: int = 1  # examples per forward/backward on one data-parallel rank (a DPO/SPIN example is a pair)
    global_batch_size: int = 8  # examples per optimizer step over all ranks
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Megatron's interleaved pipeline (model.engine=megatron): each stage holds this many chunks of layers,
    # which shrinks the pipeline bubble by that factor; null: one chunk per stage
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # Megatron's sequence parallelism (model.engine=megatron with tensor_model_parallel_size > 1): the
    # activations between the tensor-parallel blocks are split along the sequence over the TP ranks
    sequence_parallel: bool = False
    # NeMo-Aligner's O2 mixed precision: under trainer.precision=bf16, bf16 weights with fp32 master
    # weights and optimizer state inside the optimizer, as both engines train; false (O1: fp32 weights
    # under bf16 autocast) is not implemented
    megatron_amp_O2: bool = True
    # How data-parallel ranks hold the model (torch_native): replicate (each rank the whole model,
    # one fp32 gradient all-reduce per step; fastest when it fits) | fsdp (FSDP2 shards weights,
    # gradients and optimizer state) | auto (replicate when the training state, 18 bytes per parameter,
    # takes at most 40% of a GPU's memory, else fsdp; replicate on CPU).
    data_parallel_sharding: str = "auto"
    encoder_seq_length: int = 4096  # the longest sequence (prompt + response) the model is fed
    seed: int = 1234
    log_prob_chunk_size: int = 1024  # tokens per fp32 log-softmax chunk (bounds [tokens x vocab] memory)
    # Attention kernel (transformers' attn_implementation: sdpa, eager, flash_attention_2, ...);
    # null: sdpa where the model family supports it (as sdpa_grouped_decode: decode steps read each cached
    # key/value head once; torch_varlen for packed bf16 rows on CUDA), eager otherwise (e.g. Gemma2).
    attn_implementation: Optional[str] = None
    # torch.compile each decoder layer, and generation's decode step as a CUDA graph (replicated weights,
    # no tensor parallelism); null: on with CUDA, off on CPU
    torch_compile: Optional[bool] = None
    activations_checkpoint_granularity: Optional[str] = None  # null | full (recompute decoder layers in the backward)
    activations_checkpoint_num_layers: Optional[int] = None  # with full: the first N decoder layers; null: all
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        require(self.data_parallel_sharding in ("auto", "replicate", "fsdp"), "model.data_parallel_sharding",
                self.data_parallel_sharding, "auto, replicate or fsdp")
        require(self.activations_checkpoint_granularity in (None, "full"), "model.activations_checkpoint_granularity",
                self.activations_checkpoint_granularity, "null or full")
        if self.activations_checkpoint_num_layers is not None:
            require(self.activations_checkpoint_num_layers >= 1, "model.activations_checkpoint_num_layers",
                    self.activations_checkpoint_num_layers, "null or >= 1")
        if self.virtual_pipeline_model_parallel_size is not None:
            require(self.virtual_pipeline_model_parallel_size >= 2 and self.pipeline_model_parallel_size >= 2,
                    "model.virtual_pipeline_model_parallel_size", self.virtual_pipeline_model_parallel_size,
                    "null, or >= 2 with model.pipeline_model_parallel_size >= 2")
        require(self.megatron_amp_O2, "model.megatron_amp_O2", self.megatron_amp_O2,
                "true (bf16 trains with fp32 master weights in the optimizer; O1 autocast is not implemented)")
        for key in ("micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
                    "pipeline_model_parallel_size", "encoder_seq_length", "log_prob_chunk_size"):
            require(getattr(self, key) >= 1, f"model.{key}", getattr(self, key), ">= 1")


@dataclass
class TrainerConfig:
    """Devices and precision. Each algorithm adds its own loop section (trainer.dpo, ...)."""

    devices: int = 1  # processes per node; must match torchrun --nproc_per_node
    num_nodes: int = 1
    precision: Precision = Precision.bf16
    log_every_n_steps: int = 10  # a metric line in the log every N steps (the progress bar updates every step)

    def __post_init__(self) -> None:
        require(self.log_every_n_steps >= 1, "trainer.log_every_n_steps", self.log_every_n_steps, ">= 1")


@dataclass
class LoopConfig:
    """The fit loop of an algorithm (trainer.dpo, trainer.spin, trainer.rs); each algorithm's
    subclass names its section, so errors name the full key.

    Intervals follow Lightning/NeMo: an int counts optimizer steps, a float in (0, 1] is a
    fraction of an epoch's steps.
    """

    section: ClassVar[str] = "trainer.<algorithm>"

    max_epochs: int = 1
    max_steps: int = -1  # -1: max_epochs x steps per epoch
    val_check_interval: Any = 0.25  # int: every N steps; float in (0, 1]: fraction of an epoch
    save_interval: int = 100  # steps between checkpoints (a final one is always written)
    limit_val_batches: Any = 1.0  # int: that many validation batches; float in (0, 1]: that fraction
    gradient_clip_val: float = 1.0  # clip the global grad norm to this; 0 disables

    def __post_init__(self) -> None:
        key = f"{self.section}."
        require(self.max_epochs >= 1, key + "max_epochs", self.max_epochs, ">= 1")
        require(self.max_steps == -1 or self.max_steps >= 1, key + "max_steps", self.max_steps, "-1 or >= 1")
        require(self.save_interval >= 1, key + "save_interval", self.save_interval, ">= 1")
        require(self.gradient_clip_val >= 0, key + "gradient_clip_val", self.gradient_clip_val, ">= 0")
        for name in ("val_check_interval", "limit_val_batches"):
            value = getattr(self, name)
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
                isinstance(value, float) and 0 < value <= 1)
            require(ok, key + name, value, "an int >= 1 (steps/batches) or a float in (0, 1] (fraction)")


def resolve_count(value: int | float, total: int) -> int:
    """An int as is; a float fraction of `total`, at least 1."""
    return value if isinstance(value, int) else max(1, round(value * total))


@dataclass
class CheckpointCallbackParams:
    """Which checkpoints are kept: the save_top_k best by `monitor`, plus always the latest."""

    save_top_k: int = 2
    monitor: str = "val_loss"  # a validation metric name
    mode: str = "min"  # min | max
    save_nemo_on_train_end: bool = True  # NeMo's name: export a Hugging Face model at the end
    # Write the model's checkpoint in the background (DCP async_save) while training goes on; `latest`
    # moves once every rank's write finished.
    async_save: bool = True
    # torch_dist: weights and optimizer state as one DCP checkpoint; safetensors: the weights as Hugging
    # Face safetensors (full tensors, training dtype) and the optimizer state as DCP; both resume exactly.
    model_save_format: str = "torch_dist"
    save_consolidated: bool = False  # also write checkpoints/step_<N>/hf: the HF directory export_to_hf.py makes

    def __post_init__(self) -> None:
        require(self.save_top_k >= 1, "exp_manager.checkpoint_callback_params.save_top_k", self.save_top_k, ">= 1")
        require(self.mode in ("min", "max"), "exp_manager.checkpoint_callback_params.mode", self.mode, "one of [min, max]")
        require(self.model_save_format in ("torch_dist", "safetensors"),
                "exp_manager.checkpoint_callback_params.model_save_format", self.model_save_format, "torch_dist or safetensors")


def check_batch_sizes(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """The gradient-accumulation steps; raises if the global batch does not split evenly."""
    if global_batch_size % (micro_batch_size * dp):
        raise ValueError(
            f"model.global_batch_size={global_batch_size} must be a multiple of model.micro_batch_size "
            f"({micro_batch_size}) x data-parallel size ({dp}) = {micro_batch_size * dp}; e.g. set "
            f"model.global_batch_size={max(1, round(global_batch_size / (micro_batch_size * dp))) * micro_batch_size * dp}"
        )
    return global_batch_size // (micro_batch_size * dp)


def check_batch_layout(trainer: TrainerConfig, model: ModelConfig) -> None:
    """At start-up, before any process group exists: the model-parallel sizes divide the world
    (trainer.devices x trainer.num_nodes) and the global batch splits over the data-parallel ranks."""
    world = trainer.devices * trainer.num_nodes
    model_parallel = model.tensor_model_parallel_size * model.pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(f"model.tensor_model_parallel_size ({model.tensor_model_parallel_size}) x "
                         f"model.pipeline_model_parallel_size ({model.pipeline_model_parallel_size}) = {model_parallel} "
                         f"must divide trainer.devices x trainer.num_nodes = {world}")
    check_batch_sizes(model.global_batch_size, model.micro_batch_size, world // model_parallel)


def check_monitor(exp: ExpManagerConfig, validation_metrics: Sequence[str]) -> None:
    """The checkpoint callback's monitor must be one of the algorithm's validation metrics (val_<name>)."""
    allowed = [f"val_{name}" for name in validation_metrics]
    require(exp.checkpoint_callback_params.monitor in allowed, "exp_manager.checkpoint_callback_params.monitor",
            exp.checkpoint_callback_params.monitor, f"one of this algorithm's validation metrics {allowed}")


@dataclass
class WandbLoggerKwargs:
    project: Optional[str] = None
    name: Optional[str] = None


@dataclass
class ExpManagerConfig:
    """Where logs and checkpoints go and which metric loggers are on."""

    explicit_log_dir: str = "results"
    resume_if_exists: bool = True
    checkpoint_callback_params: CheckpointCallbackParams = field(default_factory=CheckpointCallbackParams)
    create_tensorboard_logger: bool = True
    create_wandb_logger: bool = False
    wandb_logger_kwargs: WandbLoggerKwargs = field(default_factory=WandbLoggerKwargs)
