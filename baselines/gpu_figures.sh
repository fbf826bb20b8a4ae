#!/usr/bin/env bash
# Every GPU figure the README still lacks, in one run (for a session that is lent a GPU for a short
# time): transformers / transformers + peft baselines first, then komt on the same shapes. Each command
# has its own time limit so that one slow step cannot eat the rest; results go to stdout and to
# ${OUT:-.}/gpu_figures.txt. transformers and peft must be importable (a throwaway venv, or an image
# that has them); without them the baseline lines say so and komt's figures are still taken.
#
#   baselines/gpu_figures.sh                    # everything (~25 min at most)
#   baselines/gpu_figures.sh baselines decode   # only some groups: baselines, decode, train, kernels
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-.}/gpu_figures.txt"
run() {  # run LIMIT_SECONDS TITLE COMMAND...
    local limit=$1 title=$2; shift 2
    echo "=== $title ($(date -u +%FT%TZ))" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | grep -v "^W[0-9]" | tail -n 25 | tee -a "$log"
    echo "=== rc ${PIPESTATUS[0]}" | tee -a "$log"
}
groups="${*:-baselines decode train kernels}"
want() { [[ " $groups " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
want baselines && run 240 "baseline: transformers generate, 7B shape, bf16" python baselines/gpu_generate_transformers.py
want baselines && run 240 "baseline: transformers + peft LoRA step, 7B shape, bf16, seq 1024" python baselines/gpu_train_transformers_peft.py
want decode && run 300 "komt decode, 7B shape, bf16, Triton kernels, CUDA graphs" \
    python -m komt.generate.bench --preset komt-mistral-7b --device cuda --dtype bf16 --kernels triton \
    --cuda-graphs --prompt-len 128 --new-tokens 256 --check
want decode && run 300 "komt decode, 7B shape, bf16, torch kernels, CUDA graphs" \
    python -m komt.generate.bench --preset komt-mistral-7b --device cuda --dtype bf16 --kernels torch \
    --cuda-graphs --prompt-len 128 --new-tokens 256
want train && run 240 "komt LoRA step, 7B shape, bf16, seq 1024" \
    python -m komt.train.bench --preset komt-mistral-7b --seq-len 1024 --device cuda
want kernels && run 240 "kernels: decode attention over long caches" python -m kernels.bench --kernel decode --quick
want kernels && run 240 "kernels: attention forward + backward" python -m kernels.bench --kernel backward --quick
want kernels && run 300 "kernels: CUDA tests" python -m pytest -q -m cuda tests/
