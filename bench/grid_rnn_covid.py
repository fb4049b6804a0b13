"""The validation grid behind rnn_covid.py's default settings: every choice made on validation.

    python bench/grid_rnn_covid.py                  # assignment file: --min-mean, then model settings
    python bench/grid_rnn_covid.py --jhu            # full JHU series (--threshold 0.7): large-data values

Each grid point is one real run of rnn_covid.py (no L sweep, the rest as the default preset
unless the point says otherwise); the score of a point is the mean validation accuracy of the
three models (mean over seeds), so one lucky architecture does not decide. Test accuracy is
recorded beside it for the record only; nothing is chosen on it. The grid is small on purpose
(2-core machine): first --min-mean at the starting model settings, then hidden size x
learning rate x weight decay at the best --min-mean (assignment file); on the full JHU series
the step budget x weight decay that the default preset uses above 2,048 training windows, then
window length, then --min-mean. Writes docs/rnn_covid_grid.md (or docs/rnn_covid_grid_jhu.md)
atomically, with the command line, the machine load and the choice. The recorded grids also hold
points of switches that lost there and are gone from the script (--train-on all,
--features context); docs/rnn_covid.md says so.
"""
import argparse
import itertools
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


def score(args, tmp):
    """One grid point: validation (and, for the record, test) accuracy per model."""
    out = Path(tmp) / "run"
    cmd = [sys.executable, str(ROOT / "rnn_covid.py"), "--sweep-L", "", "--origins", "0",
           "--out", str(out), *args]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, BROWSER_PATH=""))
    m = json.loads((out / "metrics.json").read_text())
    val = m["evaluation"]["val_accuracy"]
    test = {s["model"]: s["accuracy"] for s in m["evaluation"]["summary"]}
    return {"args": args, "val": val, "val_mean": round(sum(val.values()) / len(val), 4),
            "test": test, "seconds": round(time.perf_counter() - start, 1),
            "naive_val": max(v["accuracy"] for k, v in m["evaluation"]["baselines_val"].items()
                             if not rnn_covid.BASELINES[k].learned)}


def best(points):
    """Highest mean validation accuracy; ties (to 4 digits) go to the earlier, i.e. default, point."""
    return max(points, key=lambda p: (p["val_mean"], -points.index(p)))


# The model settings the grid starts from (the defaults before it was run), given explicitly
# so that a rerun measures the same points whatever the defaults are now.
START = ["--hidden", "64", "--lr", "0.01", "--weight-decay", "1e-4"]


def assignment_grid(tmp, log_point):
    stage1 = [log_point(score(["--min-mean", v, *START], tmp)) for v in ("1", "0", "5", "20")]
    min_mean = best(stage1)["args"][1]
    stage2 = []
    for hidden, lr, wd in itertools.product(("64", "32", "16"), ("0.01", "0.003"), ("1e-4", "1e-3")):
        args = ["--min-mean", min_mean, "--hidden", hidden, "--lr", lr, "--weight-decay", wd]
        same = next((p for p in stage1 if p["args"] == args), None)  # the starting settings: run
        stage2.append(same or log_point(score(args, tmp)))
    return [("--min-mean at the starting model settings (hidden 64, lr 0.01, weight decay 1e-4)", stage1),
            (f"model settings at --min-mean {min_mean}", stage2)]


def jhu_grid(tmp, log_point):
    # The first stage chose rnn_covid.AUTO["large"], the values used above 2,048 training windows;
    # it starts from the small-data values, which the assignment file's grid chose.
    stage1 = [log_point(score([*JHU, "--steps", steps, "--weight-decay", wd], tmp))
              for steps, wd in itertools.product(("150", "300"), ("1e-3", "1e-4"))]
    chosen = best(stage1)
    stage2 = [chosen, log_point(score([*chosen["args"], "--L", "14"], tmp))]
    chosen = best(stage2)
    # --min-mean was chosen on the assignment file's few windows; this series may want another.
    stage3 = [chosen, log_point(score([*chosen["args"], "--min-mean", "1"], tmp))]
    return [("step budget and weight decay, full JHU series, --threshold 0.7, L = 10", stage1),
            ("window length at the chosen budget", stage2),
            ("--min-mean at the chosen settings", stage3)]


def markdown(sections, argv, load_before, load_after):
    lines = ["# Validation grid of rnn_covid.py", "",
             f"Written by `{' '.join(['python bench/grid_rnn_covid.py', *argv])}` on "
             f"{time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs, load average {load_before} before, "
             f"{load_after} after). Score: mean validation accuracy of RNN, LSTM and GRU (3 seeds "
             "each). Test accuracy is shown for the record only; no choice uses it.", ""]
    for title, points in sections:
        chosen = best(points)
        lines += [f"## {title}", "", "| flags | val. RNN / LSTM / GRU | val. mean | strongest naive (val.) "
                  "| test RNN / LSTM / GRU (not used) | s |", "|---|---|---|---|---|---|"]
        for p in points:
            flags = " ".join(a for a in p["args"] if a not in JHU) or "(default)"
            mark = " **← chosen**" if p is chosen else ""
            lines.append(f"| `{flags}`{mark} | " + " / ".join(f"{v:.3f}" for v in p["val"].values())
                         + f" | {p['val_mean']:.4f} | {p['naive_val']:.3f} | "
                         + " / ".join(f"{v:.3f}" for v in p["test"].values()) + f" | {p['seconds']:.0f} |")
        lines += [""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jhu", action="store_true", help="grid on the full JHU series instead")
    args = p.parse_args()
    load_before = round(os.getloadavg()[0], 2)

    def log_point(point):
        print(f"{' '.join(point['args']):60s} val mean {point['val_mean']:.4f}  ({point['seconds']:.0f} s)",
              flush=True)
        return point

    with tempfile.TemporaryDirectory() as tmp:
        sections = (jhu_grid if args.jhu else assignment_grid)(tmp, log_point)
    text = markdown(sections, sys.argv[1:], load_before, round(os.getloadavg()[0], 2))
    target = ROOT / "docs" / ("rnn_covid_grid_jhu.md" if args.jhu else "rnn_covid_grid.md")
    rnn_covid.write_text_atomically(target, text + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
