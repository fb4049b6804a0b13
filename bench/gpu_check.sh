#!/usr/bin/env bash
# On a CUDA machine: run both scripts' CUDA paths, time them, and write one results file.
#   bash bench/gpu_check.sh [RESULTS_FILE]    (default figures/gpu_check/results.md)
# Steps: a short smoke run of each script on CUDA, then the timed runs the README quotes:
# rnn_covid --preset report in full, vae_anime's default run without and with --amp.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=figures/gpu_check
results=${1:-$out_dir/results.md}
mkdir -p "$out_dir" "$(dirname "$results")"
make venv data >/dev/null
py=.venv/bin/python
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run this on a GPU machine')"

timed() {  # timed NAME OUT_FOLDER COMMAND...: run, record wall time, keep the log
    local name=$1 folder=$2; shift 2
    local start end
    start=$(date +%s%N)
    "$@" --out "$folder" >"$out_dir/$name.log" 2>&1 || { echo "| $name | FAILED (see $out_dir/$name.log) | |" >>"$results"; return 0; }
    end=$(date +%s%N)
    printf '| %s | %d s | %s |\n' "$name" $(( (end - start) / 1000000000 )) "$("$py" bench/gpu_summary.py "$folder/metrics.json")" >>"$results"
}

{
    echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo
    "$py" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'- device: {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')"
    echo "- CPU cores: $(nproc)"
    echo
    echo "| run | wall time | result |"
    echo "|---|---|---|"
} >"$results"

timed rnn_smoke "$out_dir/rnn_smoke" "$py" rnn_covid.py --device cuda --seeds 1 --sweep-L "" --steps 5
timed vae_smoke "$out_dir/vae_smoke" "$py" vae_anime.py --device cuda --kl-weights 1 --epochs 1 --amp off
timed vae_smoke_amp "$out_dir/vae_smoke_amp" "$py" vae_anime.py --device cuda --kl-weights 1 --epochs 1 --amp on
# DistributedDataParallel with NCCL: one process per GPU.
timed vae_torchrun_nccl "$out_dir/vae_torchrun" "$py" -m torch.distributed.run --standalone \
    --nproc_per_node="$("$py" -c 'import torch; print(torch.cuda.device_count())')" \
    vae_anime.py --device cuda --kl-weights 1 --epochs 1
timed rnn_report_preset "$out_dir/rnn_report" "$py" rnn_covid.py --device cuda --preset report
timed vae_default "$out_dir/vae_default" "$py" vae_anime.py --device cuda --amp off
timed vae_default_amp "$out_dir/vae_default_amp" "$py" vae_anime.py --device cuda --amp on
cat "$results"
