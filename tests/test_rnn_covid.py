"""Tests of rnn_covid.py outside its world-map section (that one: test_rnn_covid_map.py),
in pipeline order: config, loading, correlations and C, windows and labels, training,
baselines and metrics, report, bad input, the whole script end to end.

Unit tests on small hand-checked examples; the rest runs the real functions or the real
script (subprocess) on the assignment's CSV with tiny training budgets. No mocks.
"""
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import rnn_covid as rc

ROOT = Path(__file__).resolve().parent.parent
ASSIGNMENT = ROOT / "data" / "covid_19.csv"
JHU = ROOT / "data" / "time_series_covid19_confirmed_global.csv"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require(path):
    """Skip without the prepared data (`make data`); with CI=true its absence is a failure."""
    if not path.is_file():
        if IN_CI:
            pytest.fail(f"{path} missing with CI=true: run `make data`")
        pytest.skip(f"{path} missing: run `make data`")


@pytest.fixture
def assignment_file():
    require(ASSIGNMENT)


@pytest.fixture
def jhu_file():
    require(JHU)


needs_assignment = pytest.mark.usefixtures("assignment_file")
needs_jhu = pytest.mark.usefixtures("jhu_file")
ANTI = 0.62284  # anti-persistence's test accuracy on the assignment file (L = 10, C of 81)

# A tiny budget: every stage runs, nothing is trained for long.
TINY = ["--steps", "3", "--seeds", "2", "--sweep-L", "3,10", "--sweep-seeds", "1"]


def run_script(*args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "rnn_covid.py"), *map(str, args)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


