"""Two table cells summarising a metrics.json of rnn_covid.py or vae_anime.py, for
bench/gpu_check.sh: the training time the script measured, then its headline result."""
import json
import sys


def mean_std(stats):
    """'0.812 ± 0.004', or '0.812 (1 seed)' where one seed leaves no standard deviation."""
    if stats.get("std") is None:
        return f"{stats['mean']:.3f} (1 seed)"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def rnn_cells(m):
    e = m["evaluation"]
    chosen, naive = e["chosen"], e["naive"]
    gap = e["gaps"][chosen][naive]["accuracy"]
    lo, hi = gap["ci95"]
    train_s = sum(run["seconds"] for run in m["models"])
    row = next(r for r in e["summary"] if r["model"] == chosen)      # one row per model
    accuracy = mean_std({"mean": row["accuracy"], "std": row["accuracy_std"]})
    return (f"{train_s:.0f} s ({m['timing']['workers']} worker(s))",
            f"{chosen} test accuracy {accuracy}; gap to {naive} "
            f"{100 * gap['gap']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]: {gap['claim']}")


def vae_cells(m):
    train_s = sum(m["timing"]["train_s"].values())
    y = m["yardstick"]
    if y is None:  # the Bernoulli likelihood has no bits per dimension
        result = ", ".join(f"λ={r['kl_weight']:g}: neg-ELBO {r['test']['neg_elbo']:.1f} nats"
                           for r in m["runs"])
    else:
        result = ", ".join(f"λ={tag}: {r['elbo_bpd']:.3f} bpd" for tag, r in y["models"].items())
        if y["iw"] is not None:
            v = y["verdict"]
            lo, hi = v["ci95"]
            result += (f"; IW bound (k={y['iw']['k']}) {y['iw']['bpd']:.3f} bpd, {v['claim']} "
                       f"{v['baseline']} by {v['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return f"{train_s:.0f} s", f"{result}; bf16 autocast {m['timing'].get('bf16_autocast')}"


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        metrics = json.load(f)
    print(" | ".join(rnn_cells(metrics) if "evaluation" in metrics else vae_cells(metrics)))
