"""One torchrun launch that records what the layout tests compare (see tests/test_layouts.py).

Phases:
The workdir must hold pairs.jsonl (preference pairs) and sft.jsonl (input/output) for the DPO
and SPIN steps.

  single    (1 process): reference losses/grad norms of N steps (Llama with tied embeddings, and Qwen2), log-probs, greedy generations,
            a checkpoint after K steps (ckpt_1proc), an HF export.
  parallel  (2 processes): the same steps under DP=2 and under TP=2 (Qwen2: TP=2), DPO steps too; DP=2 resumed from
            ckpt_1proc; TP=2 saving ckpt_2proc after K steps; greedy generation and log-probs
            under TP=2; the reference-policy swap on sharded parameters; an HF export from TP=2.
  resume1   (1 process): resumed from ckpt_2proc.
Every rank computes; rank 0 writes `<workdir>/<phase>.json`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from nemo_aligner.config.dpo import DataPrefix, DPOLossConfig, DPOModelConfig, PreferenceDataConfig
from nemo_aligner.config.schema import (DataLoadingConfig, LoraTuningConfig, ModelConfig, OptimConfig, PeftConfig, Precision,
                                        PretrainedCheckpointConfig, ReferenceConfig, ReferenceStrategy, SchedConfig,
                                        TrainerConfig)
from nemo_aligner.config.spin import SFTDataConfig, SFTFileConfig, SPINConfig, SPINModelConfig
from nemo_aligner.data.builders import build_preference_loader, build_sft_loader
from nemo_aligner.losses.sft import sft_loss_fn
from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel
from nemo_aligner.models.nlp.gpt.gpt_spin_model import GPTSPINModel
from nemo_aligner.reference import PrecomputedReference
from nemo_aligner.types import LengthParams, SamplingParams
from nemo_aligner.utils.checkpoint import CheckpointManager
from nemo_aligner.engines.torch_native.hf_load import load_full_state_dict
from nemo_aligner.utils.utils import cpu_weight_swap, retrieve_model_state_dict_in_cpu

GLOBAL_BATCH, MICRO_BATCH, SEQ, STEPS, SAVE_AT = 8, 2, 14, 4, 2
# model.torch_compile of every model built here: None is the engine's default (compiled layers on CUDA); a
# script that builds many layouts in one process sets False (each layout would compile anew)
TORCH_COMPILE: bool | None = None
LORA = PeftConfig(peft_scheme="lora", lora_tuning=LoraTuningConfig(adapter_dim=4, alpha=8.0))


def loader_args(policy: GPTModel, cfg: DPOModelConfig | SPINModelConfig) -> dict:
    return dict(tokenizer=policy.tokenizer, data=cfg.data, max_seq_length=cfg.encoder_seq_length,
                global_batch_size=cfg.global_batch_size, data_parallel=policy.data_parallel)


def build(model_dir: str, tp: int, precision: Precision, sharding: str = "auto",
          data: DataLoadingConfig | None = None, engine: str = "torch_native", pp: int = 1,
          vp: int | None = None, lora: bool = False, micro_batch: int = MICRO_BATCH) -> GPTModel:
    """The plain policy of the layout checks; with `data`, a model section that has one (e.g. for packing)."""
    cfg = ModelConfig(engine=engine, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp,
                      peft=LORA if lora else PeftConfig(),
                      micro_batch_size=micro_batch, global_batch_size=GLOBAL_BATCH, tensor_model_parallel_size=tp,
                      seed=7, log_prob_chunk_size=5, data_parallel_sharding=sharding, torch_compile=TORCH_COMPILE,
                      optim=OptimConfig(lr=3e-3, weight_decay=0.01, sched=SchedConfig(warmup_steps=1, min_lr=1e-4)))
    if data is not None:
        cfg.data = data  # type: ignore[attr-defined]
    trainer = TrainerConfig(devices=int(os.environ["WORLD_SIZE"]), num_nodes=1, precision=precision)
    model = GPTModel(cfg, PretrainedCheckpointConfig(restore_from_path=model_dir), trainer)
    model.setup_optimizer(max_steps=STEPS)
    return model


def global_batch(step: int, vocab: int) -> dict[str, torch.Tensor]:
    """The same global batch for a step in every layout: right-padded, first 3 tokens a prompt."""
    gen = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(3, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
    lengths = torch.randint(6, SEQ + 1, (GLOBAL_BATCH,), generator=gen)
    attention = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    loss_mask = attention.float()
    loss_mask[:, :3] = 0
    return {"input_ids": ids * attention, "attention_mask": attention, "loss_mask": loss_mask}


AOT_LOSSES = ["aot", "aot_pair"]  # the step-level losses, as one weighted combination


def dpo_steps(model_dir: str, data: str, tp: int, precision: Precision, steps: int = 2,
              reference: ReferenceStrategy = ReferenceStrategy.swap, packing: bool = False,
              loss: str | list[str] = "rpo_bwd_kl", engine: str = "torch_native", pp: int = 1,
              sequence_parallel: bool = False, vp: int | None = None, lora: bool = False,
              sharding: str = "auto", micro_batch: int = 2, global_batch: int = 4) -> list[dict[str, float]]:
    """Metrics of `steps` DPO steps (`loss` + SFT term) on the pairs in `data`, with the reference
    held by `reference` (precomputed: one pass first, cached beside the data), packed or padded, on
    `engine` with `pp` pipeline stages, full fine-tuning or LoRA."""
    cfg = DPOModelConfig(engine=engine, pipeline_model_parallel_size=pp, sequence_parallel=sequence_parallel,
                         peft=LORA if lora else PeftConfig(), data_parallel_sharding=sharding,
                         virtual_pipeline_model_parallel_size=vp,
                         micro_batch_size=micro_batch, global_batch_size=global_batch, tensor_model_parallel_size=tp,
                         seed=7, encoder_seq_length=32, optim=OptimConfig(lr=3e-3), torch_compile=TORCH_COMPILE,
                         dpo=DPOLossConfig(preference_loss=loss, sft_loss_weight=0.5,
                                           log_prob_forward_micro_batch_size=1,
                                           reference=ReferenceConfig(strategy=reference)),
                         data=PreferenceDataConfig(data_prefix=DataPrefix(train=data, validation=data), packing=packing))
    trainer = TrainerConfig(devices=int(os.environ["WORLD_SIZE"]), num_nodes=1, precision=precision)
    policy = GPTDPOModel(cfg, PretrainedCheckpointConfig(restore_from_path=model_dir), trainer)
    policy.setup_optimizer(max_steps=steps)
    loader = build_preference_loader(data, shuffle=True, micro_batch_size=cfg.micro_batch_size, **loader_args(policy, cfg))
    if isinstance(policy.reference, PrecomputedReference):
        policy.reference.precompute_into(loader.dataset, name=f"layout-{engine}-tp{tp}-pp{pp}-vp{vp}-sp{int(sequence_parallel)}", cache_dir=os.path.dirname(data) + "/cache",
                                         pairs_per_forward=3, collate=loader.collate, score=policy.sequence_logps)
    records = []
    for _ in range(steps):
        metrics = policy.loss_and_metrics(loader.next_batch()[0], forward_only=False)
        grad_norm, _ = policy.optimizer_step(1.0)
        records.append({**metrics, "grad_norm": grad_norm})
    return records


def spin_steps(model_dir: str, data: str, tp: int, precision: Precision, steps: int = 2,
               packing: bool = False, engine: str = "torch_native", sequence_parallel: bool = False,
               lora: bool = False) -> list[dict[str, float]]:
    """Metrics of `steps` SPIN steps with greedy generation (sampling is seeded per data-parallel
    rank, so only greedy generations are layout-independent) on `engine`, full fine-tuning or LoRA."""
    cfg = SPINModelConfig(engine=engine, sequence_parallel=sequence_parallel, micro_batch_size=2, global_batch_size=4,
                          peft=LORA if lora else PeftConfig(),
                          tensor_model_parallel_size=tp, seed=7, encoder_seq_length=32, optim=OptimConfig(lr=3e-3),
                          torch_compile=TORCH_COMPILE,
                          spin=SPINConfig(ref_policy_kl_penalty=0.4, rollout_micro_batch_size=1,
                                          sampling_params=SamplingParams(use_greedy=True),
                                          length_params=LengthParams(max_length=4)),
                          data=SFTDataConfig(train_ds=SFTFileConfig(data), validation_ds=SFTFileConfig(data), packing=packing))
    trainer = TrainerConfig(devices=int(os.environ["WORLD_SIZE"]), num_nodes=1, precision=precision)
    policy = GPTSPINModel(cfg, PretrainedCheckpointConfig(restore_from_path=model_dir), trainer)
    policy.setup_optimizer(max_steps=steps)
    loader = build_sft_loader(data, response_budget=4, shuffle=True, collate=False, **loader_args(policy, cfg))
    records = []
    for _ in range(steps):
        examples = loader.next_batch()[0]
        prompts, actual = [ex["prompt_ids"] for ex in examples], [ex["response_ids"] for ex in examples]
        metrics = policy.loss_and_metrics(policy.pair_batch(prompts, actual, policy.generate_rejected(prompts)))
        grad_norm, _ = policy.optimizer_step(1.0)
        records.append({**metrics, "grad_norm": grad_norm})
    return records


def local_slice(model: GPTModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n, rank = model.local_batch_size, model.data_parallel.rank
    return {k: v[rank * n : (rank + 1) * n] for k, v in batch.items()}


def run_steps(model: GPTModel, start: int, stop: int) -> list[list[float]]:
    """[loss, grad_norm, lr] for steps start..stop-1."""
    vocab = model.engine.hf_config.vocab_size
    records = []
    for step in range(start, stop):
        batch = local_slice(model, global_batch(step, vocab))
        tokens = model.global_sum(batch["loss_mask"][:, 1:].sum())
        metrics = model.forward_backward(batch, functools.partial(sft_loss_fn, global_num_tokens=tokens))
        grad_norm, lr = model.optimizer_step(max_grad_norm=1.0)
        records.append([metrics["loss"].item(), grad_norm, lr])
    return records


def probe_logprobs(model: GPTModel) -> list[list[float]]:
    batch = global_batch(99, model.engine.hf_config.vocab_size)
    return (model.get_logprobs(batch) * batch["attention_mask"][:, 1:].to(model.device)).tolist()


def greedy(model: GPTModel) -> list[list[int]]:
    tok = model.tokenizer
    prompts = ["12+34=", "7-5=", "123+9=", "5="]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    out = model.generate(enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device),
                         SamplingParams(use_greedy=True), LengthParams(max_length=6))
    return out.tokens.tolist()


def manager(path: str, model_save_format: str = "torch_dist") -> CheckpointManager:
    return CheckpointManager(path, save_top_k=2, monitor="val_loss", mode="min", model_save_format=model_save_format)


def save(model: GPTModel, path: str, step: int, model_save_format: str = "torch_dist") -> None:
    manager(path, model_save_format).save(step, model, {"policy": model},
                                          {"consumed_samples": step * GLOBAL_BATCH, "epoch": 0})


def resume(model: GPTModel, path: str) -> int:
    mgr = manager(path)
    return int(mgr.load(mgr.latest(), model, {"policy": model})["step"])


def parallel_load_matches_rank0(model_dir: str, tp: int, sharding: str) -> bool:
    """Whether every rank's pieces of the weights, as it read them from the HF directory itself, equal what
    transformers' load on rank 0 and a broadcast give, bit for bit (on every rank)."""
    model = build(model_dir, tp=tp, precision=Precision.fp32, sharding=sharding)
    parallel = retrieve_model_state_dict_in_cpu(model)
    with torch.no_grad():  # so that a rank-0 load that changed nothing would show
        for param in model.engine.module.parameters():
            param.zero_()
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict() if dist.get_rank() == 0 else {}
    load_full_state_dict(model.engine.module, full)
    rank0 = retrieve_model_state_dict_in_cpu(model)
    same = torch.tensor(float(all(torch.equal(parallel[k], rank0[k]) for k in rank0)))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def phase_single(model_dir: str, qwen2_dir: str, work: str, precision: Precision) -> dict:
    out: dict = {"qwen2_steps": run_steps(build(qwen2_dir, tp=1, precision=precision), 0, STEPS),
                 "dpo": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision),
                 "dpo_resident": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, reference=ReferenceStrategy.resident),
                 "dpo_precomputed": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision,
                                              reference=ReferenceStrategy.precomputed),
                 "spin": spin_steps(model_dir, f"{work}/sft.jsonl", 1, precision),
                 "dpo_packed": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, packing=True),
                 "spin_packed": spin_steps(model_dir, f"{work}/sft.jsonl", 1, precision, packing=True),
                 "dpolora": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, lora=True,
                                      reference=ReferenceStrategy.adapters_disabled),
                 "spinlora": spin_steps(model_dir, f"{work}/sft.jsonl", 1, precision, lora=True),
                 "dpobco": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, loss="bco_pair", steps=3),
                 "dposimpo": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, loss="simpo",
                                       reference=ReferenceStrategy.auto),
                 "dpoaot": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, loss=AOT_LOSSES)}
    out["bf16_steps"] = run_steps(build(model_dir, tp=1, precision=Precision.bf16), 0, STEPS)
    model = build(model_dir, tp=1, precision=precision)
    out["logprobs_init"] = probe_logprobs(model)
    out["greedy"] = greedy(model)
    out["steps"] = run_steps(model, 0, SAVE_AT)
    save(model, f"{work}/ckpt_1proc", SAVE_AT)
    out["steps"] += run_steps(model, SAVE_AT, STEPS)
    out["logprobs_trained"] = probe_logprobs(model)
    model.export_hf(f"{work}/hf_1proc")
    adapted = build(model_dir, tp=1, precision=precision, lora=True)
    out["lora_steps"] = run_steps(adapted, 0, STEPS)
    adapted.export_hf(f"{work}/hf_lora_1proc")
    return out