def write_jhu_csv(path, rows, dates):
    header = ",".join(["Province/State", "Country/Region", "Lat", "Long", *dates])
    lines = [header] + [",".join([prov, country, "0", "0", *map(str, counts)])
                        for prov, country, counts in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def assignment_data(cfg):
    cum, _ = rc.load_cumulative(ASSIGNMENT)
    d, _ = rc.daily_differences(cum)
    _, _, C = rc.countries_of_C(rc.training_days(d, cfg.test_days, cfg.val_days), cfg.threshold)
    return d, C


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def test_config_is_the_preset_with_the_given_flags_replaced():
    cfg = rc.build_config(["--hidden", "8", "--model", "gru", "--steps", "5", "--seeds", "2"])
    assert cfg.hidden == 8 and cfg.models == ("gru",) and dict(cfg.steps)["lstm"] == 5
    assert cfg.sweep_seeds == 2  # follows --seeds unless given
    assert cfg.lr == rc.DEFAULT.lr and cfg.L == 10
    report = rc.build_config(["--preset", "report", "--lr", "0.5"])
    assert (report.layers, report.hidden, report.lr) == (2, 510, 0.5)
    assert dict(report.steps)["rnn"] == 1000
    assert report.early_stop is False and report.sweep_L == ()
    assert rc.build_config(["--model", "all", "--sweep-L", ""]).models == rc.MODELS
    assert rc.build_config(["--sweep-L", ""]).sweep_L == ()


def test_every_flag_has_help_naming_its_default_and_the_report_preset_value():
    parser = rc.make_parser()
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert set(helps) == {f.name for f in dataclasses.fields(rc.Config)}
    for name, text in helps.items():
        assert "default preset:" in text, name
    for name in ("layers", "hidden", "lr", "weight_decay", "steps", "early_stop", "seeds",
                 "sweep_L"):
        assert "report preset:" in helps[name], name
    assert "report preset: 510" in helps["hidden"]


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
    with pytest.raises(rc.UserError):
        rc.parse_date_label(label)


@needs_assignment
def test_assignment_file_loads_with_real_dates():
    cum, layout = rc.load_cumulative(ASSIGNMENT)
    assert layout == "assignment"
    assert cum.shape == (185, 82)
    assert cum.columns[0] == pd.Timestamp("2020-01-22")
    assert cum.columns[-1] == pd.Timestamp("2020-04-12")
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
    canada = raw.loc[raw["Country/Region"] == "Canada"]
    assert cum.loc["Canada"].iloc[-1] == canada.iloc[:, -1].sum()


def test_negative_differences_are_clipped_and_counted():
    dates = pd.date_range("2020-01-01", periods=5)
    cum = pd.DataFrame([[0, 5, 3, 4, 10], [1, 1, 1, 1, 1]], index=["A", "B"], columns=dates)
    d, negatives = rc.daily_differences(cum)
    assert d.loc["A"].tolist() == [5, 0, 1, 6]
    assert negatives == [{"country": "A", "date": "2020-01-03", "value": -2.0}]
    d2, _ = rc.daily_differences(cum, start="2020-01-02", end="2020-01-04")
    assert d2.columns[0] == pd.Timestamp("2020-01-03") and d2.shape == (2, 2)


# --------------------------------------------------------------------------------------
# Correlations and C
# --------------------------------------------------------------------------------------


def test_zero_variance_countries_are_excluded_and_threshold_checked():
    d = pd.DataFrame([[1, 2, 3, 4], [2, 4, 6, 9], [0, 0, 0, 0], [4, 1, 3, 1]], index=list("ABCD"))
    corr, zero_var, C = rc.countries_of_C(d, 0.9)
    assert zero_var == ["C"] and "C" not in corr.index and C == ["A", "B"]
    with pytest.raises(rc.UserError, match=r"largest correlation between two countries is 0\.99"):
        rc.countries_of_C(d, 0.999)


# --------------------------------------------------------------------------------------
# Windows, labels and splits
# --------------------------------------------------------------------------------------


def test_windows_and_labels_on_a_hand_checked_example():
    d = np.array([[0, 1, 3, 2, 2, 5]])
    windows = rc.make_windows(d, 2)
    assert windows[0].tolist() == [[0, 1], [1, 3], [3, 2], [2, 2]]
    # label day t = s + L: 3 > 1 rises, 2 < 3 falls, 2 == 2 is a tie (no rise), 5 > 2 rises
    assert rc.make_labels(d, 2)[0].tolist() == [True, False, False, True]


def test_each_window_is_standardised_on_its_own():
    x = rc.model_inputs(np.array([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0], [100.0, 200.0, 300.0]]]))
    assert x.shape == (1, 3, 3, 1) and x.dtype == np.float32
    assert np.allclose(x[0, 0, :, 0], [-1.2247449, 0.0, 1.2247449]) and np.allclose(x[0, 1], 0.0)
    assert np.allclose(x[0, 2], x[0, 0])  # the scale of a country's epidemic is not an input


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
    cfg = rc.build_config([])
    d, C = assignment_data(cfg)
    ds = rc.build_dataset(d, C, 10, cfg)
    assert len(C) == 81  # C from the 51 days up to the last training label day
    assert len(ds.sets["test"][1]) == 1620 and len(ds.sets["val"][1]) == 810
    assert ds.sets["test"][0].shape == (1620, 10, 1)
    assert len(ds.sets["train"][1]) == 87 and ds.dropped == 3234  # --min-mean 20 keeps 87 of 3,321
    assert rc.evaluate_baselines(ds)["anti-persistence"].accuracy == pytest.approx(ANTI)


def test_C_is_computed_from_the_training_days_alone():
    # Country B follows A on the training days only; on the 3 later days it runs against it.
    # C from all days would lose both; from the training days it holds both.
    d = pd.DataFrame([[1, 2, 3, 4, 5, 6, 9, 1, 9], [2, 4, 6, 8, 10, 12, 1, 9, 1],
                      [5, 1, 4, 1, 5, 9, 2, 6, 5]], index=list("ABZ"))
    train = rc.training_days(d, test_days=2, val_days=1)
    assert train.shape[1] == 6 and rc.countries_of_C(train, 0.9)[2] == ["A", "B"]
    with pytest.raises(rc.UserError):
        rc.countries_of_C(d, 0.9)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def train(cell, ds, cfg, seed=1):
    plan = rc.optimisation_for(len(ds.sets["train"][1]), cell, cfg)
    return rc.train_model(cell, ds, cfg, seed, torch.device("cpu"), plan)


@needs_assignment
def test_early_stopping_keeps_the_step_of_lowest_validation_loss():
    cfg = rc.build_config(["--steps", "12", "--hidden", "16", "--lr", "0.05"])
    d, C = assignment_data(cfg)
    ds = rc.build_dataset(d, C, 10, cfg)
    model, curves, kept = train("gru", ds, cfg)
    val_loss = curves["val_loss"]
    assert kept == int(np.argmin(val_loss)) + 1 and kept < len(val_loss)  # not the last step
    X, y = (torch.as_tensor(a) for a in ds.sets["val"])
    assert float(rc.loss_and_accuracy(model, X, y)[0]) == pytest.approx(min(val_loss), abs=1e-6)


