"""Our DPO step against TRL's DPOTrainer on the same workload, on one GPU, in one invocation.

    python benchmarks/dpo_vs_trl.py --out benchmarks/results/dpo_vs_trl_h200.json

Workload (the speed issue's): a randomly initialised Qwen2.5-0.5B-shaped model, prompts of 256
tokens and chosen / rejected responses of 256 tokens each (no padding), 8 pairs per optimizer step,
sigmoid loss, beta 0.1; plus our README configuration (512 + 512 tokens, 64 pairs, micro-batches of
8). Each run is a worker subprocess, one after another on the same GPU, so peak memory is per run:

  trl_default        TRL 1.16 DPOTrainer as configured by default: fp32 weights + bf16 autocast, a separate
                     reference model, gradient checkpointing (DPOConfig's default)
  trl_precompute     TRL with precompute_ref_log_probs=True
  trl_no_checkpointing  TRL default but gradient_checkpointing=False (faster, more memory)
  ours_precomputed   trainer.precision=bf16 (fp32 master weights), reference precomputed
  ours_resident      bf16 with fp32 masters, reference resident (online, on the device)
  ours_swap          bf16 with fp32 masters, reference swapped in from pinned host memory each step
  ours_pure_bf16     trainer.precision=bf16_pure, reference precomputed
  ours_megatron      ours_precomputed on model.engine=megatron (megatron-core GPTModel, DDP + distributed optimizer)
  ours_packed        ours_precomputed with model.data.packing=true (for the variable-length --workload pm64 / longtail)
  ours_*checkpointed the same with activation checkpointing per layer (model.activations_checkpoint_granularity=full),
                     as TRL's default has gradient checkpointing: the memory comparison at equal recomputation
  ours_checkpointed_half  ours_precomputed checkpointing the first half of the layers (activations_checkpoint_num_layers)
  ours_micro4, ours_micro2  ours_precomputed in micro-batches of 4 / 2 pairs (the same 8 pairs per step): memory
                     bounded by the micro-batch instead of recomputation
  ours_readme        the README configuration, bf16 with fp32 masters, reference precomputed
  trl_lora           TRL default with a peft LoraConfig (r 16, alpha 32, all linear layers): its reference is the
                     adapter-free model
  ours_lora          model.peft.peft_scheme=lora with the same adapters, reference adapters_disabled
  ours_lora_precomputed  the same with the reference precomputed
  ours_simpo, ours_orpo  reference-free losses (no reference forward, no precompute), bf16 with fp32 masters
(LoRA runs count 2 forward-equivalents for the policy instead of 3: the frozen base's weight gradients are
never computed, so their MFU is not inflated by work they skip.)

`--workload pm64` draws every prompt and response length within +-64 of the given ones (uniform),
`--workload longtail` log-uniform from 32 to 1024 tokens each (sequences of 64 to 2048): variable-length
data, where TRL pads every batch to its longest sequence and `ours_packed` packs each micro-batch into one
row. Tokens per step are real tokens (padding never counts); each run reports its padding share.

A step is timed from a synchronised start to a synchronised end; the median over --steps steps after
--warmup steps is reported, with tokens/s (prompt + response tokens of both rows of every pair), MFU
against a bf16 matmul peak measured in the same invocation, peak memory, and the ratio to
trl_default. The precompute passes report pairs/s. TRL is optional (pip install trl==1.16.0); without
it the TRL runs are skipped and no ratio is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo_throughput import SHAPES, forward_flops_per_token, measure_bf16_peak, sync  # noqa: E402

RUNS = {
    "trl_default": dict(system="trl", precompute=False, gradient_checkpointing=True),
    "trl_precompute": dict(system="trl", precompute=True, gradient_checkpointing=True),
    "trl_no_checkpointing": dict(system="trl", precompute=False, gradient_checkpointing=False),
    "ours_precomputed": dict(system="ours", precision="bf16", reference="precomputed"),
    "ours_resident": dict(system="ours", precision="bf16", reference="resident"),
    "ours_swap": dict(system="ours", precision="bf16", reference="swap"),
    "ours_pure_bf16": dict(system="ours", precision="bf16_pure", reference="precomputed"),
    "ours_packed": dict(system="ours", precision="bf16", reference="precomputed", packing=True),
    "ours_checkpointed": dict(system="ours", precision="bf16", reference="precomputed", checkpointing=True),
    "ours_pure_bf16_checkpointed": dict(system="ours", precision="bf16_pure", reference="precomputed", checkpointing=True),
    "ours_checkpointed_half": dict(system="ours", precision="bf16", reference="precomputed", checkpointing=True,
                                   checkpoint_layers="half"),
    "ours_megatron": dict(system="ours", precision="bf16", reference="precomputed", engine="megatron"),
    "ours_micro4": dict(system="ours", precision="bf16", reference="precomputed", micro_pairs=4),
    "ours_micro2": dict(system="ours", precision="bf16", reference="precomputed", micro_pairs=2),
    "ours_readme": dict(system="ours", precision="bf16", reference="precomputed", prompt_len=512, response_len=512,
                        pairs=64, micro_pairs=8),
    "trl_lora": dict(system="trl", precompute=False, gradient_checkpointing=True, lora=True),
    "ours_lora": dict(system="ours", precision="bf16", reference="adapters_disabled", lora=True),
    "ours_lora_precomputed": dict(system="ours", precision="bf16", reference="precomputed", lora=True),
    "ours_simpo": dict(system="ours", precision="bf16", reference="auto", loss="simpo"),
    "ours_orpo": dict(system="ours", precision="bf16", reference="auto", loss="orpo"),
}
LORA_RANK, LORA_ALPHA = 16, 32.0  # on every linear layer but the LM head, in both systems
MAX_WORDS = 32000  # the synthetic tokenizer's words: "t0" ... "t31999", one token each


def vocab_words(shape: str) -> int:
    """Synthetic words of a shape: its vocabulary, less room for EOS and padding."""
    return min(MAX_WORDS, SHAPES[shape]["vocab_size"] - 2)


WORKLOADS = ("fixed", "pm64", "longtail")


def pair_lengths(workload: str, prompt_len: int, response_len: int, gen: torch.Generator) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) lengths of one pair: `fixed` as given; `pm64` each uniform within +-64 of
    it; `longtail` each log-uniform from 32 to 1024 (so a sequence has 64 to 2048 tokens)."""
    if workload == "fixed":
        return prompt_len, response_len, response_len
    if workload == "pm64":
        return tuple(int(torch.randint(n - 64, n + 65, (), generator=gen)) for n in (prompt_len, response_len, response_len))
    return tuple(int(32 * 32 ** torch.rand((), generator=gen)) for _ in range(3))


