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
    chosen, L = m["selection"]["chosen_model"], m["config"]["L"]
    acc, v = m["summary"][f"{chosen}@L{L}"]["accuracy"], m["verdict"]
    lo, hi = v["ci95"]
    train_s = sum(m["timing"]["runs_s"].values())
    return (f"{train_s:.0f} s ({m['timing']['workers']} worker(s))",
            f"{chosen} test accuracy {mean_std(acc)}; gap to {v['baseline']} "
            f"{100 * v['gap']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]: {v['claim']}")


def vae_cells(m):
    train_s = sum(m["timing"]["train_s"].values())
    runs = ", ".join(f"λ={r['kl_weight']:g}: neg-ELBO {r['test']['neg_elbo']:.1f}" for r in m["runs"])
    return f"{train_s:.0f} s", f"{runs}; bf16 autocast {m['timing'].get('bf16_autocast')}"


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        metrics = json.load(f)
    print(" | ".join(rnn_cells(metrics) if "verdict" in metrics else vae_cells(metrics)))