@needs_assignment
def test_without_early_stopping_the_last_step_is_kept():
    cfg = rc.build_config(["--steps", "4", "--hidden", "8", "--no-early-stop"])
    d, C = assignment_data(cfg)
    model, curves, kept = train("rnn", rc.build_dataset(d, C, 10, cfg), cfg)
    assert kept == 4 and len(curves["val_loss"]) == 4


def test_large_training_sets_get_mini_batches_more_steps_and_less_weight_decay():
    cfg = rc.build_config([])
    small, edge, large = (rc.optimisation_for(n, "gru", cfg) for n in (94, 2048, 69519))
    assert small == rc.Optimisation(batch=94, steps=150, weight_decay=1e-3) and edge.batch == 2048
    assert large == rc.Optimisation(batch=512, steps=300, weight_decay=1e-4)
    given = rc.build_config(["--batch-size", "64", "--steps", "20", "--weight-decay", "0"])
    assert rc.optimisation_for(69519, "rnn", given) == rc.Optimisation(64, 20, 0.0)
    assert rc.optimisation_for(30, "rnn", given).batch == 30
    report = rc.build_config(["--preset", "report"])
    assert rc.optimisation_for(69519, "lstm", report) == rc.Optimisation(512, 500, 0.0)
    assert rc.evaluation_steps(94, 94, 4) == [1, 2, 3, 4]  # full batch: every step
    assert rc.evaluation_steps(69519, 512, 25) == [10, 20, 25]  # mini-batches: every 10 steps
    assert rc.evaluation_steps(3000, 512, 14) == [6, 12, 14]  # or every pass, if sooner


def training(model, seed, val, test, L=10):
    """A Training record with the given validation and test accuracies."""
    scores = {"val": rc.Scores(val, val, val, val), "test": rc.Scores(test, test, None, test)}
    return rc.Training(model, L, seed, 1, None, scores, 0.0, {}, {})


@needs_assignment
def test_model_is_chosen_on_validation_not_test_and_a_near_tie_is_called_one():
    cfg = rc.build_config(["--seeds", "2"])
    ds = rc.build_dataset(*assignment_data(cfg), 10, cfg)  # 810 validation windows
    runs = {("rnn", 10, 1): (0.70, 0.55), ("rnn", 10, 2): (0.68, 0.56),
            ("gru", 10, 1): (0.66, 0.65), ("gru", 10, 2): (0.67, 0.66),
            ("lstm", 10, 1): (0.60, 0.70), ("lstm", 10, 2): (0.61, 0.71)}
    trained = {k: training(k[0], k[2], v, t) for k, (v, t) in runs.items()}
    chosen, tie, naive, _, val_accuracy = rc.choose(trained, ds, cfg)
    assert (chosen, tie) == ("rnn", False) and val_accuracy["rnn"] == pytest.approx(0.69)
    assert naive == "anti-persistence"
    trained[("gru", 10, 2)] = training("gru", 2, 0.7192, 0.66)  # gru 0.6896: 0.0004 behind
    assert rc.choose(trained, ds, cfg)[:2] == ("rnn", True)


# --------------------------------------------------------------------------------------
# Baselines and metrics
# --------------------------------------------------------------------------------------


def hand_dataset(dC, label_days, train_y=(0.0, 0.0, 1.0)):
    """A Dataset whose test split has exactly the given label days of dC."""
    T, L = dC.shape[1], 2
    t = np.arange(L, T)
    masks = {"train": ~np.isin(t, label_days), "val": np.zeros(len(t), bool),
             "test": np.isin(t, label_days)}
    n = dC.shape[0] * len(label_days)
    sets = {"train": (np.zeros((3, L, 1), np.float32), np.array(train_y, np.float32)),
            "val": (np.zeros((0, L, 1), np.float32), np.zeros(0, np.float32)),
            "test": (np.zeros((n, L, 1), np.float32), np.zeros(n, np.float32))}
    return rc.Dataset(L=L, sets=sets, masks=masks, dC=dC, dropped=0, latest=None)


