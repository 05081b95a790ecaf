"""megatron-core's GPTModel on converted Hugging Face weights across processes over gloo, against
transformers (torchrun --nproc_per_node 2 ... tp,pp MODEL_DIR...). Prints one JSON line per layout and model
from the rank that holds the output:

  tp  tensor parallel over every rank: each rank's vocabulary-parallel logits against its slice of
      transformers' logits, then the SFT loss through schedule.forward_backward (2 micro-batches of
      right-padded rows) and the final norm's gradient against transformers' of the same loss;
  pp  pipeline stages over every rank, the same loss through megatron's 1F1B schedule: the loss, and the
      gradients of the first stage's first norm and the last stage's final norm.
"""

from __future__ import annotations

import functools
import json
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from transformers import AutoModelForCausalLM

from nemo_aligner.engines.megatron.build import build_gpt_model, cuda_placements_on_cpu
from nemo_aligner.engines.megatron.convert import hf_to_megatron, pipeline_stage_state, tensor_parallel_shard
from nemo_aligner.engines.megatron.schedule import forward_backward
from nemo_aligner.losses.sft import sft_loss_fn

ROWS, SEQ, MICRO_BATCHES = 4, 13, 2


def _micro_batches(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """MICRO_BATCHES right-padded micro-batches of `ids`, the first 3 tokens a prompt (not scored)."""
    lengths = torch.tensor([SEQ, SEQ - 4, SEQ - 2, SEQ])[: len(ids)]
    attention = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    loss_mask = attention.float()
    loss_mask[:, :3] = 0
    batch = {"input_ids": ids * attention, "attention_mask": attention, "loss_mask": loss_mask}
    return [{k: v.chunk(MICRO_BATCHES)[i] for k, v in batch.items()} for i in range(MICRO_BATCHES)]


def _sft_reference(hf: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """transformers' token-mean NLL over the scored tokens of the whole batch, its backward run."""
    batch = {k: torch.cat([mb[k] for mb in micro_batches]) for k in micro_batches[0]}
    logits = hf(input_ids=batch["input_ids"]).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"][:, 1:]
    loss = -(logprobs * mask).sum() / mask.sum()
    hf.zero_grad()
    loss.backward()
    return loss.detach()


def _sft(micro_batches: list[dict[str, torch.Tensor]]) -> functools.partial:
    tokens = sum(mb["loss_mask"][:, 1:].sum() for mb in micro_batches)
    return functools.partial(sft_loss_fn, global_num_tokens=tokens)


def check_tensor_parallel(hf: torch.nn.Module, ids: torch.Tensor, rank: int, size: int) -> dict | None:
    """Logits of each rank's vocabulary slice, then the SFT loss and gradients through the schedule."""
    model = build_gpt_model(hf.config, dtype=torch.float32).eval()
    full = hf_to_megatron(hf.state_dict(), hf.config)
    missing, unexpected = model.load_state_dict({n: tensor_parallel_shard(n, t, rank, size) for n, t in full.items()},
                                                strict=False)
    with torch.no_grad(), cuda_placements_on_cpu():
        logits = model(input_ids=ids, position_ids=torch.arange(SEQ)[None].expand(ROWS, -1), attention_mask=None)
    gaps = torch.tensor([(logits - hf(input_ids=ids).logits.chunk(size, dim=-1)[rank]).abs().max().item()])
    micro_batches = _micro_batches(ids)
    sums = forward_backward([model], micro_batches, _sft(micro_batches), forward_only=False,
                            tp_group=parallel_state.get_tensor_model_parallel_group(),
                            vocab_start_index=rank * hf.config.vocab_size // size, chunk_size=5)
    reference = _sft_reference(hf, micro_batches)
    gaps = torch.cat([gaps, (sums["loss"] - reference).abs().reshape(1),
                      (model.decoder.final_layernorm.weight.grad - hf.model.norm.weight.grad).abs().max().reshape(1)])
    dist.all_reduce(gaps, op=dist.ReduceOp.MAX)
    return None if rank else {"logits_gap": gaps[0].item(), "loss_gap": gaps[1].item(), "final_norm_grad_gap": gaps[2].item(),
                              "missing": _real(missing), "unexpected": unexpected}


def check_pipeline(hf: torch.nn.Module, ids: torch.Tensor, rank: int, size: int) -> dict | None:
    """The SFT loss through megatron's 1F1B schedule over the stages, and its gradients at both ends."""
    model = build_gpt_model(hf.config, dtype=torch.float32, pipeline_stages=size).eval()
    state = pipeline_stage_state(hf_to_megatron(hf.state_dict(), hf.config), hf.config, rank, size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    micro_batches = _micro_batches(ids)
    sums = forward_backward([model], micro_batches, _sft(micro_batches), forward_only=False, tp_group=None,
                            vocab_start_index=0, chunk_size=5)
    reference = _sft_reference(hf, micro_batches)
    if rank == 0:
        gap = (model.decoder.layers[0].input_layernorm.weight.grad - hf.model.layers[0].input_layernorm.weight.grad)
        dist.send(gap.abs().max().reshape(1), dst=size - 1)
        return None
    first = torch.zeros(1)
    dist.recv(first, src=0)
    return {"loss_gap": (sums["loss"] - reference).abs().item(), "first_norm_grad_gap": first.item(),
            "final_norm_grad_gap": (model.decoder.final_layernorm.weight.grad - hf.model.norm.weight.grad).abs().max().item(),
            "missing": _real(missing), "unexpected": unexpected}


def _real(missing: list[str]) -> list[str]:
    return [name for name in missing if not name.endswith("._extra_state")]


def main() -> None:
    modes, model_dirs = sys.argv[1].split(","), sys.argv[2:]
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    for mode in modes:
        parallel_state.initialize_model_parallel(size if mode == "tp" else 1, size if mode == "pp" else 1)
        for model_dir in model_dirs:
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            ids = torch.randint(3, hf.config.vocab_size, (ROWS, SEQ), generator=torch.Generator().manual_seed(0))
            result = {"tp": check_tensor_parallel, "pp": check_pipeline}[mode](hf, ids, rank, size)
            if result is not None:
                print(json.dumps({"mode": mode, "model_type": hf.config.model_type, **result}), flush=True)
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
