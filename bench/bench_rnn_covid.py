"""Wall time of rnn_covid.py: the default run (`make run`) and the `--preset report` run.

    python bench/bench_rnn_covid.py                 # default run + report preset, extrapolated
    python bench/bench_rnn_covid.py --full-report   # default run + the whole report preset

Both are timed in this one invocation, so their ratio is measured under the same machine
load (printed, with the 1-minute load average before and after). The report preset takes
most of an hour on a 2-core CPU; by default it runs `--report-epochs` epochs per model and
extrapolates linearly to the preset's 1000/500/500 epochs (per-epoch cost is constant in
full-batch training), which the output says plainly. Results: printed, and written to
--out as JSON.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import rnn_covid  # noqa: E402  (after the path set-up above)


def timed_run(args, out):
    cmd = [sys.executable, str(ROOT / "rnn_covid.py"), "--out", str(out), *args]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "metrics.json").read_text())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full-report", action="store_true", help="run the whole report preset")
    p.add_argument("--report-epochs", type=int, default=20, help="epochs per model when extrapolating")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "bench" / "rnn_covid.json")
    args = p.parse_args()

    result = {"cpus": os.cpu_count(), "load_avg_1min_before": round(os.getloadavg()[0], 2)}
    with tempfile.TemporaryDirectory() as tmp:
        wall, m = timed_run([], Path(tmp) / "default")
        chosen = m["selection"]["chosen_model"]
        result["default"] = {"wall_s": round(wall, 1), "timing": {k: v for k, v in m["timing"].items()
                                                                  if k != "runs_s"},
                             "chosen": chosen, "test_accuracy": m["summary"][f"{chosen}@L10"]["accuracy"]}
        full_epochs = dict(rnn_covid.PRESETS["report"].epochs)
        if args.full_report:
            wall, m = timed_run(["--preset", "report"], Path(tmp) / "report")
            result["report"] = {"wall_s": round(wall, 1), "extrapolated": False, "timing": m["timing"],
                                "test_accuracy": {k: v["accuracy"]["mean"] for k, v in m["summary"].items()},
                                "chosen": m["selection"]["chosen_model"]}
        else:
            n = args.report_epochs
            wall, m = timed_run(["--preset", "report", "--epochs", str(n)], Path(tmp) / "report")
            train = {k.split("@")[0]: v for k, v in m["timing"]["runs_s"].items()}
            per_epoch = {c: train[c] / n for c in train}
            overhead = wall - sum(train.values())
            estimate = overhead + sum(per_epoch[c] * full_epochs[c] for c in per_epoch)
            result["report"] = {"extrapolated": True, "epochs_run": n, "wall_s_measured": round(wall, 1),
                                "per_epoch_s": {c: round(v, 3) for c, v in per_epoch.items()},
                                "wall_s": round(estimate, 1)}
    result["load_avg_1min_after"] = round(os.getloadavg()[0], 2)
    result["report_over_default"] = round(result["report"]["wall_s"] / result["default"]["wall_s"], 1)

    d, r = result["default"], result["report"]
    print(f"machine: {result['cpus']} CPUs, load average {result['load_avg_1min_before']} before, "
          f"{result['load_avg_1min_after']} after")
    print(f"default run (3 models x 3 seeds + L sweep): {d['wall_s']:.0f} s; chosen {d['chosen']}, "
          f"test accuracy {d['test_accuracy']['mean']:.3f} ± {d['test_accuracy']['std']:.3f}")
    how = (f"extrapolated from {r['epochs_run']} epochs per model "
           f"(per epoch: {', '.join(f'{c} {v:.2f} s' for c, v in r['per_epoch_s'].items())})"
           if r["extrapolated"] else "measured")
    print(f"report preset (1 seed per model, no sweep): {r['wall_s']:.0f} s, {how}")
    if not r["extrapolated"]:
        print(f"report preset test accuracy (1 seed): {r['test_accuracy']}; chosen {r['chosen']}")
    print(f"report / default: {result['report_over_default']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rnn_covid.write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