def synthetic_cases(days=60, countries=12, seed=0):
    """Daily cases of countries that share one epidemic curve, each with its own noise."""
    rng = np.random.default_rng(seed)
    wave = 50 + 40 * np.sin(np.arange(days) / 6)
    return pd.DataFrame(np.round(wave * rng.uniform(0.5, 2, (countries, 1))
                                 + rng.normal(0, 8, (countries, days))).clip(0),
                        index=[f"c{i}" for i in range(countries)],
                        columns=pd.date_range("2021-01-01", periods=days))


def test_an_origin_never_sees_its_own_test_days():
    cfg = rc.build_config(["--origins", "3", "--origin-every", "7", "--val-days", "5", "--L", "5",
                           "--min-mean", "0", "--threshold", "0.5"])
    d = synthetic_cases()
    before = rc.backtest_datasets(d, cfg)
    assert list(before) == ["2021-02-09", "2021-02-16", "2021-02-23"]
    corrupted = d.copy()
    corrupted.iloc[:, -7:] = np.random.default_rng(1).integers(0, 500, (len(d), 7))  # last block
    after = rc.backtest_datasets(corrupted, cfg)
    for origin, ds in before.items():
        other = after[origin]
        assert list(other.dC.shape) == list(ds.dC.shape)  # the same C
        for split in ("train", "val"):
            for a, b in zip(ds.sets[split], other.sets[split]):
                assert np.array_equal(a, b), (origin, split)
        naive = [{n: rc.classification_metrics(x.sets["val"][1], b.predict(x, "val")).accuracy
                  for n, b in rc.BASELINES.items()} for x in (ds, other)]
        assert naive[0] == naive[1]  # the baseline chosen on validation is chosen again
    assert not np.array_equal(before["2021-02-23"].sets["test"][1],
                              after["2021-02-23"].sets["test"][1])  # only the test block moved


def test_naive_baselines_on_a_hand_checked_example():
    #            t: 0  1  2  3  4  5  6  7  8  9
    ds = hand_dataset(np.array([[1, 2, 1, 3, 3, 0, 5, 6, 2, 4]]), [8, 9])
    # t=8: today (t-1=7) rose 5->6; t=9: today (t-1=8) fell 6->2
    assert rc.BASELINES["persistence"].predict(ds, "test").tolist() == [1, 0]
    assert rc.BASELINES["anti-persistence"].predict(ds, "test").tolist() == [0, 1]
    # weekly: t=8 repeats the step at t-7=1 (1->2 rose); t=9 the step at 2 (2->1 fell)
    assert rc.BASELINES["weekly persistence"].predict(ds, "test").tolist() == [1, 0]
    assert rc.BASELINES["always rise"].predict(ds, "test").tolist() == [1, 1]
    assert rc.BASELINES["majority class"].predict(ds, "test").tolist() == [0, 0]


@needs_assignment
def test_every_registered_baseline_scores_every_window():
    cfg = rc.build_config([])
    d, C = assignment_data(cfg)
    ds = rc.build_dataset(d, C, 5, cfg)
    for name, b in rc.BASELINES.items():
        for split in ("val", "test"):
            s = b.predict(ds, split)
            assert s.shape == ds.sets[split][1].shape, name
            assert b.learned or set(np.unique(s)) <= {0, 1}, name


def test_logistic_regression_baseline_learns_a_linear_rule():
    rng = np.random.default_rng(0)

    def split(n):
        X = rng.normal(size=(n, 3, 1)).astype(np.float32)
        return X, (X[:, -1, 0] > 0).astype(np.float32)

    dC = rng.integers(0, 10, size=(2, 40)).astype(float)
    ds = rc.Dataset(L=3, sets={"train": split(200), "val": split(10), "test": split(74)},
                    masks=rc.split_masks(40, 3, 37, 0), dC=dC, dropped=0, latest=None)
    base = rc.evaluate_baselines(ds)
    assert list(base) == list(rc.BASELINES)
    assert base["logistic regression"].accuracy > 0.95


def test_bootstrap_gap_values_match_the_plain_metrics():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=5 * 8).astype(float)  # 5 countries x 8 days, country-major
    pred = rng.integers(0, 2, size=len(y))
    day = np.arange(len(y)) % 8
    gap = rc.bootstrap_gap(pred == y, y, day, seed=3)
    assert gap.accuracy.gap == pytest.approx(np.mean(pred == y), abs=1e-6)
    assert gap.balanced_accuracy.gap == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-6)
    assert gap == rc.bootstrap_gap(pred == y, y, day, seed=3)  # seeded: reruns identical


