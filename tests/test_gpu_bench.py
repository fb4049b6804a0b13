"""bench/gpu_check.sh's row logic and bench/gpu_summary.py, on the CPU: the GPU check itself
needs CUDA, but which rows it runs, skips or marks as failed does not."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu_summary  # noqa: E402


def rows_after(tmp_path, script):
    """Source gpu_check.sh (which then only defines its functions), run SCRIPT, return the rows."""
    results = tmp_path / "results.md"
    code = (f"set -euo pipefail; source bench/gpu_check.sh; results={results}; "
            f"out_dir={tmp_path}; {script}")
    subprocess.run(["bash", "-c", code], cwd=ROOT, check=True, timeout=60)
    return results.read_text(encoding="utf-8").splitlines()


@pytest.mark.parametrize("gpus", [0, 1])
def test_torchrun_row_is_skipped_with_its_reason_below_two_gpus(tmp_path, gpus):
    (row,) = rows_after(tmp_path, f"torchrun_row {gpus}")
    assert row.startswith("| vae_torchrun_nccl | skipped:")
    assert "world size of 1" in row and f"{gpus} GPU" in row


def test_torchrun_row_runs_one_process_per_gpu(tmp_path):
    # `timed` replaced by an echo: the row's command line is what is checked, not CUDA.
    (row,) = rows_after(tmp_path, 'timed() { echo "ran $*" >>"$results"; }; torchrun_row 4')
    assert "--nproc_per_node=4" in row and "--device cuda" in row and "--kl-weights 1" in row


def test_a_failing_run_and_a_failing_summary_are_marked_not_left_empty(tmp_path):
    rows = rows_after(tmp_path, f"timed broken {tmp_path}/a false; "
                                f"timed no_metrics {tmp_path}/b true")
    assert rows[0].startswith("| broken | FAILED")
    assert rows[1].startswith("| no_metrics |") and "summary FAILED" in rows[1]


def test_summary_of_a_one_seed_rnn_run_says_so_instead_of_a_std(tmp_path):
    # gpu_check.sh's rnn rows train one seed: no standard deviation exists.
    subprocess.run([sys.executable, "rnn_covid.py", "--model", "lstm", "--steps", "3",
                    "--seeds", "1", "--sweep-L", "", "--jobs", "1", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    metrics = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    train, result = gpu_summary.rnn_cells(metrics)
    assert train.endswith("s (1 worker(s))")
    assert result.startswith("lstm test accuracy") and "(1 seed)" in result and "±" not in result
    assert result.endswith(metrics["evaluation"]["gaps"]["lstm"][metrics["evaluation"]["naive"]]
                           ["accuracy"]["claim"])


def test_mean_std_shows_the_spread_of_several_seeds():
    assert gpu_summary.mean_std({"mean": 0.8123, "std": 0.0041}) == "0.812 ± 0.004"