def synthetic_ids(words: int, pairs: int, prompt_len: int, response_len: int, seed: int,
                  workload: str = "fixed") -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids below `words`, lengths as `workload` draws them; the responses
    end with EOS (id `words`)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(pairs):
        lengths = pair_lengths(workload, prompt_len, response_len, gen)
        prompt, chosen, rejected = (torch.randint(0, words, (n,), generator=gen).tolist()
                                    for n in (lengths[0], lengths[1] - 1, lengths[2] - 1))
        out.append((prompt, chosen + [words], rejected + [words]))
    return out


def padding_share(examples: list[tuple[list[int], list[int], list[int]]], pairs: int, micro_pairs: int,
                  packing: bool) -> float:
    """The share of the tokens a step runs that are padding, over the dataset's consecutive batches of
    `pairs`: padded, every row of a micro-batch as long as its longest sequence; packed, each micro-batch's
    real tokens rounded up to a multiple of 8 (model.data.pad_to_multiple_of)."""
    real = run = 0
    for start in range(0, len(examples) - pairs + 1, micro_pairs):
        chunk = [len(p) + len(c) for p, c, _ in examples[start:start + micro_pairs]]
        chunk += [len(p) + len(r) for p, _, r in examples[start:start + micro_pairs]]
        real += sum(chunk)
        run += -(-sum(chunk) // 8) * 8 if packing else max(chunk) * len(chunk)
    return 1 - real / run


# ---------------------------------------------------------------------------------------------- TRL
def run_trl(spec: dict, args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    n_words = vocab_words(args.shape)
    vocab = {f"t{i}": i for i in range(n_words)} | {"</s>": n_words, "<pad>": n_words + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    examples = synthetic_ids(n_words, args.dataset_pairs, args.prompt_len, args.response_len, seed=0, workload=args.workload)
    dataset = Dataset.from_dict({"prompt": [words(p) for p, _, _ in examples],
                                 "chosen": [" " + words(c[:-1]) for _, c, _ in examples],  # TRL appends the EOS
                                 "rejected": [" " + words(r[:-1]) for _, _, r in examples]})
    shape = dict(SHAPES[args.shape])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(shape.pop("model_type"), **shape), dtype=torch.float32)

    precompute_times: list[tuple[int, float]] = []
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, data, name, batch_size):  # noqa: ANN001, ANN202
        sync()
        start = time.perf_counter()
        out = original(self, data, name, batch_size)
        sync()
        precompute_times.append((len(data), time.perf_counter() - start))
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):  # noqa: ANN001, ANN202
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):  # noqa: ANN001, ANN202
            sync()
            step_times.append(time.perf_counter() - self.start)

    config = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.pairs, gradient_accumulation_steps=1,
                       learning_rate=1e-6, beta=0.1, loss_type=["sigmoid"], max_length=None, bf16=True,
                       max_steps=args.warmup + args.steps, logging_steps=10_000, save_strategy="no", report_to=[],
                       precompute_ref_log_probs=spec["precompute"], gradient_checkpointing=spec["gradient_checkpointing"],
                       dataloader_num_workers=0, seed=0,
                       use_cpu=not torch.cuda.is_available())
    # TRL loads its reference from the policy's checkpoint path; a random model has none, so it gets a copy,
    # which is what that load gives; with peft its reference is the adapter-free model (no copy)
    ref_model = None if spec["precompute"] or spec.get("lora") else copy.deepcopy(model)
    peft_config = None
    if spec.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[StepTimer()], peft_config=peft_config)
    _reset_peak_memory()
    trainer.train()
    result = _step_summary(step_times[args.warmup:], args, examples, online_reference=not spec["precompute"],
                           lora=spec.get("lora", False))
    result["padding_share"] = padding_share(examples, args.pairs, args.pairs, packing=False)  # its batches: one padded block
    if precompute_times:
        pairs, seconds = precompute_times[0]
        result["precompute_pairs_per_s"] = pairs / seconds
    return result