def test_block_bootstrap_of_independent_days_gives_the_binomial_interval():
    # 400 independent days, each one window right with probability 0.7: the 95% interval of the
    # accuracy is 0.7 +- 1.96 sqrt(0.21 / 400) = +-0.045 whatever the block length.
    rng = np.random.default_rng(1)
    sums = rc.day_sums(rng.random(400) < 0.7, np.ones(400), np.arange(400))
    for block in (1, 7):
        acc = rc.rates(rc.block_bootstrap(sums, seed=0, resamples=20_000, block=block))
        lo, hi = np.percentile(acc["accuracy"], [2.5, 97.5])
        assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.21 / 400), rel=0.1)


def test_block_bootstrap_widens_the_interval_of_a_weekly_pattern():
    # 56 days, 30 windows a day; whole weeks are right or wrong together (4 right, 4 wrong).
    # Single days look like 56 coin flips (95% interval about 0.5 +- 0.13); blocks of 7 days
    # keep most of each week together, and the interval widens towards 8 flips' +- 0.35.
    week = np.repeat(np.arange(8) % 2, 7)
    sums = rc.day_sums(np.tile(week, 30), np.ones(30 * 56), np.tile(np.arange(56), 30))
    widths = {}
    for block in (1, 7):
        acc = rc.rates(rc.block_bootstrap(sums, seed=0, resamples=20_000, block=block))
        widths[block] = np.subtract(*np.percentile(acc["accuracy"], [97.5, 2.5]))
    assert widths[1] == pytest.approx(0.26, abs=0.05) and widths[7] > 1.4 * widths[1]


def test_the_bounds_move_less_than_a_tenth_of_a_point_between_bootstrap_seeds():
    rng = np.random.default_rng(2)
    y = (rng.random(80 * 35) < 0.5).astype(float)
    right = rng.random(len(y)) < 0.6
    gap = rc.bootstrap_gap(right.astype(float) - (rng.random(len(y)) < 0.55), y,
                           np.arange(len(y)) % 35, seed=1)
    assert 0 < gap.accuracy.bound_spread < 0.001 and gap.balanced_accuracy.bound_spread < 0.001


def test_seed_summary_is_the_sample_std_over_seeds():
    runs = [training("gru", seed, 0.0, v) for seed, v in enumerate((0.5, 0.6, 0.7))]
    s = rc.seed_summary(runs).loc[("gru", 10)]
    assert s["seeds"] == 3 and s["accuracy"] == pytest.approx(0.6)
    assert s["accuracy_std"] == pytest.approx(0.1)  # ddof=1; ddof=0 gives 0.0816
    assert np.isnan(s["roc_auc"])  # no value to summarise
    assert np.isnan(rc.seed_summary(runs[:1]).loc[("gru", 10), "accuracy_std"])


def test_classification_metrics():
    m = rc.classification_metrics([1, 0, 1, 1], [0.9, 0.2, 0.4, 0.7])
    assert m == rc.Scores(accuracy=0.75, balanced_accuracy=0.833333, roc_auc=1.0, f1_rise=0.8)
    assert rc.classification_metrics([1, 1], [1, 0]).roc_auc is None


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def test_gap_in_words_is_the_difference_of_the_numbers_shown():
    # 0.629394 and 0.601818 are shown as 0.629 and 0.602: the gap shown is 2.7, not 2.8.
    interval = rc.Interval(0.027576, [-0.006, 0.06], "indistinguishable", 0.0)
    assert rc._gap_cell(0.629394, 0.601818, interval) == "+2.7 [−0.6, +6.0]"
    # An interval end just below 0 keeps its sign: "−0.0" would hide why it is not "beats".
    interval = rc.Interval(0.019, [-0.000422, 0.036709], "indistinguishable", 0.0)
    assert rc._gap_cell(0.812, 0.793, interval) == "+1.9 [−0.04, +3.7]"


# --------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, no traceback, nothing written
# --------------------------------------------------------------------------------------


