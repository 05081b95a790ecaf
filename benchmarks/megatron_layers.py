"""Decoder layers alone, forward + backward, each layer compiled, at the DPO benchmark's shape (16 rows x 512
tokens, Qwen2.5-0.5B widths, bf16): megatron's layer as the megatron engine builds it (RoPE from cos/sin
tables, SwiGLU through build.swiglu), the same layer with megatron's own RoPE (the angles in, cos and sin
taken in every layer) and its own GLU (a chunk, whose backward is a concatenation), and transformers'
Qwen2 layer (what the torch_native engine runs). Separates the layers' own cost from the rest of a
training step (optimizer, log-probs, recompiles) when the two engines' steps differ.

    python benchmarks/megatron_layers.py --out benchmarks/results/megatron_layers_h200.json --kernels DIR

Prints and writes ms per layer (forward + backward, after warm-up); with --kernels, each variant's top
device kernels (three profiled iterations) as DIR/layers_<variant>_kernels.txt. With --first-rows N the
layers first run once on N rows, as a training run's reference pass in another micro-batch size does:
dynamo then compiles transformers' layers again with a dynamic batch dimension, and megatron's (compiled
as the engine compiles them, build.compile_with_static_batch) once more for the new static batch. On CPU
(no CUDA) it runs a small shape over gloo, for a check of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch.profiler import ProfilerActivity, profile
from transformers import AutoConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model

from nemo_aligner.engines.megatron.build import build_gpt_model, compile_with_static_batch, cuda_placements_on_cpu, rope_theta

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16
Run = Callable[[torch.Tensor], torch.Tensor]


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def qwen_config(layers: int) -> AutoConfig:
    return AutoConfig.for_model("qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                                max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                                tie_word_embeddings=True)


def megatron_layers(config: AutoConfig, length: int, *, engine_slots: bool) -> tuple[Run, Callable[[int], torch.Tensor]]:
    model = build_gpt_model(config, dtype=DTYPE).to(DEVICE)
    if not engine_slots:  # megatron's own RoPE (the angles in, cos and sin taken in every layer) and GLU
        model.config.apply_rope_fusion = model.config.bias_activation_fusion = False
        model.rotary_pos_emb = RotaryEmbedding(kv_channels=config.hidden_size // config.num_attention_heads,
                                               rotary_percent=1.0, rotary_base=int(rope_theta(config)),
                                               use_cpu_initialization=True)
    for layer in model.decoder.layers:
        compile_with_static_batch(layer)

    def run(x: torch.Tensor) -> torch.Tensor:
        with cuda_placements_on_cpu():
            return model.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(length))
    return run, lambda rows: torch.randn(length, rows, config.hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=True)


def transformers_layers(config: AutoConfig, length: int) -> tuple[Run, Callable[[int], torch.Tensor]]:
    model = Qwen2Model._from_config(config, attn_implementation="sdpa").to(DEVICE, DTYPE)
    for layer in model.layers:
        layer.compile()

    def run(x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(length, device=DEVICE)[None].expand(x.shape[0], length)
        embeddings = model.rotary_emb(x, positions)
        for layer in model.layers:
            x = layer(x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
            x = x[0] if isinstance(x, tuple) else x
        return x
    return run, lambda rows: torch.randn(rows, length, config.hidden_size, device=DEVICE, dtype=DTYPE, requires_grad=True)


def ms_per_layer(run: Run, hidden: torch.Tensor, layers: int, iterations: int) -> float:
    for _ in range(5):  # compiles, then warms up
        run(hidden).float().sum().backward()
    sync()
    start = time.perf_counter()
    for _ in range(iterations):
        run(hidden).float().sum().backward()
    sync()
    return (time.perf_counter() - start) / iterations * 1e3 / layers


def kernel_table(run: Run, hidden: torch.Tensor) -> str:
    with profile(activities=[ProfilerActivity.CUDA if CUDA else ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            run(hidden).float().sum().backward()
        sync()
    return prof.key_averages().table(sort_by="cuda_time_total" if CUDA else "cpu_time_total", row_limit=25,
                                     max_name_column_width=140)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4 if CUDA else 2)
    parser.add_argument("--rows", type=int, default=16 if CUDA else 2)
    parser.add_argument("--length", type=int, default=512 if CUDA else 32)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--first-rows", type=int, default=None, help="run once on this many rows first")
    parser.add_argument("--out", default=None, help="results JSON")
    parser.add_argument("--kernels", default=None, help="folder for each variant's kernel table")
    args = parser.parse_args()

    dist.init_process_group("nccl" if CUDA else "gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
    if CUDA:
        torch.cuda.set_device(0)
    parallel_state.initialize_model_parallel(1, 1)
    config = qwen_config(args.layers)
    variants = {"megatron_engine": lambda: megatron_layers(config, args.length, engine_slots=True),
                "megatron_own_rope_and_glu": lambda: megatron_layers(config, args.length, engine_slots=False),
                "transformers": lambda: transformers_layers(config, args.length)}
    result: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "shape": "qwen2.5-0.5b widths",
                    "rows": args.rows, "length": args.length, "layers": args.layers, "dtype": "bf16",
                    "first_rows": args.first_rows}
    for name, make in variants.items():
        run, make_hidden = make()
        if args.first_rows:
            run(make_hidden(args.first_rows)).float().sum().backward()
        hidden = make_hidden(args.rows)
        result[f"{name}_ms_per_layer"] = ms_per_layer(run, hidden, args.layers, args.iterations)
        print(f"{name:24s} {result[f'{name}_ms_per_layer']:.3f} ms per layer (forward + backward)", flush=True)
        if args.kernels:
            os.makedirs(args.kernels, exist_ok=True)
            with open(os.path.join(args.kernels, f"layers_{name}_kernels.txt"), "w") as f:
                f.write(kernel_table(run, hidden))
        torch._dynamo.reset()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