# ---------------------------------------------------------------------------------------------- ours
class SyntheticPairs:
    """The synthetic pairs as a dataset our precompute pass and collate take."""

    def __init__(self, examples: list[tuple[list[int], list[int], list[int]]]) -> None:
        self.items = [{"prompt_ids": torch.tensor(p), "chosen_ids": torch.tensor(c), "rejected_ids": torch.tensor(r),
                       "chosen_reward": 1.0, "rejected_reward": 0.0} for p, c, r in examples]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return dict(self.items[index])

    def fingerprint(self) -> str:
        return f"synthetic-{len(self.items)}-{self.items[0]['prompt_ids'].numel()}"

    def attach_reference_logps(self, logps: torch.Tensor) -> None:
        for item, (chosen, rejected) in zip(self.items, logps.tolist()):
            item["chosen_ref_logps"], item["rejected_ref_logps"] = chosen, rejected


def run_ours(spec: dict, args: argparse.Namespace) -> dict:
    import functools

    from nemo_aligner.config.dpo import DPOLossConfig, DPOModelConfig
    from nemo_aligner.config.schema import (LoraTuningConfig, OptimConfig, PeftConfig, Precision,
                                            PretrainedCheckpointConfig, ReferenceConfig, ReferenceStrategy, TrainerConfig)
    from nemo_aligner.data.collate import pair_collate
    from nemo_aligner.models.nlp.gpt.gpt_dpo_model import GPTDPOModel
    from nemo_aligner.reference import NoReference, PrecomputedReference

    from nemo_aligner.config.dpo import PreferenceDataConfig

    micro = spec.get("micro_pairs", args.pairs)
    examples = synthetic_ids(vocab_words(args.shape), args.dataset_pairs, args.prompt_len, args.response_len, seed=0,
                             workload=args.workload)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in examples)
    cfg = DPOModelConfig(engine=spec.get("engine", "torch_native"), micro_batch_size=micro, global_batch_size=args.pairs,
                         encoder_seq_length=longest,
                         data=PreferenceDataConfig(packing=spec.get("packing", False)),
                         activations_checkpoint_granularity="full" if spec.get("checkpointing") else None,
                         activations_checkpoint_num_layers=(SHAPES[args.shape]["num_hidden_layers"] // 2
                                                            if spec.get("checkpoint_layers") == "half" else None),
                         optim=OptimConfig(lr=1e-6),
                         peft=(PeftConfig(peft_scheme="lora", lora_tuning=LoraTuningConfig(adapter_dim=LORA_RANK, alpha=LORA_ALPHA))
                               if spec.get("lora") else PeftConfig()),
                         dpo=DPOLossConfig(ref_policy_kl_penalty=0.1, preference_loss=spec.get("loss", "dpo"), log_prob_forward_micro_batch_size=args.ref_micro_pairs,
                                           reference=ReferenceConfig(strategy=ReferenceStrategy(spec["reference"]))))
    policy = GPTDPOModel(cfg, PretrainedCheckpointConfig(restore_from_path=None, model_config=SHAPES[args.shape],
                                                         tokenizer_path=args.tokenizer),
                         TrainerConfig(devices=1, precision=Precision(spec["precision"])))
    policy.setup_optimizer(max_steps=args.warmup + args.steps)
    data = SyntheticPairs(examples)
    collate = functools.partial(pair_collate, pad_token_id=policy.tokenizer.pad_token_id)
    result: dict = {"padding_share": padding_share(examples, args.pairs, micro, spec.get("packing", False))}
    if isinstance(policy.reference, PrecomputedReference):
        policy.reference.precompute_into(data, name="bench", cache_dir=tempfile.mkdtemp(), pairs_per_forward=args.ref_micro_pairs,
                                         collate=collate, score=policy.sequence_logps)  # compiles the scoring graphs
        sync()
        start = time.perf_counter()
        policy.reference.precompute_into(data, name="bench", cache_dir=tempfile.mkdtemp(), pairs_per_forward=args.ref_micro_pairs,
                                         collate=collate, score=policy.sequence_logps)
        sync()
        result["precompute_pairs_per_s"] = len(data) / (time.perf_counter() - start)
    _reset_peak_memory()
    result["memory_before_steps_gib"] = _allocated_gib()

    losses = []

    def step(index: int) -> None:
        metrics = policy.loss_and_metrics(collate([data[(index * args.pairs + i) % len(data)] for i in range(args.pairs)]),
                                          forward_only=False)
        policy.optimizer_step(1.0)
        losses.append(metrics["loss"])

    times = []
    for index in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        step(index)
        sync()
        times.append(time.perf_counter() - start)
    result.update(_step_summary(times[args.warmup:], args, examples, lora=spec.get("lora", False),
                                online_reference=not isinstance(policy.reference, (PrecomputedReference, NoReference))))
    result["memory_between_steps_gib"] = _allocated_gib()
    result["losses"] = losses  # the same data and initialisation in every run of ours: comparable across modes
    result["engine"] = policy.engine.describe()
    if args.profile:
        result["profile"] = profile_steps(step, os.path.join(args.profile, args.worker))
    return result


