"""Checkpoint I/O of the torch_native engine: loading an HF directory, saving checkpoints, exporting.

    python benchmarks/checkpoint_io.py --processes 2 --shape llama-3.1-8b --workdir /tmp/ckpt_io --out FILE

Each phase is its own torchrun launch of --processes processes (so each process's peak host memory, read
from the kernel's maxrss, belongs to that phase alone):

  load_parallel  the engine's load: every rank reads only its own part of the safetensors files (DCP's
                 Hugging Face storage reader), nothing is broadcast
  load_rank0     the path it replaced (still the fallback for directories whose names are not the model's):
                 rank 0 reads the whole model through transformers and broadcasts it piece by piece
  save           after one training step (so Adam's moments exist): a synchronous torch_dist save; two
                 asynchronous ones, the second reusing the host buffers the first allocated (each: the
                 stall, how long the step waits before training goes on; then a training step while the
                 write runs; then the wait for the write); a safetensors-format save; the HF export (each
                 rank writes its pieces, consolidated file by file). Each result is kept as it comes, so
                 a phase stopped by --timeout still reports what it measured.

A random model of --shape is written once to <workdir>/model in bf16 (on the GPU where there is one).
Each phase reports seconds and each rank's peak resident host memory (GiB) with the baseline before the
model was built.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo_throughput import SHAPES, sync  # noqa: E402

PHASES = ("load_parallel", "load_rank0", "save")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def write_random_model(shape: str, path: str, tokenizer: str) -> None:
    """A randomly initialised model of `shape` as an HF directory in bf16 (safetensors, sharded as transformers
    shards), with `tokenizer`'s files (only their pad/eos ids matter here)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(path, "config.json")):
        return
    kwargs = dict(SHAPES[shape])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path + ".tmp", max_shard_size="5GB")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)


def build(model_dir: str, precision: str):  # noqa: ANN201
    from nemo_aligner.config.schema import ModelConfig, OptimConfig, Precision, PretrainedCheckpointConfig, TrainerConfig
    from nemo_aligner.models.nlp.gpt.gpt_model import GPTModel

    cfg = ModelConfig(micro_batch_size=1, global_batch_size=int(os.environ["WORLD_SIZE"]), encoder_seq_length=256,
                      optim=OptimConfig(lr=1e-6))
    return GPTModel(cfg, PretrainedCheckpointConfig(restore_from_path=model_dir),
                    TrainerConfig(devices=int(os.environ["WORLD_SIZE"]), precision=Precision(precision)))


def timed_load(phase: str, model_dir: str, precision: str) -> tuple[object, float]:
    """The model built from `model_dir`, and the seconds its weights took to load (by `phase`'s path)."""
    from nemo_aligner.engines.torch_native import engine, hf_load

    if phase == "load_rank0":
        hf_load.stored_tensor_names = lambda path: None  # what a directory of other names gets: rank 0 + broadcast
    seconds = []
    load = engine.load_hf_weights
    engine.load_hf_weights = lambda module, path: seconds.append(timed(lambda: load(module, path)))
    return build(model_dir, precision), seconds[0]


def one_step(model) -> float:  # noqa: ANN001
    from nemo_aligner.losses.sft import sft_loss_fn

    vocab = model.engine.hf_config.vocab_size
    gen = torch.Generator().manual_seed(dist.get_rank())
    ids = torch.randint(0, vocab, (1, 256), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones(1, 256)}
    loss_fn = functools.partial(sft_loss_fn, global_num_tokens=torch.tensor(255.0 * dist.get_world_size()))
    return timed(lambda: (model.forward_backward(batch, loss_fn), model.optimizer_step(1.0)))


def timed(fn) -> float:  # noqa: ANN001
    """Seconds `fn()` takes on every rank: from a synchronised start to the last rank's synchronised end."""
    sync()
    dist.barrier()
    start = time.perf_counter()
    fn()
    sync()
    dist.barrier()
    return time.perf_counter() - start


