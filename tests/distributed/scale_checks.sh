#!/usr/bin/env bash
# Scale validation on one node: data-parallel scaling of the DPO step, layouts against one process, resume
# across world sizes, and a Llama-3.1-8B-shaped DPO step. GPUS is 8 or 4 (2 runs the part that fits).
#   bash tests/distributed/scale_checks.sh OUTDIR [GPUS]
set -uo pipefail
out=${1:?output dir}
gpus=${2:-$(nvidia-smi -L | wc -l)}
export PYTHONPATH=$PWD:$PWD/tests:$PWD/tests/distributed:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
mkdir -p "$out"
work=$(mktemp -d)
python3 -c "from helpers import make_model_dir, write_pairs; make_model_dir('$work/llama', 'llama'); write_pairs('$work/pairs.jsonl', 96)"

# 1. data-parallel scaling: the 0.5B shape, 8 pairs of 256 + 256 tokens per GPU, micro-batches of 8
for n in 1 2 4 8; do
  (( n <= gpus )) || break
  torchrun --standalone --nproc_per_node "$n" benchmarks/dpo_throughput.py --seq-len 512 --global-pairs $((8 * n)) \
    --micro-pairs 8 --steps 8 --warmup 3 --out "$out/dpo_scaling_qwen2.5-0.5b_${n}gpu.json" > "$out/scaling_${n}gpu.log" 2>&1
  echo "scaling ${n} GPU(s): rc=$? $(grep tokens_per_s "$out/scaling_${n}gpu.log")"
done

# 2-3. every layout the node allows against one process (10 DPO steps, every metric), and the DP=GPUS
# checkpoint resumed at GPUS/2 and at 1 process
for precision in fp32 bf16; do
  args=(--workdir "$work" --precision "$precision")
  torchrun --standalone --nproc_per_node 1 tests/distributed/scale_checks.py --phase reference "${args[@]}" > "$out/reference_$precision.log" 2>&1
  torchrun --standalone --nproc_per_node "$gpus" tests/distributed/scale_checks.py --phase layouts "${args[@]}" > "$out/layouts_$precision.log" 2>&1
  echo "layouts $precision at $gpus: rc=$?"
  for m in $((gpus / 2)) 1; do
    torchrun --standalone --nproc_per_node "$m" tests/distributed/scale_checks.py --phase resume --saved-at "$gpus" "${args[@]}" \
      > "$out/resume_${precision}_at$m.log" 2>&1
    echo "resume $precision $gpus -> $m: rc=$?"
  done
done
python3 tests/distributed/scale_checks.py --phase compare --workdir "$work" | tee "$out/scale_checks_${gpus}gpu.json"

# 4. a Llama-3.1-8B-shaped random model, FSDP over every GPU: DPO tokens/s, MFU, peak memory per GPU
torchrun --standalone --nproc_per_node "$gpus" benchmarks/dpo_throughput.py --shape llama-3.1-8b --seq-len 2048 \
  --global-pairs $((2 * gpus)) --micro-pairs 1 --ref-micro-pairs 1 --steps 4 --warmup 2 \
  --out "$out/dpo_throughput_llama-3.1-8b_${gpus}gpu.json" > "$out/llama8b.log" 2>&1
echo "8B: rc=$? $(grep 'tokens_per_s\|mfu\|peak_memory' "$out/llama8b.log" | tr '\n' ' ')"