def phase_parallel(model_dir: str, qwen2_dir: str, work: str, precision: Precision) -> dict:
    out: dict = {"qwen2_tp2_steps": run_steps(build(qwen2_dir, tp=2, precision=precision), 0, STEPS),
                 "dpo_dp2": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision),
                 "dpo_tp2": dpo_steps(model_dir, f"{work}/pairs.jsonl", 2, precision),
                 "dpo_dp2_precomputed": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision,
                                                  reference=ReferenceStrategy.precomputed),
                 "dpo_tp2_resident": dpo_steps(model_dir, f"{work}/pairs.jsonl", 2, precision,
                                               reference=ReferenceStrategy.resident),
                 "dpo_tp2_precomputed": dpo_steps(model_dir, f"{work}/pairs.jsonl", 2, precision,
                                                  reference=ReferenceStrategy.precomputed),
                 "spin_dp2": spin_steps(model_dir, f"{work}/sft.jsonl", 1, precision),
                 "spin_tp2": spin_steps(model_dir, f"{work}/sft.jsonl", 2, precision),
                 "dpo_dp2_packed": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, packing=True),
                 "dpo_tp2_packed": dpo_steps(model_dir, f"{work}/pairs.jsonl", 2, precision, packing=True),
                 "spin_tp2_packed": spin_steps(model_dir, f"{work}/sft.jsonl", 2, precision, packing=True),
                 **{f"dpolora_{name}": dpo_steps(model_dir, f"{work}/pairs.jsonl", tp, precision, lora=True, sharding=sharding,
                                                 reference=ReferenceStrategy.adapters_disabled)
                    for name, tp, sharding in (("dp2", 1, "auto"), ("tp2", 2, "auto"), ("fsdp_dp2", 1, "fsdp"))},
                 "spinlora_tp2": spin_steps(model_dir, f"{work}/sft.jsonl", 2, precision, lora=True),
                 **{f"dpobco_{name}": dpo_steps(model_dir, f"{work}/pairs.jsonl", tp, precision, loss="bco_pair", steps=3)
                    for name, tp in (("dp2", 1), ("tp2", 2))},
                 **{f"dposimpo_{name}": dpo_steps(model_dir, f"{work}/pairs.jsonl", tp, precision, loss="simpo",
                                                  reference=ReferenceStrategy.auto) for name, tp in (("dp2", 1), ("tp2", 2))},
                 # AOT ranks every pair of the step: one pair per micro-batch here, two in one process
                 "dpoaot_dp2": dpo_steps(model_dir, f"{work}/pairs.jsonl", 1, precision, loss=AOT_LOSSES, micro_batch=1),
                 "dpoaot_tp2": dpo_steps(model_dir, f"{work}/pairs.jsonl", 2, precision, loss=AOT_LOSSES)}
    dp2 = build(model_dir, tp=1, precision=precision)
    out["dp2_steps"] = run_steps(dp2, 0, STEPS)
    dp2 = build(model_dir, tp=1, precision=precision)
    out["dp2_resumed_from_1proc"] = run_steps(dp2, resume(dp2, f"{work}/ckpt_1proc"), STEPS)
    out["dp2_bf16_steps"] = run_steps(build(model_dir, tp=1, precision=Precision.bf16), 0, STEPS)
    out["parallel_load_equals_rank0"] = {f"{family} {layout}": parallel_load_matches_rank0(path, tp, sharding)
                                         for family, path in (("llama", model_dir), ("qwen2", qwen2_dir))
                                         for layout, tp, sharding in (("tp2", 2, "auto"), ("fsdp dp2", 1, "fsdp"))}
    # FSDP sharding: the same steps, and the replicated one-process checkpoint resumes under it
    dp2 = build(model_dir, tp=1, precision=precision, sharding="fsdp")
    out["dp2_fsdp_steps"] = run_steps(dp2, 0, STEPS)
    dp2 = build(model_dir, tp=1, precision=precision, sharding="fsdp")
    out["dp2_fsdp_resumed_from_1proc"] = run_steps(dp2, resume(dp2, f"{work}/ckpt_1proc"), STEPS)
    del dp2
    tp2 = build(model_dir, tp=2, precision=precision)
    out["tp2_logprobs_init"] = probe_logprobs(tp2)
    out["tp2_greedy"] = greedy(tp2)
    reference = retrieve_model_state_dict_in_cpu(tp2)
    out["tp2_steps"] = run_steps(tp2, 0, SAVE_AT)
    save(tp2, f"{work}/ckpt_2proc", SAVE_AT)
    save(tp2, f"{work}/ckpt_2proc_safetensors", SAVE_AT, model_save_format="safetensors")
    out["tp2_steps"] += run_steps(tp2, SAVE_AT, STEPS)
    trained = retrieve_model_state_dict_in_cpu(tp2)
    with cpu_weight_swap(tp2, reference):
        out["tp2_logprobs_in_swap"] = probe_logprobs(tp2)
    after = retrieve_model_state_dict_in_cpu(tp2)
    out["tp2_swap_restored_bitwise"] = all(torch.equal(trained[k], after[k]) for k in trained)
    out["tp2_logprobs_after_swap"] = probe_logprobs(tp2)
    tp2.export_hf(f"{work}/hf_tp2")
    # LoRA at TP=2: a checkpoint of the adapters (resumed by resume1) and the merged export from split adapters
    adapted = build(model_dir, tp=2, precision=precision, lora=True)
    out["lora_tp2_steps"] = run_steps(adapted, 0, SAVE_AT)
    save(adapted, f"{work}/ckpt_lora_2proc", SAVE_AT)
    out["lora_tp2_steps"] += run_steps(adapted, SAVE_AT, STEPS)
    adapted.export_hf(f"{work}/hf_lora_tp2")
    adapted = build(model_dir, tp=1, precision=precision, lora=True, sharding="fsdp")
    out["lora_fsdp_steps"] = run_steps(adapted, 0, STEPS)
    adapted.export_hf(f"{work}/hf_lora_fsdp")
    return out


def phase_resume1(model_dir: str, qwen2_dir: str, work: str, precision: Precision) -> dict:
    model = build(model_dir, tp=1, precision=precision)
    out = {"resumed_from_2proc": run_steps(model, resume(model, f"{work}/ckpt_2proc"), STEPS)}
    model = build(model_dir, tp=1, precision=precision)
    out["resumed_from_2proc_safetensors"] = run_steps(model, resume(model, f"{work}/ckpt_2proc_safetensors"), STEPS)
    model = build(model_dir, tp=1, precision=precision, lora=True)
    out["lora_resumed_from_2proc"] = run_steps(model, resume(model, f"{work}/ckpt_lora_2proc"), STEPS)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["single", "parallel", "resume1"], required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--qwen2-dir", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--precision", choices=[p.value for p in Precision], default="fp32")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"single": phase_single, "parallel": phase_parallel, "resume1": phase_resume1}[args.phase](
        args.model_dir, args.qwen2_dir, args.workdir, Precision(args.precision))
    if dist.get_rank() == 0:
        with open(os.path.join(args.workdir, f"{args.phase}.json"), "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
