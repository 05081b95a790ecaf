"""megatron-core's GPTModel under tensor parallelism over gloo (torchrun --nproc_per_node 2): each rank
holds its shard of the converted Hugging Face weights, and its vocabulary-parallel logits equal its slice
of transformers' logits. Prints one JSON line per family from rank 0."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import AutoModelForCausalLM

from nemo_aligner.engines.megatron.build import build_gpt_model, cuda_placements_on_cpu
from nemo_aligner.engines.megatron.convert import hf_to_megatron, tensor_parallel_shard


def main() -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(size, 1)
    for model_dir in sys.argv[1:]:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model = build_gpt_model(hf.config, dtype=torch.float32).eval()
        shards = {name: tensor_parallel_shard(name, t, rank, size) for name, t in hf_to_megatron(hf.state_dict(), hf.config).items()}
        missing, unexpected = model.load_state_dict(shards, strict=False)
        ids = torch.randint(3, hf.config.vocab_size, (3, 13), generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), cuda_placements_on_cpu():
            logits = model(input_ids=ids, position_ids=torch.arange(13)[None].expand(3, -1), attention_mask=None)
        gap = (logits - hf(input_ids=ids).logits.chunk(size, dim=-1)[rank]).abs().max().reshape(1)
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(json.dumps({"model_type": hf.config.model_type, "max_abs_gap": gap.item(),
                              "missing": [m for m in missing if not m.endswith("._extra_state")], "unexpected": unexpected}))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
