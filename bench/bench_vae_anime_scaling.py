"""How vae_anime.py's cost grows: seconds per epoch (training plus the test evaluation that
follows each epoch) against the number of images and the image size, with the default settings.

    python bench/bench_vae_anime_scaling.py [--counts 2500,5000,10000,0] [--sizes 32,64]

A count of 0 means every image. Each cell trains one real epoch of λ = 1 with the script's own
train_epoch and evaluate on the first `count` images (90/10 split as in the script). Prints a
markdown table with the load average beside each cell (the build machine is shared) and writes
it to figures/bench/vae_anime/scaling.md.
"""
import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vae_anime  # noqa: E402  (first: it sets the OpenMP wait policy before torch starts)

import torch  # noqa: E402


def epoch_seconds(images, cfg, data_key):
    """Seconds of one training epoch plus one test evaluation on `images`."""
    train_idx, test_idx = vae_anime.split_indices(len(images), cfg.test_fraction, cfg.seed)
    data = vae_anime.Data(images, train_idx, test_idx, {"key": data_key}, None, None, None, None)
    device = torch.device("cpu")
    bf16 = cfg.amp == "on"                       # as --amp auto on the CPU
    t = vae_anime.start_or_resume(cfg, 1.0, data_key, device, bf16, cfg.out / "unused.pt")
    start = time.perf_counter()
    vae_anime.train_epoch(t, data)
    vae_anime.evaluate(t.model, images, test_idx, 1.0, cfg.seed)
    return time.perf_counter() - start, len(train_idx)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="2500,5000,10000,0", help="image counts, 0 = all")
    p.add_argument("--sizes", default="32,64", help="image sides in pixels")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "bench" / "vae_anime")
    args = p.parse_args()
    vae_anime.setup_logging()
    base = vae_anime.Config()
    rows = ["| image size | images (train) | seconds per epoch | train images/s | load average |",
            "|---|---|---|---|---|"]
    for size in map(int, args.sizes.split(",")):
        cfg = vae_anime.dataclasses.replace(base, image_size=size)
        images, info = vae_anime.load_images(ROOT / cfg.data_dir, size, ROOT / cfg.out / "cache")
        for count in map(int, args.counts.split(",")):
            subset = images[:count or len(images)]
            seconds, n_train = epoch_seconds(subset, cfg, info["key"])
            rows.append(f"| {size}×{size} | {len(subset):,} ({n_train:,}) | {seconds:.1f} "
                        f"| {n_train / seconds:,.0f} | {os.getloadavg()[0]:.2f} |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    note = (f"batch {base.batch_size}, float32, {torch.get_num_threads()} threads on "
            f"{os.cpu_count()} CPUs; images/s counts training images over the whole epoch time.")
    print("\n" + table + "\n\n" + note)
    vae_anime.write_text_atomically(args.out / "scaling.md", table + "\n\n" + note + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