def phase_main(args: argparse.Namespace) -> None:
    from nemo_aligner.utils.distributed import init_distributed

    init_distributed()
    baseline = peak_rss_gib()
    model_dir = os.path.join(args.workdir, "model")
    out: dict = {"phase": args.phase, "world": dist.get_world_size()}
    model, out["load_s"] = timed_load(args.phase, model_dir, args.precision)
    out["engine"] = model.engine.describe()
    if args.phase == "save":
        model.setup_optimizer(max_steps=10)
        one_step(model)
        out["step_s"] = one_step(model)
        root = os.path.join(args.workdir, "saves")
        saves = args.saves.split(",")

        def done_with(name: str) -> None:  # one save on disk at a time: an 8B checkpoint is ~100 GB
            if name == "sync":
                out["checkpoint_gib"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, name))
                                            for f in fs) / 2**30
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                record(args, out)  # a phase cut short by its timeout keeps what it measured
            dist.barrier()

        if "sync" in saves:
            out["sync_save_s"] = timed(lambda: model.save(os.path.join(root, "sync")))
            done_with("sync")
        if "async" in saves:  # twice: the first save also allocates (pins) the host buffers the second reuses
            for label in ("", "_again"):
                sync()
                dist.barrier()
                start = time.perf_counter()
                pending = model.save(os.path.join(root, "async"), asynchronous=True)
                out[f"async_save_stall{label}_s"] = time.perf_counter() - start
                out[f"step_during_async_write{label}_s"] = one_step(model)
                pending.result()
                dist.barrier()
                out[f"async_save_total{label}_s"] = time.perf_counter() - start
                done_with("async")
        if "safetensors" in saves:
            out["safetensors_save_s"] = timed(lambda: model.save(os.path.join(root, "safetensors"), weights_format="safetensors"))
            done_with("safetensors")
        if "export" in saves:
            out["hf_export_s"] = timed(lambda: model.export_hf(os.path.join(root, "hf")))
            done_with("hf")
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, {"baseline_rss_gib": baseline, "peak_rss_gib": peak_rss_gib()})
    out["host_memory_per_rank"] = per_rank
    if dist.get_rank() == 0:
        record(args, out)
    dist.destroy_process_group()


def record(args: argparse.Namespace, out: dict) -> None:
    """The phase's results so far, where the launching process reads them."""
    with open(os.path.join(args.workdir, f"{args.phase}.json"), "w") as f:
        json.dump(out, f, indent=2)


def partial_results(workdir: str, phase: str) -> dict:
    """What a phase recorded before it was stopped ({} if nothing)."""
    path = os.path.join(workdir, f"{phase}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--processes", type=int, default=1, help="torchrun processes per phase")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--saves", default="sync,async,safetensors,export", help="save phase: which writes to time")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--tokenizer", default="examples/tiny/model")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a phase may take")
    parser.add_argument("--out", default=None)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase_main(args)
        return
    os.makedirs(args.workdir, exist_ok=True)
    start = time.perf_counter()
    write_random_model(args.shape, os.path.join(args.workdir, "model"), args.tokenizer)
    results: dict = {"shape": args.shape, "processes": args.processes, "precision": args.precision, "torch": torch.__version__,
                     "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "model_write_s": time.perf_counter() - start}
    for phase in args.phases.split(","):
        stale = os.path.join(args.workdir, f"{phase}.json")
        if os.path.exists(stale):
            os.remove(stale)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.processes}", __file__,
               *sys.argv[1:], "--phase", phase]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            results[phase] = {**partial_results(args.workdir, phase), "error": f"timed out after {args.timeout} s"}
            print(json.dumps({phase: results[phase]}), flush=True)
            continue
        if proc.returncode != 0:
            results[phase] = {"error": proc.stderr[-3000:]}
            print(f"{phase}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        with open(os.path.join(args.workdir, f"{phase}.json")) as f:
            results[phase] = json.load(f)
        print(json.dumps({phase: {k: v for k, v in results[phase].items() if k != "engine"}}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
