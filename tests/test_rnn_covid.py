"""Tests of rnn_covid.py outside its world-map section (that one: test_rnn_covid_map.py).

Unit tests on small hand-checked examples, every bad input through the real command line,
and the real script end to end on the assignment's CSV with tiny training budgets.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import rnn_covid as rc

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENT = ROOT / "data" / "covid_19.csv"
JHU = ROOT / "data" / "time_series_covid19_confirmed_global.csv"
needs_assignment = pytest.mark.skipif(not ASSIGNMENT.is_file(), reason="run `make data` first")
needs_jhu = pytest.mark.skipif(not JHU.is_file(), reason="run `make data` first")

# A tiny budget: every stage runs, nothing is trained for long.
TINY = ["--epochs", "3", "--seeds", "2", "--sweep-L", "3,10", "--sweep-seeds", "1"]


def run_script(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "rnn_covid.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def write_jhu_csv(path, rows, dates):
    header = ",".join(["Province/State", "Country/Region", "Lat", "Long", *dates])
    lines = [header] + [",".join([prov, country, "0", "0", *map(str, counts)]) for prov, country, counts in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label, expected", [
    ("1/22/20", "2020-01-22"), ("2002/1/20", "2020-02-01"), ("2002/12/20", "2020-02-12"),
    ("2004/12/20", "2020-04-12"), ("2/13/20", "2020-02-13"), ("3/9/23", "2023-03-09"),
])
def test_parse_date_label_plain_and_excel_garbled(label, expected):
    assert rc.parse_date_label(label) == pd.Timestamp(expected)


@pytest.mark.parametrize("label", ["Lat", "2020-01-22", "13/40/20", ""])
def test_parse_date_label_rejects_non_dates(label):
    with pytest.raises(rc.InputError):
        rc.parse_date_label(label)


@needs_assignment
def test_assignment_file_loads_with_real_dates():
    cum, layout = rc.load_cumulative(ASSIGNMENT)
    assert layout == "assignment"
    assert cum.shape == (185, 82)
    assert cum.columns[0] == pd.Timestamp("2020-01-22") and cum.columns[-1] == pd.Timestamp("2020-04-12")
    assert (np.diff(cum.columns.to_numpy()) == np.timedelta64(1, "D")).all()
    assert {"Korea South", "Taiwan*", "US", "Diamond Princess"} <= set(cum.index)
    assert cum.loc["Afghanistan"].iloc[-1] == 607


def test_province_rows_are_summed_per_country(tmp_path):
    dates = ["1/22/20", "1/23/20", "1/24/20"]
    path = write_jhu_csv(tmp_path / "jhu.csv", [
        ("North", "Xland", [1, 2, 4]), ("South", "Xland", [10, 10, 13]), ("", "Yland", [0, 5, 5]),
    ], dates)
    cum, layout = rc.load_cumulative(path)
    assert layout == "jhu"
    assert cum.index.tolist() == ["Xland", "Yland"]
    assert cum.loc["Xland"].tolist() == [11, 12, 17]
    d, negatives = rc.daily_differences(cum)
    assert d.loc["Xland"].tolist() == [1, 5] and d.loc["Yland"].tolist() == [5, 0]
    assert negatives == []


@needs_jhu
def test_full_jhu_series_sums_provinces():
    cum, layout = rc.load_cumulative(JHU)
    raw = pd.read_csv(JHU)
    assert layout == "jhu" and cum.shape == (201, 1143)
    assert cum.loc["Canada"].iloc[-1] == raw.loc[raw["Country/Region"] == "Canada"].iloc[:, -1].sum()


def test_negative_differences_are_clipped_and_counted():
    dates = pd.date_range("2020-01-01", periods=5)
    cum = pd.DataFrame([[0, 5, 3, 4, 10], [1, 1, 1, 1, 1]], index=["A", "B"], columns=dates)
    d, negatives = rc.daily_differences(cum)
    assert d.loc["A"].tolist() == [5, 0, 1, 6]
    assert negatives == [{"country": "A", "date": "2020-01-03", "value": -2.0}]
    d2, _ = rc.daily_differences(cum, start="2020-01-02", end="2020-01-04")
    assert d2.columns[0] == pd.Timestamp("2020-01-03") and d2.shape == (2, 2)


# --------------------------------------------------------------------------------------
# Correlation, windows, labels, splits
# --------------------------------------------------------------------------------------


def test_zero_variance_countries_are_excluded_and_threshold_checked():
    d = pd.DataFrame([[1, 2, 3, 4], [2, 4, 6, 9], [0, 0, 0, 0], [4, 1, 3, 1]], index=list("ABCD"))
    corr, zero_var = rc.correlations(d)
    assert zero_var == ["C"] and "C" not in corr.index
    assert rc.select_countries(corr, 0.9) == ["A", "B"]
    with pytest.raises(rc.InputError, match=r"largest correlation between two countries is 0\.99"):
        rc.select_countries(corr, 0.999)


def test_windows_and_labels_on_a_hand_checked_example():
    d = np.array([[0, 1, 3, 2, 2, 5]])
    windows = rc.make_windows(d, 2)
    assert windows[0].tolist() == [[0, 1], [1, 3], [3, 2], [2, 2]]
    # label day t = s + L: 3 > 1 rises, 2 < 3 falls, 2 == 2 is a tie (no rise), 5 > 2 rises
    assert rc.make_labels(d, 2, "rise")[0].tolist() == [True, False, False, True]
    assert rc.make_labels(d, 2, "cumulative")[0].tolist() == [True, True, True, True]


def test_window_normalisations():
    w = np.array([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    z = rc.normalise(w, "window", 1.0)
    assert np.allclose(z[0, 0], [-1.2247449, 0.0, 1.2247449]) and np.allclose(z[0, 1], 0.0)
    assert np.allclose(rc.normalise(w, "global", 5.0)[0, 0], [0.2, 0.4, 0.6])
    assert np.allclose(rc.normalise(w, "log", 5.0)[0, 1], 1.0)


def test_splits_have_disjoint_label_days_and_validation_precedes_test():
    masks = rc.split_masks(T=60, L=10, test_days=20, val_days=10)
    t = np.arange(10, 60)
    assert not (masks["train"] & masks["val"]).any() and not (masks["val"] & masks["test"]).any()
    assert not (masks["train"] & masks["test"]).any()
    assert (masks["train"] | masks["val"] | masks["test"]).all()
    assert t[masks["test"]].tolist() == list(range(40, 60))
    assert t[masks["val"]].tolist() == list(range(30, 40))
    assert t[masks["train"]].max() < t[masks["val"]].min()


@needs_assignment
def test_default_dataset_matches_the_assignment_numbers():
    args = rc.parse_args([])
    cum, _ = rc.load_cumulative(ASSIGNMENT)
    d, negatives = rc.daily_differences(cum)
    assert len(negatives) == 2  # Guyana and Uruguay
    corr, _ = rc.correlations(d)
    C = rc.select_countries(corr, 0.9)
    ds = rc.build_dataset(d, C, d.columns, 10, args)
    assert len(C) == 55
    assert len(ds["sets"]["test"][1]) == 1100 and len(ds["sets"]["val"][1]) == 550
    assert ds["sets"]["test"][0].shape == (1100, 10, 1)
    base = rc.evaluate_baselines(ds)
    assert base["anti-persistence"]["accuracy"] == pytest.approx(0.602, abs=0.001)


# --------------------------------------------------------------------------------------
# Baselines and metrics
# --------------------------------------------------------------------------------------


def test_naive_baselines_on_a_hand_checked_example():
    #            t: 0  1  2  3  4  5  6  7  8  9
    dC = np.array([[1, 2, 1, 3, 3, 0, 5, 6, 2, 4]])
    preds = rc.naive_predictions(dC, np.array([8, 9]), train_majority=False)
    # t=8: today (t-1=7) rose 5->6; t=9: today (t-1=8) fell 6->2
    assert preds["persistence"].tolist() == [[1, 0]]
    assert preds["anti-persistence"].tolist() == [[0, 1]]
    # weekly: t=8 repeats the step at t-7=1 (1->2 rose); t=9 the step at 2 (2->1 fell)
    assert preds["weekly persistence"].tolist() == [[1, 0]]
    assert preds["always rise"].tolist() == [[1, 1]] and preds["majority class"].tolist() == [[0, 0]]


def test_logistic_regression_baseline_learns_a_linear_rule():
    rng = np.random.default_rng(0)

    def split(n):
        X = rng.normal(size=(n, 3, 1)).astype(np.float32)
        return X, (X[:, -1, 0] > 0).astype(np.float32)

    dC = rng.integers(0, 10, size=(2, 40)).astype(float)
    ds = {"L": 3, "T": 40, "dC": dC, "sets": {"train": split(200), "val": split(10), "test": split(74)},
          "masks": rc.split_masks(40, 3, 37, 0)}
    base = rc.evaluate_baselines(ds)
    assert set(base) == {"majority class", "always rise", "persistence", "anti-persistence",
                         "weekly persistence", "logistic regression"}
    assert base["logistic regression"]["accuracy"] > 0.95
    assert all(set(m) == set(rc.METRIC_NAMES) for m in base.values())


def test_classification_metrics():
    m = rc.classification_metrics([1, 0, 1, 1], [0.9, 0.2, 0.4, 0.7])
    assert m == {"accuracy": 0.75, "balanced_accuracy": 0.833333, "roc_auc": 1.0, "f1_rise": 0.8}
    assert rc.classification_metrics([1, 1], [1, 0])["roc_auc"] is None


# --------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback, nothing written
# --------------------------------------------------------------------------------------


def assert_clean_failure(result, out, *phrases):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert not out.exists()


def test_missing_data_file(tmp_path):
    out = tmp_path / "out"
    r = run_script("--data", tmp_path / "nope.csv", "--out", out)
    assert_clean_failure(r, out, "nope.csv", "make data")


def test_unknown_csv_layout(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    out = tmp_path / "out"
    assert_clean_failure(run_script("--data", bad, "--out", out), out, "unknown CSV layout")


@needs_assignment
def test_non_numeric_counts(tmp_path):
    lines = ASSIGNMENT.read_text().splitlines()
    lines[3] = lines[3].replace(",0,0,", ",0,abc,", 1)  # Afghanistan, 1/23/20
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert_clean_failure(run_script("--data", bad, "--out", out), out, "non-numeric count 'abc'", "Afghanistan")


@needs_assignment
def test_too_few_days(tmp_path):
    out = tmp_path / "out"
    r = run_script("--end", "2020-03-01", "--out", out)
    assert_clean_failure(r, out, "too few", "needs L + test + validation + 1 = 41")


@needs_assignment
def test_threshold_leaving_fewer_than_two_countries(tmp_path):
    out = tmp_path / "out"
    r = run_script("--threshold", "0.99999", "--out", out)
    assert_clean_failure(r, out, "leaves", "largest correlation")


@needs_assignment
def test_cuda_requested_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    assert_clean_failure(run_script("--device", "cuda", "--out", out), out, "no CUDA device")


@pytest.mark.parametrize("args, phrase", [(["--L", "0"], "--L"), (["--model", "transformer"], "--model"),
                                          (["--sweep-L", "3,0"], "--sweep-L")])
def test_argparse_rejects_bad_L_and_unknown_model(tmp_path, args, phrase):
    out = tmp_path / "out"
    r = run_script(*args, "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr and phrase in r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------------------
# End to end on the real assignment CSV
# --------------------------------------------------------------------------------------


def check_outputs(out, model):
    for name in ("REPORT.md", "metrics.json", "corr_first10.png", "corr_C_clustered.png",
                 f"learning_curves_{model}.png", "L_sweep.png", "world_map.html", "world_probabilities.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    m = json.loads((out / "metrics.json").read_text())
    assert {"config", "data", "baselines", "models", "map", "timing"} <= set(m)
    assert m["data"]["C_size"] == 55 and m["data"]["splits"]["test"]["windows"] == 1100
    assert m["baselines"]["anti-persistence"]["accuracy"] == pytest.approx(0.601818)
    entries = [(r["model"], r["L"], r["seed"]) for r in m["models"]]
    assert sorted(entries) == sorted([(model, 10, 1), (model, 10, 2), (model, 3, 1)])
    for r in m["models"]:
        assert 0 <= r["test"]["accuracy"] <= 1 and set(r["test"]) == set(rc.METRIC_NAMES)
    assert m["selection"]["chosen_model"] == model
    assert m["map"]["countries_total"] == 185
    assert m["map"]["countries_mapped"] + len(m["map"]["excluded"]) == 185
    assert set(m["map"]["excluded"]) == {"Diamond Princess", "MS Zaandam"}
    report = (out / "REPORT.md").read_text()
    assert "Diamond Princess" in report and "anti-persistence" in report
    probs = pd.read_csv(out / "world_probabilities.csv")
    assert len(probs) == 185 and probs["p_rise"].between(0, 1).all()
    return m


@needs_assignment
@pytest.mark.parametrize("model", ["rnn", "lstm"])
def test_end_to_end_each_model(tmp_path, model):
    out = tmp_path / "out"
    r = run_script("--model", model, *TINY, "--out", out, env_extra={"BROWSER_PATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    m = check_outputs(out, model)
    assert m["map"]["png"] is None and m["map"]["png_skipped_reason"]


@needs_assignment
def test_end_to_end_gru_is_reproducible_on_cpu(tmp_path):
    out = tmp_path / "out"
    runs = []
    for _ in range(2):
        r = run_script("--model", "gru", *TINY, "--device", "cpu", "--out", out, env_extra={"BROWSER_PATH": ""})
        assert r.returncode == 0, r.stderr[-3000:]
        m = check_outputs(out, "gru")
        m.pop("timing")
        runs.append(m)
    assert runs[0] == runs[1]
