"""Choose the scale of vae_anime.py's discretized logistic likelihood on validation images.

The candidates: one learned log scale per colour channel, shared by every pixel (as the σ-VAE
of Rybkin et al. 2021), or one log scale per sub-pixel from the decoder (three extra output
channels). Only the script's training images take part: they are put in a folder of links and
the script runs on that folder, so its own 90/10 split makes the held-out tenth a validation set
drawn from the training images; the test images are never seen. Each candidate trains λ = 1 with
the script's default settings and is scored by its validation negative ELBO in bits per dimension.

    python bench/choose_vae_likelihood.py                 # 5 epochs each (2 CPU cores: ~15 min)
    python bench/choose_vae_likelihood.py --epochs 2 --script /tmp/other/vae_anime.py

Writes docs/vae_likelihood_choice.md (the table) and, under --out (default
figures/likelihood_choice/), each candidate's full output, samples included.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTES = "\n## Notes"
CANDIDATES = {"logistic-channel": "one learned log scale per colour channel, shared over pixels",
              "logistic-pixel": "one log scale per sub-pixel, 3 extra decoder output channels"}


def load_script(path):
    spec = importlib.util.spec_from_file_location("vae_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # the decoding pool's workers unpickle by module name
    spec.loader.exec_module(module)
    return module


def link_training_images(script, cfg, folder):
    """A folder of links to the script's training images only (its own split of cfg.data_dir)."""
    files = script.list_image_files(cfg.data_dir)
    _, info = script.load_images(cfg.data_dir, cfg.image_size, cfg.cache_folder, cfg.workers)
    skipped = set(info["skipped"])
    readable = [f for f in files if str(f.relative_to(cfg.data_dir)) not in skipped]
    train_idx, _ = script.split_indices(len(readable), cfg.test_fraction, cfg.seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in train_idx.tolist():
        link = folder / readable[i].relative_to(cfg.data_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(readable[i].resolve())
    n_val = len(script.split_indices(len(train_idx), cfg.test_fraction, cfg.seed)[1])
    return len(readable), len(train_idx), n_val


def train_candidate(script_path, name, images, out, epochs):
    """One λ = 1 run of the script on the training images; its metrics and wall time."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(script_path), "--data-dir", str(images),
                             "--out", str(out), "--kl-weight", "1", "--likelihood", name,
                             "--epochs", str(epochs),
                             "--cache-dir", str(out.parent / "cache_train")],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"error: {name} failed:\n{result.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return metrics, time.perf_counter() - start


def validation_bpd(metrics):
    """(neg-ELBO, distortion, rate) of the held-out tenth in bits per dimension, and per epoch."""
    dims = 3 * metrics["config"]["image_size"] ** 2
    run = metrics["runs"][0]

    def bits(stats):
        return {k: stats[k] / (dims * math.log(2)) for k in ("neg_elbo", "recon", "kl")}
    return bits(run["test"]), [bits(h["test"])["neg_elbo"] for h in run["history"]]


def write_table(results, args, sizes, path):
    best = min(results, key=lambda n: results[n]["final"]["neg_elbo"])
    rows = [f"| `{n}` | {CANDIDATES[n]} | {r['final']['neg_elbo']:.3f} | "
            f"{r['final']['recon']:.3f} | {r['final']['kl']:.3f} | "
            f"{' → '.join(f'{b:.2f}' for b in r['curve'])} | {r['seconds'] / 60:.1f} |"
            for n, r in results.items()]
    n_all, n_train, n_val = sizes
    text = f"""# vae_anime.py: the discretized logistic's scale, chosen on validation

Written by `python bench/choose_vae_likelihood.py --epochs {args.epochs}` on
{time.strftime('%Y-%m-%d %H:%M %Z')} (script `{args.script.name}`, load average
{os.getloadavg()[0]:.2f} at the end, {os.cpu_count()} CPUs). Only the {n_train:,} training images
of the script's split of the {n_all:,} faces take part; the script's own 90/10 split of them holds
out {n_val:,} as validation images. λ = 1, the script's default
settings otherwise, one seed. Bits per dimension: the validation negative ELBO (one posterior
sample per image) / (3·32·32 · ln 2), split into distortion (reconstruction) and rate (KL).

| candidate | scale | validation bpd | distortion | rate | bpd per epoch | min |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Lowest validation bits per dimension: **`{best}`**.
"""
    # Hand-written notes (what the samples show) below the table survive a rerun.
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(text + old[old.find(NOTES):] if NOTES in old else text, encoding="utf-8")
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--script", type=Path, default=ROOT / "vae_anime.py")
    p.add_argument("--epochs", type=int, default=None, help="default: the script's default")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "likelihood_choice")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "vae_likelihood_choice.md")
    args = p.parse_args()
    script = load_script(args.script)
    cfg = dataclasses.replace(script.PRESETS["default"], cache_dir=args.out / "cache")
    args.epochs = args.epochs or cfg.epochs
    images = args.out / "training_images"
    sizes = link_training_images(script, cfg, images)
    results = {}
    for name in CANDIDATES:
        metrics, seconds = train_candidate(args.script, name, images, args.out / name, args.epochs)
        final, curve = validation_bpd(metrics)
        results[name] = {"final": final, "curve": curve, "seconds": seconds}
        print(f"{name}: validation {final['neg_elbo']:.3f} bpd ({seconds / 60:.1f} min)",
              flush=True)
    best = write_table(results, args, sizes, args.doc)
    print(f"chosen: {best}; table in {args.doc}, samples in {args.out}/<candidate>/")


if __name__ == "__main__":
    main()
