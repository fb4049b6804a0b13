"""One line summarising a metrics.json of rnn_covid.py or vae_anime.py (for bench/gpu_check.sh)."""
import json
import sys


def rnn_line(m):
    chosen, L = m["selection"]["chosen_model"], m["config"]["L"]
    acc, v = m["summary"][f"{chosen}@L{L}"]["accuracy"], m["verdict"]
    lo, hi = v["ci95"]
    return (f"{chosen} test accuracy {acc['mean']:.3f} ± {acc['std']:.3f}; gap to {v['baseline']} "
            f"{100 * v['gap']:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}]: {v['claim']}")


def vae_line(m):
    runs = ", ".join(f"λ={r['kl_weight']:g}: neg-ELBO {r['test']['neg_elbo']:.1f}" for r in m["runs"])
    return f"{runs}; bf16 autocast {m['timing'].get('bf16_autocast')}"


if __name__ == "__main__":
    metrics = json.load(open(sys.argv[1], encoding="utf-8"))
    print(rnn_line(metrics) if "verdict" in metrics else vae_line(metrics))
