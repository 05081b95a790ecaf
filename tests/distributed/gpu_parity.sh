#!/usr/bin/env bash
# GPU layout parity: 1 GPU vs 2 GPUs (NCCL), DP=2 and TP=2, in fp32 and bf16, on the device machine.
#   bash tests/distributed/gpu_parity.sh OUTDIR     (needs 2 GPUs; hydra/omegaconf wheels in .whl/)
set -euo pipefail
out=${1:?output dir}
export PYTHONPATH=$PWD:$PWD/tests:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0), torch.cuda.device_count(), 'GPUs')"
work=$(mktemp -d)
python3 -c "from helpers import make_model_dir; make_model_dir('$work/llama', 'llama'); make_model_dir('$work/qwen2', 'qwen2')"
for precision in fp32 bf16; do
  run=$work/$precision; mkdir -p "$run"
  python3 -c "from helpers import write_pairs, write_sft; write_pairs('$run/pairs.jsonl', 16); write_sft('$run/sft.jsonl', 16)"
  args=(--model-dir "$work/llama" --qwen2-dir "$work/qwen2" --workdir "$run" --precision "$precision")
  torchrun --standalone --nproc_per_node 1 tests/distributed/layout_checks.py --phase single "${args[@]}" > "$out/$precision-single.log" 2>&1
  torchrun --standalone --nproc_per_node 2 tests/distributed/layout_checks.py --phase parallel "${args[@]}" > "$out/$precision-parallel.log" 2>&1
  torchrun --standalone --nproc_per_node 1 tests/distributed/layout_checks.py --phase resume1 "${args[@]}" > "$out/$precision-resume1.log" 2>&1
  echo "== $precision: 1 GPU vs 2 GPUs (NCCL)"
  python3 tests/distributed/compare_layouts.py "$run" | tee "$out/$precision-compare.txt"
done