@pytest.fixture
def run_here(capsys):
    """The script's entry point, rc.main, in this process (no interpreter start, as most bad
    input fails before any training): its exit code and stderr. What main sets for the whole
    process (logging, the SIGTERM handler, torch's thread count) is put back afterwards."""
    handlers = logging.root.handlers[:]
    term, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()

    def run(*args):
        code = rc.main([str(a) for a in args])
        return subprocess.CompletedProcess(args, code, "", capsys.readouterr().err)
    yield run
    logging.root.handlers[:] = handlers
    signal.signal(signal.SIGTERM, term)
    torch.set_num_threads(threads)


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


def test_unknown_csv_layout(tmp_path, run_here):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    out = tmp_path / "out"
    assert_clean_failure(run_here("--data", bad, "--out", out), out, "unknown CSV layout")


@needs_assignment
def test_non_numeric_counts(tmp_path, run_here):
    lines = ASSIGNMENT.read_text().splitlines()
    lines[3] = lines[3].replace(",0,0,", ",0,abc,", 1)  # Afghanistan, 1/23/20
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert_clean_failure(run_here("--data", bad, "--out", out), out,
                         "non-numeric count 'abc'", "Afghanistan")


@needs_assignment
def test_too_few_days(tmp_path, run_here):
    out = tmp_path / "out"
    r = run_here("--end", "2020-03-01", "--out", out)
    assert_clean_failure(r, out, "too few", "needs L + test + validation + 1 = 41")


@needs_assignment
def test_threshold_leaving_fewer_than_two_countries(tmp_path, run_here):
    out, rng = tmp_path / "out", np.random.default_rng(0)
    dates = [f"1/{i}/21" for i in range(1, 32)] + [f"2/{i}/21" for i in range(1, 29)]
    rows = [("", name, np.cumsum(rng.integers(0, 100, len(dates)))) for name in "ABC"]
    data = write_jhu_csv(tmp_path / "noise.csv", rows, dates)
    r = run_here("--data", data, "--threshold", "0.9", "--out", out)
    assert_clean_failure(r, out, "leaves", "largest correlation")


@needs_assignment
def test_cuda_requested_without_cuda(tmp_path, run_here):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    assert_clean_failure(run_here("--device", "cuda", "--out", out), out, "no CUDA device")


@pytest.mark.parametrize("args, phrase", [
    (["--L", "0"], "--L"), (["--model", "transformer"], "--model"),
    (["--sweep-L", "3,0"], "--sweep-L"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**32)], "--seed"),
    (["--threshold", "1"], "--threshold"), (["--threshold", "-1.5"], "--threshold"),
])
def test_argparse_rejects_bad_flags(args, phrase, capsys):
    with pytest.raises(SystemExit) as stop:
        rc.build_config(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("rnn_covid.py: error:") and phrase in err[-1]


def test_a_bad_flag_through_the_command_line(tmp_path):
    out = tmp_path / "out"
    r = run_script("--threshold", "1.2", "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "rnn_covid.py: error: argument --threshold: must be a number inside (-1, 1), as a "
        "Pearson r is, got 1.2")
    assert not out.exists()


def test_archive_or_image_as_data(tmp_path, run_here):
    import tarfile

    from PIL import Image

    csv = write_jhu_csv(tmp_path / "series.csv", [("", "Xland", [1, 2, 3])],
                        ["1/22/20", "1/23/20", "1/24/20"])
    with tarfile.open(tmp_path / "data.tar", "w") as tar:
        tar.add(csv, arcname="series.csv")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "face.jpg")
    for name in ("data.tar", "face.jpg"):
        out = tmp_path / f"out-{name}"
        r = run_here("--data", tmp_path / name, "--out", out)
        assert_clean_failure(r, out, name, "binary file")


def test_duplicate_date_columns(tmp_path, run_here):
    path = write_jhu_csv(tmp_path / "dup.csv", [("", "Xland", [1, 2, 2, 3])],
                         ["1/22/20", "1/23/20", "1/23/20", "1/24/20"])
    out = tmp_path / "out"
    r = run_here("--data", path, "--out", out)
    assert_clean_failure(r, out, "dup.csv", "not consecutive days, one column each")


