#!/usr/bin/env bash
# Everything this repository checks on a GPU, in one go, most important first: the precision benchmark at
# BLOOM-1b7's shape, train.py end to end at that shape (random weights) in bf16 and in fp16 + GradScaler (the T4
# path), a DDP run under torchrun (NCCL), then the loss and LoRA benchmarks. Each step gets a time limit and the
# run goes on past a failed step; a summary of each step's exit status comes last.
#
#   bash bench/gpu_checks.sh RESULTS_DIR [SECONDS]   # SECONDS: the whole run's budget (default 3600)
#
# RESULTS_DIR receives log.txt (everything printed), the benchmarks' tables and the training runs' metrics.
set -u
out=${1:?usage: bash bench/gpu_checks.sh RESULTS_DIR [SECONDS]}
deadline=$(( SECONDS + ${2:-3600} ))
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)
summary=()

step() {  # step NAME LIMIT_SECONDS 'COMMAND': run it within its limit and what is left of the budget
    local name=$1 limit=$2 left=$(( deadline - SECONDS ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then summary+=("$name: not run (budget spent)"); return; fi
    echo "=== $name (limit ${limit}s): $3"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" bash -c "$3"
    local rc=$?
    summary+=("$name: exit $rc in $(( SECONDS - start ))s")
}

# A short DEBUG run of train.py at BLOOM-1b7's shape (random weights), its metrics kept: train_run NAME ENV...
train_run() {
    echo "env DEBUG=true MODEL_PATH=$work/bloom-1b7-random OUTPUT_DIR=$work/$1 MAX_STEPS=8 EVAL_FREQ=0" \
         "SIZE_VALID_SET=64 ${*:2} python train.py && cp $work/$1/metrics.jsonl $out/metrics-$1.jsonl"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__,
'| cuda', torch.version.cuda, '| bf16', torch.cuda.is_bf16_supported(including_emulation=False))"

step precision-bench 300 "python bench/bench_precision.py --device cuda --real-shape --out $out/precision.md"
step random-bloom-1b7 60 "python bench/make_random_bloom.py --out $work/bloom-1b7-random"
step train-bf16 90 "$(train_run bf16 MIX_PREC_TRAIN=true)"
step train-fp16 90 "$(train_run fp16 PRECISION=fp16)"
step ddp-tiny-fp16 90 "DEBUG=true DDP=true PRECISION=fp16 MODEL_PATH=models/tiny-bloom MAX_STEPS=10 \
    OUTPUT_DIR=$work/ddp torchrun --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) train.py"
step loss-bench 90 "python bench/bench_loss.py --device cuda --seq 512 --out $out/loss.md"
step lora-bench 90 "python bench/bench_lora.py --device cuda --out $out/lora.md"

rm -rf "$work"
echo "=== summary"
printf '%s\n' "${summary[@]}"