KERNEL_CLASSES = {"matmul": ("gemm", "nvjet", "cutlass", "cublas", "sm90_xmma", "sm100_xmma"),
                  "attention": ("flash", "fmha", "attention", "efficient"),
                  "communication": ("nccl",)}


def profile_steps(step, prefix: str, steps: int = 2) -> dict:  # noqa: ANN001
    """Profile `steps` more steps: the top kernels by device time to `prefix`_kernels.txt, and the device time
    by kernel class (matmul, attention, communication, other) and the host-side gap returned."""
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for index in range(steps):
            step(10_000 + index)
        sync()
    wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    with open(prefix + "_kernels.txt", "w") as f:
        f.write(events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90))
    device_us = {"matmul": 0.0, "attention": 0.0, "communication": 0.0, "other": 0.0}
    for event in events:
        if event.device_type.name != "CUDA" or event.self_device_time_total <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, marks in KERNEL_CLASSES.items() if any(m in name for m in marks)), "other")
        device_us[kind] += event.self_device_time_total
    busy = sum(device_us.values()) / 1e6 / steps
    return {"wall_s_per_step": wall, "device_busy_s_per_step": busy, "device_idle_share": 1 - busy / wall,
            "device_s_per_step_by_class": {k: v / 1e6 / steps for k, v in device_us.items()}}


def _allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


