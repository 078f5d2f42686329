#!/usr/bin/env bash
# The CUDA / NCCL path, checked on a GPU machine: every registered algorithm trains a few steps with
# `--device cuda` (NCCL, one GPU per local rank) on 1 GPU and on 2 GPUs when there are two, then a
# heavier model (resnet20 on a small image folder it writes) for the gradient-compressing algorithms and
# bf16 / fp16 autocast, and once under torchrun. Writes one line per run to OUT/gpu_check.md (what ran,
# exit code, seconds, final test error) and each run's log beside it; exits 1 if any run failed.
#
#   benchmarks/gpu_check.sh [OUT] [--device cpu]    (cpu: the same runs on gloo, to check this script)
#
# Needs commsgd installed in the active Python. Takes about 3-5 minutes on one modern GPU.
set -u
out=${1:-gpu-check}
device=cuda
[ "${2:-}" = "--device" ] && device=${3:-cuda}
mkdir -p "$out"
report="$out/gpu_check.md"
failed=0

gpus=0
if [ "$device" = cuda ]; then
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  if [ "$gpus" -lt 1 ]; then
    echo "gpu_check: no CUDA device visible to torch; nothing ran" | tee "$report"
    exit 1
  fi
fi
widths="1"
{ [ "$device" = cpu ] || [ "$gpus" -ge 2 ]; } && widths="1 2"

{
  echo "# commsgd GPU check"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); device: $device"
  python -c "import torch, commsgd; print(f'- torch {torch.__version__}, CUDA {torch.version.cuda}, commsgd {commsgd.__version__}')"
  [ "$device" = cuda ] && python -c "import torch; print('- GPUs:', ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"
  [ "$device" = cuda ] && python -c "import torch.distributed as d; print('- NCCL available:', d.is_nccl_available())"
  echo
  echo "| run | exit | seconds | test error |"
  echo "|---|---|---|---|"
} > "$report"

# one training: NAME then `commsgd train` arguments
train() {
  local name=$1
  shift
  local start end code err
  start=$(date +%s.%N)
  "$@" > "$out/$name.log" 2>&1
  code=$?
  end=$(date +%s.%N)
  err=$(python -c "import json,sys; print(f\"{100 * json.load(open(sys.argv[1]))['test_error']:.2f} %\")" \
    "$out/runs/$name/summary.json" 2>/dev/null || echo "-")
  printf '| %s | %s | %.1f | %s |\n' "$name" "$code" "$(echo "$end - $start" | bc)" "$err" >> "$report"
  [ "$code" -eq 0 ] || failed=1
}

common=(--device "$device" --steps 30 progress=false eval_every=15 cluster.timeout_s=120)
algorithms=$(python -c "from commsgd.algorithms import algorithm_names; print(' '.join(algorithm_names()))")
for algo in $algorithms; do
  for w in $widths; do
    if [ "$algo" = sgd ] && [ "$w" -gt 1 ]; then continue; fi
    if [ "$algo" != sgd ] && [ "$w" -eq 1 ] && [ "$device" = cpu ]; then continue; fi
    if [ "$algo" = downpour ] && [ "$w" -gt 1 ] && [ "$device" = cuda ]; then
      echo "| $algo-$w | skipped: its parameter server runs on CPU with gloo (by design) | | |" >> "$report"
      continue
    fi
    train "$algo-$w" commsgd train --algorithm "$algo" --workers "$w" "${common[@]}" \
      --out "$out/runs/$algo-$w"
  done
done

# heavier: resnet20 on a small image folder written here (32x32 PNGs, 10 classes), through the same
# decode, cache and augmentation path as CIFAR-10; compressed gradients and mixed precision
w=${widths##* }
python - "$out/images" <<'PY'
import sys
from pathlib import Path

import numpy as np
from PIL import Image

rng = np.random.default_rng(0)
for split, count in (("train", 64), ("test", 16)):
    for c in range(10):
        folder = Path(sys.argv[1], split, f"class{c}")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(folder / f"{i}.png")
PY
images=(--model resnet20 --dataset imagefolder --data-dir "$out/images")
for algo in allreduce powersgd ef_sgd signum diloco; do
  train "$algo-resnet20-$w" commsgd train --algorithm "$algo" --workers "$w" "${images[@]}" \
    "${common[@]}" --out "$out/runs/$algo-resnet20-$w"
done
for precision in bf16 fp16; do
  train "allreduce-$precision-$w" commsgd train --algorithm allreduce --workers "$w" "${images[@]}" \
    "${common[@]}" precision=$precision --out "$out/runs/allreduce-$precision-$w"
done

# under torchrun: LOCAL_RANK picks the GPU
train "torchrun-lsgd-$w" python -m torch.distributed.run --standalone --nproc-per-node "$w" \
  -m commsgd train --algorithm lsgd "${common[@]}" --out "$out/runs/torchrun-lsgd-$w"

echo >> "$report"
[ "$failed" -eq 0 ] && echo "all runs passed" >> "$report" || echo "SOME RUNS FAILED: see the logs" >> "$report"
cat "$report"
exit "$failed"