@needs_assignment
def test_diverging_training_is_one_line_not_a_traceback(tmp_path):
    out = tmp_path / "out"
    r = run_script("--lr", "1e30", "--model", "rnn", "--steps", "5", "--seeds", "1",
                   "--sweep-L", "",
                   "--out", out)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "diverged; lower --lr" in r.stderr.strip().splitlines()[-1]
    assert not (out / "metrics.json").exists()


@needs_assignment
def test_output_path_below_a_regular_file(tmp_path, run_here):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me\n")
    out = blocker / "out"
    r = run_here("--out", out)
    assert_clean_failure(r, out, "notes.txt", "is a file")
    assert blocker.read_text() == "keep me\n"


@needs_assignment
def test_output_folder_without_write_permission(tmp_path, run_here):
    if os.geteuid() == 0:
        # root writes through permission bits, so the check meets a folder no one can write
        # to instead: sysfs refuses new entries even to root.
        out = Path("/sys/rnn_covid_test_out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "out"
    r = run_here("--out", out)
    assert_clean_failure(r, out, "cannot write to output folder", "--out")


@needs_assignment
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_naming_what_was_written(tmp_path, sig):
    import signal
    import time

    out = tmp_path / "out"
    # A job started in the background by a shell ignores SIGINT, and Python keeps that: give
    # the run the default handling an interactive shell would.
    proc = subprocess.Popen([sys.executable, str(ROOT / "rnn_covid.py"), "--out", str(out),
                             "--sweep-L", ""], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "corr_C_clustered.png").exists():  # training has started after these
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = out / "corr_C_clustered.png"
    assert err.strip() == (f"interrupted: 2 file(s) were written before it, the last {last}; "
                           "rerun to finish")
    assert not (out / "metrics.json").exists()


# --------------------------------------------------------------------------------------
# End to end on the real assignment CSV
# --------------------------------------------------------------------------------------


def check_backtest(m, d):
    """The pooled test days are the origins' blocks, back to back up to the last day, and each
    origin's C is the one computed from the days before its validation days."""
    b, cfg = m["backtest"], m["config"]
    every, origins = cfg["origin_every"], pd.to_datetime(b["origins"])
    assert len(origins) == cfg["origins"] and b["test_days"] == len(origins) * every
    assert (np.diff(origins) == pd.Timedelta(days=every)).all()
    assert origins[-1] + pd.Timedelta(days=every - 1) == d.columns[-1]
    assert b["test_windows"] == sum(r["countries"] for r in b["per_origin"]) * every
    for r in b["per_origin"]:
        known = d.loc[:, :pd.Timestamp(r["origin"]) - pd.Timedelta(days=1 + cfg["val_days"])]
        assert r["countries"] == len(rc.countries_of_C(known, cfg["threshold"])[2])
    for metric in ("accuracy", "balanced_accuracy"):
        v = b[metric]
        assert v["ci95"][0] <= v["gap"] <= v["ci95"][1] and v["bound_spread"] < 0.001
        assert v["gap"] == pytest.approx(b["pooled"]["model"][metric]
                                         - b["pooled"]["naive"][metric], abs=1e-5)


def check_outputs(out, model):
    for name in ("REPORT.md", "metrics.json", "corr_first10.png", "corr_C_clustered.png",
                 f"learning_curves_{model}.png", "L_sweep.png", "world_map.html",
                 "world_probabilities.csv"):
        assert (out / name).is_file(), name
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left
    m = json.loads((out / "metrics.json").read_text())
    d, C = assignment_data(rc.DEFAULT)
    assert m["data"]["C"] == C and m["data"]["splits"]["test"]["windows"] == 1620
    ev = m["evaluation"]
    assert ev["baselines"]["anti-persistence"]["accuracy"] == pytest.approx(ANTI)
    entries = [(r["model"], r["L"], r["seed"]) for r in m["models"]]
    assert entries == [(model, 10, 1), (model, 10, 2), (model, 3, 1)]
    assert set(m["sweep"]["baselines"]) == {"3", "10"}
    assert m["sweep"]["baselines"]["10"] == {k: v["accuracy"] for k, v in ev["baselines"].items()}
    check_backtest(m, d)
    v, runs = ev["gaps"][model][ev["naive"]]["accuracy"], m["models"][:2]
    model_acc = np.mean([r["scores"]["test"]["accuracy"] for r in runs])  # the two main seeds
    assert v["gap"] == pytest.approx(model_acc - ANTI, abs=1e-5)
    assert ev["naive"] == "anti-persistence" and len(ev["map_accuracy"]) == 3
    assert m["map"]["countries_total"] == 185
    assert m["map"]["countries_mapped"] + len(m["map"]["excluded"]) == 185
    assert set(m["map"]["excluded"]) == {"Diamond Princess", "MS Zaandam"}
    report = (out / "REPORT.md").read_text()
    assert "Excluded non-countries: Diamond Princess, MS Zaandam." in report
    probs = pd.read_csv(out / "world_probabilities.csv")
    assert len(probs) == 185 and probs["in_C"].sum() == 81
    # no new case in its last days
    assert probs.set_index("country").loc["Diamond Princess", "low_activity"]
    return m


@needs_assignment
def test_end_to_end_the_model_is_chosen_on_validation_not_test(tmp_path):
    # With this budget GRU is best on validation and RNN on test: choosing on test would pick RNN.
    out = tmp_path / "out"
    r = run_script("--steps", "30", "--hidden", "16", "--seeds", "1", "--origins", "0",
                   "--sweep-L", "", "--out", out,
                   env_extra={"BROWSER_PATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    val = {e["model"]: e["scores"]["val"]["accuracy"] for e in m["models"]}
    test = {e["model"]: e["scores"]["test"]["accuracy"] for e in m["models"]}
    assert max(val, key=val.get) == "gru" and max(test, key=test.get) == "rnn"
    assert m["evaluation"]["chosen"] == "gru" and m["backtest"] is None
    assert "**GRU** (chosen on validation)" in (out / "REPORT.md").read_text()


@pytest.fixture(scope="module")
def lstm_runs(tmp_path_factory):
    """A small LSTM run on the CPU, trained in the script's process (--jobs 1) and in two
    workers (--jobs 2): the out folder and metrics.json of each, for the tests below."""
    require(ASSIGNMENT)
    runs = {}
    for jobs in (1, 2):
        out = tmp_path_factory.mktemp(f"jobs{jobs}") / "out"
        r = run_script("--model", "lstm", *TINY, "--device", "cpu", "--jobs", jobs, "--out", out,
                       env_extra={"BROWSER_PATH": ""})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[jobs] = out, check_outputs(out, "lstm")
    return runs


def test_end_to_end_one_model(lstm_runs):
    out, m = lstm_runs[1]
    assert m["map"]["png"] is None and m["map"]["png_skipped_reason"]
    report = (out / "REPORT.md").read_text()
    assert "**LSTM** (the only model trained)" in report and "(chosen on validation)" not in report
    figure = (out / "world_map.html").read_text().rsplit("<script", 1)[1]  # after plotly.js
    assert "P(new cases on 2020-04-13 exceed 2020-04-12): LSTM, L=10" in figure
    assert "1 (rise)" in figure and "Label 1: tomorrow's new cases exceed today's" in report
    # The verdict's words follow the claim computed from the interval (here "below": a model
    # that predicts a rise every day against anti-persistence).
    ev = m["evaluation"]
    assert ev["gaps"][ev["chosen"]][ev["naive"]]["accuracy"]["claim"] == "below"
    assert "the chosen model is below anti-persistence: the whole interval lies below 0" in report
    # What each training got is recorded and said: --steps given, the rest set by the data size.
    entry, train = m["models"][0], m["data"]["splits"]["train"]["windows"]
    assert entry["plan"] == {"batch": train, "steps": 3, "weight_decay": 1e-3}
    assert ("weight decay 0.001; LSTM 3 steps, each on the whole training set (full batch)"
            in report
            and "--weight-decay, --batch-size not given: set by the training-set size" in report)


def test_cpu_rerun_is_identical_and_parallel_jobs_change_nothing(lstm_runs):
    """Same seed, machine, thread count and libraries: the same metrics.json apart from times,
    whether the trainings run one after another (--jobs 1) or in two worker processes."""
    runs = []
    for jobs, (out, m) in lstm_runs.items():
        m = json.loads(json.dumps(m))  # a copy: the fixture's record is shared
        assert m["timing"]["workers"] == jobs  # the processes that really trained
        m.pop("timing")
        for training in m["models"]:
            training.pop("seconds")
        m["config"].pop("out")
        m["config"].pop("jobs")
        runs.append(m)
    assert runs[0] == runs[1]
