#!/usr/bin/env bash
# Everything this repository checks on a GPU, in one go, most important first: the precision benchmark at
# BLOOM-1b7's shape, train.py end to end at that shape (random weights) in bf16 and in fp16 + GradScaler (the T4
# path), a DDP run under torchrun (NCCL), then the loss, output-layer + loss and LoRA benchmarks, and ours packed
# against alpaca-lora's recipe (bench_vs_hf_trainer.py --packing --device cuda).
#
#   bash bench/gpu_checks.sh RESULTS_DIR [SECONDS]   # SECONDS: the whole run's budget (default 3600)
#
# Each step is cut at its own limit and at what is left of the budget (20 s are kept to finish), and the run goes
# on past a failed step. A step's output goes to its own log, appended to RESULTS_DIR/log.txt when it ends; only
# its last lines are printed, then one summary line per step (also in RESULTS_DIR/summary.txt). The benchmarks
# write their tables into RESULTS_DIR as soon as their timing is done; the training runs leave their metrics there.
# PYTHON names the interpreter (default: python).
set -u
out=${1:?usage: bash bench/gpu_checks.sh RESULTS_DIR [SECONDS]}
budget=${2:-3600}
py=${PYTHON:-python}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() {  # step NAME LIMIT_SECONDS 'COMMAND'
    local name=$1 limit=$2 left=$(( budget - SECONDS - 20 ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "$name: not run (budget spent)" | tee -a "$out/summary.txt"; return; fi
    echo "=== $name (limit ${limit}s): $3" | tee -a "$out/log.txt"
    local start=$SECONDS
    timeout --kill-after=5 "$limit" bash -c "$3" > "$work/step.log" 2>&1
    local rc=$?
    tr '\r' '\n' < "$work/step.log" >> "$out/log.txt"
    tr '\r' '\n' < "$work/step.log" | grep -v '^\s*$' | tail -n 12
    echo "$name: exit $rc in $(( SECONDS - start ))s" | tee -a "$out/summary.txt"
}

# A short DEBUG run of train.py at BLOOM-1b7's shape (random weights), its metrics kept: train_run NAME ENV...
train_run() {
    echo "env DEBUG=true MODEL_PATH=$work/bloom-1b7-random OUTPUT_DIR=$work/$1 MAX_STEPS=8 EVAL_FREQ=0" \
         "SIZE_VALID_SET=64 ${*:2} $py train.py && cp $work/$1/metrics.jsonl $out/metrics-$1.jsonl"
}

step environment 60 "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader && $py -c \
'import torch, transformers, datasets; print(\"torch\", torch.__version__, \"transformers\", transformers.__version__,
\"datasets\", datasets.__version__, \"bf16\", torch.cuda.is_bf16_supported(including_emulation=False))'"
# Memory processes at once: one per 16 GiB of the GPU (a float32 copy of BLOOM-1b7 is 6.9 GB, and its step's
# activations come on top), 1 to 4, so that a 16 GB T4 runs them one by one.
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
memory_jobs=$(( ${gpu_mib:-0} / 1024 / 16 ))
(( memory_jobs < 1 )) && memory_jobs=1
(( memory_jobs > 4 )) && memory_jobs=4
step precision-bench 240 "$py bench/bench_precision.py --device cuda --real-shape --memory-jobs $memory_jobs \
    --out $out/precision.md"
step random-bloom-1b7 60 "$py bench/make_random_bloom.py --out $work/bloom-1b7-random"
step train-bf16 90 "$(train_run bf16 MIX_PREC_TRAIN=true)"
step train-fp16 90 "$(train_run fp16 PRECISION=fp16)"
step ddp-tiny-fp16 60 "DEBUG=true DDP=true PRECISION=fp16 MODEL_PATH=models/tiny-bloom MAX_STEPS=10 \
    OUTPUT_DIR=$work/ddp $py -m torch.distributed.run --standalone --nproc_per_node=$(nvidia-smi -L | wc -l) train.py"
step loss-bench 60 "$py bench/bench_loss.py --device cuda --seq 512 --memory-jobs 3 --out $out/loss.md"
step head-loss-bench 60 "$py bench/bench_head_loss.py --device cuda --hidden 2048 --seq 512 --out $out/head_loss.md"
step lora-bench 60 "$py bench/bench_lora.py --device cuda --out $out/lora.md"
# Packing's headline on a GPU: ours packed vs the recipe with and without length grouping, one epoch each, bf16
# where the card has it natively, else fp16.
step vs-hf-trainer-packing 300 "$py bench/bench_vs_hf_trainer.py --packing --device cuda --repeats 1 \
    --out $out/vs_hf_trainer_packing_cuda.md"
echo "=== summary"
cat "$out/summary.txt"
