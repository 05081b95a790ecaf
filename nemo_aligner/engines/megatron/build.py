"""megatron-core's GPTModel for a Hugging Face config: the transformer config, the layer spec (megatron's
local spec, no TransformerEngine or apex needed) with PyTorch's SDPA as the core attention."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from megatron.core import parallel_state
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer import TransformerConfig, mlp
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.module import MegatronModule
from transformers import PretrainedConfig

from nemo_aligner.engines.megatron.convert import has_qk_norms

# The families whose decoder megatron's local spec reproduces: pre-norm RMSNorm, RoPE (non-interleaved),
# SwiGLU MLP without biases, grouped-query attention with an optional qkv bias (qwen2) or per-head query and
# key norms (qwen3).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


def transformer_config(config: PretrainedConfig, *, dtype: torch.dtype) -> TransformerConfig:
    """The megatron TransformerConfig of a Hugging Face config (FAMILIES); the fused softmax, which needs
    a CUDA extension, is off; RoPE goes through megatron's fused-RoPE slot to apply_rotary_tables
    (install_rotary_tables), SwiGLU through its fused-activation slot to swiglu (install_swiglu); dropout is 0."""
    if config.model_type not in FAMILIES:
        raise ValueError(f"model.engine=megatron supports model_type {list(FAMILIES)}, not '{config.model_type}'")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"model.engine=megatron supports plain RoPE, not rope_type '{rope_type}'")
    heads = config.num_attention_heads
    install_rotary_tables()
    install_swiglu()
    return TransformerConfig(
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size, ffn_hidden_size=config.intermediate_size,
        num_attention_heads=heads, num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
        kv_channels=getattr(config, "head_dim", None) or config.hidden_size // heads,
        normalization="RMSNorm", layernorm_epsilon=config.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        qk_layernorm=has_qk_norms(config),
        attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False, bias_activation_fusion=True,
        bias_dropout_fusion=False, apply_rope_fusion=True, gradient_accumulation_fusion=False,
        persist_layer_norm=False, use_cpu_initialization=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


class RotaryTables(RotaryEmbedding):
    """RoPE as cos and sin tables, side by side along the last dimension ([s, 1, 1, 2 * d], in the compute
    dtype), made once per sequence length; megatron's own RotaryEmbedding hands every layer the angles,
    and its unfused RoPE takes their cos and sin in each layer, which a compiled layer then recomputes in
    fp32 for every element of every head, forward and backward. Same values: megatron also rounds the
    fp32 cos and sin to the compute dtype before it multiplies."""

    def __init__(self, *, kv_channels: int, rotary_base: int, dtype: torch.dtype) -> None:
        super().__init__(kv_channels=kv_channels, rotary_percent=1.0, rotary_base=rotary_base,
                         use_cpu_initialization=True)
        self.dtype = dtype

    @lru_cache(maxsize=32)
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: object = None) -> torch.Tensor:
        angles = super().forward(max_seq_len, offset, packed_seq, cp_group)
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.dtype)


def apply_rotary_tables(t: torch.Tensor, tables: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """RoPE on `t` [s, b, heads, d] from RotaryTables' [s, 1, 1, 2 * d] (megatron's fused-RoPE signature;
    its non-interleaved layout: the two halves of each head rotate as pairs)."""
    if interleaved:
        raise NotImplementedError("interleaved RoPE is not among the supported families")
    cos, sin = tables.chunk(2, dim=-1)
    first, second = t.chunk(2, dim=-1)
    return t * cos + torch.cat((-second, first), dim=-1) * sin


class SwiGLU(torch.autograd.Function):
    """silu(gate) * up of fc1's output [..., 2f] = [gate | up], as megatron's unfused GLU computes it. Its
    backward computes both halves of the input's gradient from one read of gate, up and the output's
    gradient and writes them into the two halves of one tensor; the autograd of megatron's chunk instead
    ends in a concatenation, which inductor lowers to a kernel that reads gate and the gradient again for
    the second half. On an H200 at the DPO benchmark's shape the backward kernel takes 127 us a layer
    (megatron's 160, transformers' two separate projections 92)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ctx.save_for_backward(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (x,) = ctx.saved_tensors
        gate, up = x.float().chunk(2, dim=-1)
        grad = grad_output.float()
        sigmoid = torch.sigmoid(gate)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        grad_gate.copy_(grad * up * sigmoid * (1 + gate * (1 - sigmoid)))  # d silu(g) / dg = s (1 + g (1 - s))
        grad_up.copy_(grad * gate * sigmoid)
        return grad_x


def swiglu(x: torch.Tensor, bias: torch.Tensor | None, fp8_input_store: bool = False,
           cpu_offload_input: bool = False) -> torch.Tensor:
    """SwiGLU in megatron's fused bias-SwiGLU slot (its signature; this engine's linears have no bias)."""
    if bias is not None or fp8_input_store or cpu_offload_input:
        raise NotImplementedError("the SwiGLU slot takes no bias, fp8 input store or activation offload")
    return SwiGLU.apply(x)


def install_swiglu() -> None:
    """Route megatron's fused bias-SwiGLU slot (its own is TorchScript, which dynamo cannot compile) to
    swiglu; the MLP asks for it when the config sets bias_activation_fusion."""
    mlp.bias_swiglu_impl = swiglu


def install_rotary_tables() -> None:
    """Route megatron's fused-RoPE slot (filled by TransformerEngine when that is installed; this engine
    builds megatron's local spec, so TE's kernel would never be asked for) to apply_rotary_tables; the
    slot must be filled before a TransformerConfig with apply_rope_fusion is made."""
    rope_utils.fused_apply_rotary_pos_emb = apply_rotary_tables


class SDPACoreAttention(MegatronModule):
    """Causal attention through torch.nn.functional.scaled_dot_product_attention (flash / cuDNN kernels on
    GPU, any device), in megatron's core-attention slot: [s, b, heads, d] in, [s, b, heads * d] out. A
    given attention mask ([b, 1, s, s], True where hidden: generation's left-padded prompts) replaces
    the causal one."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: object, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection: object = None) -> None:
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                attn_mask_type: object = None, attention_bias: object = None,
                packed_seq_params: object = None) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention takes no attention bias or packed sequences")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        # megatron's mask marks what is hidden (True); without one, causal attention over right-padded rows
        mask = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


class RowParallelLinearWithGroup(RowParallelLinear):
    """megatron's RowParallelLinear, whose forward (megatron-core 0.16) names no process group for its
    matmul, so megatron looks the default one up and warns on every call; under torch.compile that warning
    breaks every layer's graph. The group looked up is the layer's own tp_group: this passes it."""

    def _forward_impl(self, input: torch.Tensor, weight: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:  # noqa: A002
        if kwargs.get("tp_group") is None:
            kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm in megatron's norm slots (megatron's own torch wrapper refuses sequence parallelism
    without TransformerEngine or apex). Under sequence parallelism each tensor-parallel rank normalises
    its share of the sequence, so the weight is marked for megatron's finalize_model_grads, which then
    sums its gradient over those ranks."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused: object) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def build_gpt_model(config: PretrainedConfig, *, dtype: torch.dtype, pipeline_stages: int = 1,
                    sequence_parallel: bool = False, chunks: int = 1, chunk: int | None = None) -> GPTModel:
    """megatron-core's GPTModel for `config` (random weights; convert.hf_to_megatron fills them), on the CPU:
    with `pipeline_stages` > 1, this rank's stage (its share of the layers; the embedding on the first
    stage, the final norm and output layer on the last), as megatron's parallel_state places it; with
    `chunks` > 1 (virtual pipeline), the stage's chunk `chunk` of them; with `sequence_parallel`,
    activations outside the tensor-parallel blocks split along the sequence."""
    layer = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=has_qk_norms(config))
    layer.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    if has_qk_norms(config):  # megatron's finalize_model_grads sums their gradients over the TP ranks' heads
        layer.submodules.self_attention.submodules.q_layernorm = RMSNorm
        layer.submodules.self_attention.submodules.k_layernorm = RMSNorm
    layer.submodules.input_layernorm = layer.submodules.pre_mlp_layernorm = RMSNorm
    layer.submodules.self_attention.submodules.linear_proj = RowParallelLinearWithGroup
    layer.submodules.mlp.submodules.linear_fc2 = RowParallelLinearWithGroup
    spec = TransformerBlockSubmodules(layer_specs=[layer] * (config.num_hidden_layers // (pipeline_stages * chunks)),
                                      layer_norm=RMSNorm)
    transformer = transformer_config(config, dtype=dtype)
    transformer.pipeline_model_parallel_size = pipeline_stages
    transformer.virtual_pipeline_model_parallel_size = chunks if chunks > 1 else None
    transformer.microbatch_group_size_per_vp_stage = pipeline_stages  # megatron's default, set after construction
    # Batched p2p posts a stage's sends and receives as [to prev, from prev, to next, from next]; with two
    # stages prev and next are the same rank, and the interleaved schedule's steady state sends it an
    # activation and a gradient of one shape at once, which the other side then receives swapped. The
    # unbatched path orders them by rank parity and stays correct.
    transformer.batch_p2p_comm = chunks == 1
    transformer.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    transformer.sequence_parallel = sequence_parallel
    transformer.pipeline_dtype = dtype
    ends = dict(ignore_virtual=chunks == 1, vp_stage=chunk)
    with cuda_placements_on_cpu():
        model = GPTModel(transformer, spec, vocab_size=config.vocab_size,
                         max_sequence_length=config.max_position_embeddings, position_embedding_type="rope",
                         rotary_base=int(rope_theta(config)),
                         share_embeddings_and_output_weights=config.tie_word_embeddings,
                         pre_process=parallel_state.is_pipeline_first_stage(**ends),
                         post_process=parallel_state.is_pipeline_last_stage(**ends), vp_stage=chunk)
    model.rotary_pos_emb = RotaryTables(kv_channels=transformer.kv_channels, rotary_base=int(rope_theta(config)),
                                        dtype=dtype)
    return model


def compile_with_static_batch(layer: torch.nn.Module) -> None:
    """Compile a decoder layer's forward with its batch dimension static: one graph per batch size, the
    sequence free to turn dynamic. Megatron's activations are [s, b, h], so a batch size dynamo made
    symbolic (a reference pass in another micro-batch size is enough) sits inside every index the
    compiled QKV split, RoPE, layout copy and SwiGLU backward compute, and those kernels ran at half
    their static speed on an H200. The hook that marks the batch static runs outside the graph."""
    layer.forward = torch.compile(layer.forward)
    layer.register_forward_pre_hook(_mark_batch_static, with_kwargs=True)


def _mark_batch_static(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    torch._dynamo.mark_static(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], 1)


def rope_theta(config: PretrainedConfig) -> float:
    """RoPE's base (transformers 5 keeps it in rope_parameters, earlier versions as rope_theta)."""
    return (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or config.rope_theta


class _CudaArgumentsToCpu(TorchFunctionMode):
    """Tensor factories and moves that name a CUDA device (device="cuda", .cuda(), .to("cuda")) get the CPU,
    and a tensor's type() names its CUDA type (the distributed optimizer accepts only those)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # megatron's checks ask for CUDA tensor types
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda" else a
                         for a in args)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_placements_on_cpu() -> Iterator[None]:
    """Run megatron-core on a machine without CUDA (CPU tests over gloo). megatron-core places tensors on
    CUDA in a few spots (RoPE frequencies, pipeline buffers, the tied-embedding sync) and synchronises
    the device around pipeline sends; inside this block those placements get the CPU and
    torch.cuda.synchronize does nothing. With CUDA, nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.current_device, torch.cuda.synchronize
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        with _CudaArgumentsToCpu():
            yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize = saved
