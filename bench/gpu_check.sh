#!/usr/bin/env bash
# On a CUDA machine: run both scripts' CUDA paths, time them, and write one results file.
#   bash bench/gpu_check.sh [RESULTS_FILE]    (default figures/gpu_check/results.md)
# Steps: a short smoke run of each script on CUDA, torchrun with NCCL over every GPU (skipped,
# with the reason, on fewer than 2), then the timed runs the README quotes: rnn_covid
# --preset report in full, vae_anime's default run without and with --amp.
# Each VAE run decodes the faces into its own output folder's cache (seconds, with every core);
# the table gives each run's wall time and its training time from metrics.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=figures/gpu_check
py=.venv/bin/python

timed() {  # timed NAME OUT_FOLDER COMMAND...: run, record wall and training time, keep the log
    local name=$1 folder=$2; shift 2
    local start end summary
    start=$(date +%s%N)
    if ! "$@" --out "$folder" >"$out_dir/$name.log" 2>&1; then
        echo "| $name | FAILED (see $out_dir/$name.log) | | |" >>"$results"; return 0
    fi
    end=$(date +%s%N)
    # A summary that fails is a failed row, not an empty cell.
    summary=$("$py" bench/gpu_summary.py "$folder/metrics.json" 2>&1) || summary="summary FAILED: $summary"
    printf '| %s | %d s | %s |\n' "$name" $(( (end - start) / 1000000000 )) "$summary" >>"$results"
}

torchrun_row() {  # torchrun_row GPU_COUNT: DDP over NCCL needs a process group of 2 or more
    local gpus=$1
    if (( gpus < 2 )); then
        echo "| vae_torchrun_nccl | skipped: $gpus GPU; a world size of 1 starts no process group, so neither NCCL nor DDP would run | | |" >>"$results"
        return 0
    fi
    timed vae_torchrun_nccl "$out_dir/vae_torchrun" "$py" -m torch.distributed.run --standalone \
        --nproc_per_node="$gpus" vae_anime.py --device cuda --kl-weights 1 --epochs 1
}

main() {
    results=${1:-$out_dir/results.md}
    mkdir -p "$out_dir" "$(dirname "$results")"
    if [[ ! -x $py || ! -d data/anime_faces ]]; then make venv data >/dev/null; fi
    if ! "$py" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
        echo "no CUDA device visible to torch $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)'); nvidia-smi says:" >&2
        nvidia-smi >&2 || echo "(nvidia-smi not found: no NVIDIA driver)" >&2
        exit 1
    fi
    {
        echo "# GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        "$py" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'- device: {torch.cuda.device_count()} × {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}')"
        echo "- CPU cores: $(nproc)"
        echo
        echo "| run | wall time | training time | result |"
        echo "|---|---|---|---|"
    } >"$results"
    local vae=(vae_anime.py --device cuda)
    timed rnn_smoke "$out_dir/rnn_smoke" "$py" rnn_covid.py --device cuda --seeds 1 --sweep-L "" --steps 5
    timed vae_smoke "$out_dir/vae_smoke" "$py" "${vae[@]}" --kl-weights 1 --epochs 1 --amp off
    timed vae_smoke_amp "$out_dir/vae_smoke_amp" "$py" "${vae[@]}" --kl-weights 1 --epochs 1 --amp on
    torchrun_row "$("$py" -c 'import torch; print(torch.cuda.device_count())')"
    timed rnn_report_preset "$out_dir/rnn_report" "$py" rnn_covid.py --device cuda --preset report
    timed vae_default "$out_dir/vae_default" "$py" "${vae[@]}" --amp off
    timed vae_default_amp "$out_dir/vae_default_amp" "$py" "${vae[@]}" --amp on
    cat "$results"
}

# Sourced (by the tests), it only defines the functions above.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
