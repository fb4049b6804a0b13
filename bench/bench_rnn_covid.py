"""Wall time of rnn_covid.py: trainings in parallel, the report preset, cost against data size.

    python bench/bench_rnn_covid.py              # default run with --jobs 1 and with the default --jobs
    python bench/bench_rnn_covid.py --report     # + the report preset, extrapolated from a few steps
    python bench/bench_rnn_covid.py --scaling    # + the default run on the JHU first year and full series
    python bench/bench_rnn_covid.py --origins    # + the cost of the backtest against its origins

Every run is the real script in a subprocess, all in this one invocation, so their ratios are
measured under the same machine load (the 1-minute load average is printed before and after
each: on a shared machine, read the times with it). The report preset takes most of an hour on
a 2-core CPU; --report runs `--report-steps` steps per model and extrapolates linearly to the
preset's 1000/500/500 (a full-batch step costs the same throughout), which the output says.
Results: printed, and written as JSON to --out.
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

JHU = ["--data", "data/time_series_covid19_confirmed_global.csv", "--threshold", "0.7"]
SCALING = {"assignment file": [], "JHU first year": [*JHU, "--start", "2020-03-01", "--end", "2021-02-28"],
           "JHU full series": JHU}
# Backtest cost: no L sweep, so that the origins' trainings are most of the run.
ORIGINS = {"assignment file": ([], (0, 1, 3, 5)),
           "JHU full series, 28-day blocks": ([*JHU, "--L", "14", "--min-mean", "1",
                                                "--origin-every", "28"], (0, 6))}


def timed_run(args, out):
    """Wall time, load before and after, and metrics.json of one run of the script."""
    cmd = [sys.executable, str(ROOT / "rnn_covid.py"), "--out", str(out), *args]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, BROWSER_PATH=""))
    wall = time.perf_counter() - start
    m = json.loads((out / "metrics.json").read_text())
    ev = m["evaluation"]
    v = ev["gaps"][ev["chosen"]][ev["naive"]]["accuracy"]
    return {"args": args, "wall_s": round(wall, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2), "jobs": m["timing"]["workers"],
            "train_windows": m["data"]["splits"]["train"]["windows"], "chosen": ev["chosen"],
            "test_accuracy": next(s for s in ev["summary"] if s["model"] == ev["chosen"]),
            "verdict": {"baseline": ev["naive"], **v},
            "runs_s": [{"model": t["model"], "s": t["seconds"]} for t in m["models"]],
            "train_s": m["timing"]["train_s"]}


def show(name, r):
    print(f"{name}: {r['wall_s']:.0f} s ({r['jobs']} worker(s), {r['train_windows']} training windows, "
          f"load {r['load_before']} -> {r['load_after']}); {r['chosen'].upper()} test accuracy "
          f"{r['test_accuracy']['accuracy']:.3f}, gap to {r['verdict']['baseline']} {r['verdict']['gap']:+.3f} "
          f"[{r['verdict']['ci95'][0]:+.3f}, {r['verdict']['ci95'][1]:+.3f}] ({r['verdict']['claim']})", flush=True)


def makespan(durations, workers):
    """Wall time of independent trainings on `workers` processes, longest first (as the script)."""
    free = [0.0] * workers
    for d in sorted(durations, reverse=True):
        free[free.index(min(free))] += d
    return max(free)


def report_estimate(tmp, steps):
    """The report preset run for `steps` steps per model, extrapolated to its full budget."""
    r = timed_run(["--preset", "report", "--steps", str(steps)], Path(tmp) / "report")
    per_step = {run["model"]: run["s"] / steps for run in r["runs_s"]}
    full = dict(rnn_covid.PRESETS["report"].steps)
    overhead = r["wall_s"] - makespan([run["s"] for run in r["runs_s"]], r["jobs"])
    estimate = overhead + makespan([per_step[c] * full[c] for c in per_step], r["jobs"])
    print(f"report preset: about {estimate:.0f} s with --jobs {r['jobs']}, extrapolated from {steps} steps per model "
          f"(per step: {', '.join(f'{c} {v:.2f} s' for c, v in per_step.items())})", flush=True)
    return {"steps_run": steps, "wall_s_measured": r["wall_s"], "wall_s_estimate": round(estimate, 1),
            "per_step_s": {c: round(v, 3) for c, v in per_step.items()}}


def origins_cost(tmp):
    """Wall time against the number of backtest origins, per data set: the slope is one
    origin's cost (its 3 models x seeds trainings), the intercept the rest of the run."""
    result = {}
    for name, (extra, counts) in ORIGINS.items():
        runs = {n: timed_run([*extra, "--sweep-L", "", "--origins", str(n)], Path(tmp) / "o")
                for n in counts}
        slope = (runs[counts[-1]]["wall_s"] - runs[0]["wall_s"]) / counts[-1]
        print(f"{name}: " + ", ".join(f"{n} origins {r['wall_s']:.0f} s" for n, r in runs.items())
              + f"; {slope:.1f} s per origin", flush=True)
        result[name] = {"wall_s": {n: r["wall_s"] for n, r in runs.items()},
                        "s_per_origin": round(slope, 1)}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", action="store_true", help="also estimate the report preset's time")
    p.add_argument("--report-steps", type=int, default=20, help="steps per model when extrapolating")
    p.add_argument("--scaling", action="store_true", help="also time the default run on the JHU series")
    p.add_argument("--origins", action="store_true", help="also time the backtest's origins")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "bench" / "rnn_covid.json")
    args = p.parse_args()
    result = {"cpus": os.cpu_count(), "default_jobs": rnn_covid.DEFAULT.jobs}
    with tempfile.TemporaryDirectory() as tmp:
        result["jobs_1"] = timed_run(["--jobs", "1"], Path(tmp) / "jobs1")
        show("default run, --jobs 1", result["jobs_1"])
        result["jobs_default"] = timed_run([], Path(tmp) / "jobs")
        show(f"default run, --jobs {rnn_covid.DEFAULT.jobs} (the default)", result["jobs_default"])
        result["speedup"] = round(result["jobs_1"]["wall_s"] / result["jobs_default"]["wall_s"], 2)
        print(f"speed-up of --jobs {rnn_covid.DEFAULT.jobs} over --jobs 1: {result['speedup']}x", flush=True)
        if args.report:
            result["report"] = report_estimate(tmp, args.report_steps)
        if args.scaling:
            result["scaling"] = {"assignment file": result["jobs_default"]}
            for name, extra in list(SCALING.items())[1:]:
                result["scaling"][name] = timed_run(extra, Path(tmp) / name.replace(" ", "_"))
                show(name, result["scaling"][name])
        if args.origins:
            result["origins"] = origins_cost(tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rnn_covid.write_text_atomically(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