# ---------------------------------------------------------------------------------------------- both
def _step_summary(times: list[float], args: argparse.Namespace, examples: list[tuple[list[int], list[int], list[int]]],
                  *, online_reference: bool, lora: bool = False) -> dict:
    """Median step time; tokens and model FLOPs per step are the `examples`' means per pair x pairs per step
    (the real tokens of both sequences of a pair: padding is not counted). Forward-equivalents per step: the
    policy's forward and backward 3 (2 under LoRA: no weight gradients of the frozen base), an online
    reference 1."""
    step = statistics.median(times)
    sequences = [len(p) + len(r) for p, c, rj in examples for r in (c, rj)]
    tokens = args.pairs * sum(sequences) / len(examples)
    forward = sum(n * forward_flops_per_token(SHAPES[args.shape], n) for n in sequences) / len(examples) * args.pairs
    flops = ((2 if lora else 3) + online_reference) * forward
    return {"step_time_s": step, "step_times_s": times, "tokens_per_s": tokens / step, "model_tflops_per_step": flops / 1e12,
            "achieved_tflops": flops / step / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")}


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def worker(name: str, args: argparse.Namespace) -> None:
    spec = RUNS[name]
    for key in ("prompt_len", "response_len", "pairs"):
        if key in spec:
            setattr(args, key, spec[key])
    result = run_trl(spec, args) if spec["system"] == "trl" else run_ours(spec, args)
    result.update(run=name, workload=args.workload, prompt_len=args.prompt_len, response_len=args.response_len,
                  pairs=args.pairs)
    with open(args.worker_out, "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--workload", choices=WORKLOADS, default="fixed",
                        help="lengths: fixed; pm64: each within +-64 of the given; longtail: log-uniform 32..1024 each")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--ref-micro-pairs", type=int, default=16, help="pairs per forward of our reference pass")
    parser.add_argument("--dataset-pairs", type=int, default=256, help="pairs the precompute passes score")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    parser.add_argument("--tokenizer", default="examples/tiny/model", help="ours: only its pad/eos ids are used")
    parser.add_argument("--profile", default=None, help="ours: profile two more steps, kernel tables under this folder")
    parser.add_argument("--run-timeout", type=float, default=600, help="seconds one run may take")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload == "pm64" and min(args.prompt_len, args.response_len) <= 64:
        parser.error("--workload pm64 draws lengths within +-64: --prompt-len and --response-len must exceed 64")
    if args.worker:
        worker(args.worker, args)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
               "bf16_peak_tflops": measure_bf16_peak(device, n=8192 if device.type == "cuda" else 512) / 1e12}
    try:
        import trl

        results["trl"] = trl.__version__
    except ImportError:
        results["trl"] = None
    for name in args.runs.split(","):
        if RUNS[name]["system"] == "trl" and results["trl"] is None:
            continue
        out = tempfile.mktemp(suffix=".json")
        cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name, "--worker-out", out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            results[name] = {"error": f"timed out after {args.run_timeout} s"}
            print(f"{name}: timed out after {args.run_timeout} s", file=sys.stderr)
            continue
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr[-3000:]}
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        with open(out) as f:
            results[name] = json.load(f)
        results[name]["mfu"] = results[name]["achieved_tflops"] / results["bf16_peak_tflops"]
        print(f"{name}: {results[name]['step_time_s'] * 1e3:.0f} ms/step", file=sys.stderr, flush=True)
        if args.out:  # what finished survives a later run's crash
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    base = results.get("trl_default", {}).get("tokens_per_s")
    summary = {}
    for name in RUNS:
        run = results.get(name, {})
        if "tokens_per_s" in run:
            summary[name] = (f"{run['tokens_per_s'] / 1e3:.1f}k tok/s, {run['step_time_s'] * 1e3:.0f} ms/step, MFU "
                             f"{run['mfu']:.0%}, {run['peak_memory_gib']:.1f} GiB"
                             + (f", {run['tokens_per_s'] / base:.2f}x trl_default" if base and name != "ours_readme" else "")
                             + (f", precompute {run['precompute_pairs_per_s']:.0f} pairs/s" if "precompute_pairs_per_s" in run
                                else "") + f", padding {run['padding_share']:.1%}")
    results["summary"] = summary
    for name, line in summary.items():
        print(f"{name:18s} {line}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
