"""Quality per second of vae_anime.py's training step: the seed's 4×4 single-pixel layers
against the script's kernel-2 ones (and a few other settings), for the same wall-clock budget,
side by side in one run.

    python bench/bench_vae_anime.py [--budget 60] [--slice 5] [--out figures/bench/vae_anime]

Every contestant trains λ = 1 from the same seed and initial weights on the default data for
`--budget` seconds of training time. The contestants take turns in slices of `--slice` seconds,
so a change in the machine's load (the build machine is shared) hits all of them alike. For
each: images/s, achieved GFLOP/s against the float32 and bfloat16 matrix-multiply peaks
measured in the same run, and the held-out negative ELBO (float32) reached. Writes
results.md, results.json and samples_side_by_side.png (generated samples only) into --out.
"""
import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vae_anime  # noqa: E402  (first: it sets the OpenMP wait policy before torch starts)

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# (name, batch size, learning rate, layers, bfloat16 autocast); "seed" has the seed's 4×4
# kernels in the two single-pixel layers (outer taps zero, so the same function), "ours" the
# script's kernel-2 layers; every setting uses vae_anime.train_step.
CONTESTANTS = [
    ("seed's 4×4 layers", 64, 1e-3, "seed", False),
    ("ours: kernel-2 single-pixel layers", 64, 1e-3, "ours", False),
    ("ours + bfloat16 autocast", 64, 1e-3, "ours", True),
    ("ours, batch 128", 128, 1e-3, "ours", False),
    ("ours, batch 256", 256, 1e-3, "ours", False),
]


def with_seed_layers(model):
    """The model with the seed's 4×4 / stride 2 / padding 1 layers in place of the kernel-2
    ones, computing the same function: the centre taps copied, the outer taps (which only ever
    meet padding) zero."""
    for layers in (model.encoder, model.decoder):
        for i, layer in enumerate(layers):
            if getattr(layer, "kernel_size", None) == (2, 2):
                seed = type(layer)(layer.in_channels, layer.out_channels, 4, 2, 1)
                with torch.no_grad():
                    seed.weight.zero_()[:, :, 1:3, 1:3] = layer.weight
                    seed.bias.copy_(layer.bias)
                layers[i] = seed
    return model


class Contestant:
    """One setting's training: its model, optimiser, position in the epoch and time spent."""

    def __init__(self, name, batch_size, lr, layers, bf16, data_key):
        self.name, self.batch_size, self.lr = name, batch_size, lr
        settings = vae_anime.RunSettings(kl_weight=1.0, seed=0, image_size=32, latent_dim=128,
                                         batch_size=batch_size, lr=lr, lr_decay=1.0,
                                         test_fraction=0.1, amp=bf16, device="cpu",
                                         likelihood="bernoulli")   # the numbers in the docs
        self.t = vae_anime.new_training(settings, data_key, torch.device("cpu"))
        if layers == "seed":
            self.t.model = self.t.net = with_seed_layers(self.t.model)
            self.t.optimizer = torch.optim.Adam(self.t.model.parameters(), lr=lr, fused=True)
        self.flops = training_flops_per_image(self.t.model, batch_size)
        self.seconds, self.images, self.epoch, self.position, self.order = 0.0, 0, 0, 0, None

    def train_for(self, seconds, images, train_idx):
        """Steps until `seconds` have passed; full batches only, epochs as in the script."""
        self.t.net.train()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            if self.order is None or self.position + self.batch_size > len(self.order):
                self.order = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(self.epoch))]
                self.epoch, self.position = self.epoch + 1, 0
            batch = self.order[self.position:self.position + self.batch_size]
            vae_anime.train_step(self.t, images, batch)
            self.position += self.batch_size
            self.images += self.batch_size
        self.seconds += time.perf_counter() - start


def matmul_peak(dtype, n=1024, seconds=1.5):
    """GFLOP/s of a square matrix multiply, the best of repeated timed bursts."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def training_flops_per_image(model, batch_size):
    """Forward plus backward FLOPs of one training image as `model` computes them, counted by
    torch's FLOP counter (the kernel-2 layers skip the products with padding zeros that the
    seed's 4×4 layers compute)."""
    x = torch.rand(batch_size, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        logits, mu, logvar = model(x, torch.randn(batch_size, 128))
        recon, kl = vae_anime.loss_terms(logits, x, mu, logvar, "bernoulli")
        (recon + kl).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch_size


def samples_figure(contestants, z, path):
    fig, axes = plt.subplots(1, len(contestants), figsize=(3.3 * len(contestants), 3.8))
    for ax, c in zip(axes, contestants):
        pictures = vae_anime.run_pictures(c.t.model, torch.zeros(0, 3, 32, 32), z)
        vae_anime.show_grid(ax, pictures["samples"][:36], 6,
                            "\n".join([*textwrap.wrap(c.name, 34),
                                       f"batch {c.batch_size}: neg-ELBO {c.neg_elbo:,.1f}"]))
        ax.title.set_fontsize(7)
    fig.suptitle("λ = 1 samples from the same z after the same training time", fontsize=10)
    vae_anime.save_figure_atomically(fig, path)


def results_table(contestants, peaks, n_train):
    base = contestants[0]
    lines = ["| setting | batch | lr | images/s | vs seed | MFLOP/image | GFLOP/s | % fp32 peak | % bf16 peak "
             "| epochs | held-out neg-ELBO |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in contestants:
        rate = c.images / c.seconds
        gflops = rate * c.flops / 1e9
        lines.append(f"| {c.name} | {c.batch_size} | {c.lr:g} | {rate:,.0f} | {rate / (base.images / base.seconds):.2f}x "
                     f"| {c.flops / 1e6:.0f} | {gflops:,.0f} | {100 * gflops / peaks['float32']:.0f}% "
                     f"| {100 * gflops / peaks['bfloat16']:.0f}% | {c.images / n_train:.2f} "
                     f"| {c.neg_elbo:,.1f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=60, help="training seconds per setting (default: 60)")
    p.add_argument("--slice", type=float, default=5, help="seconds per turn (default: 5)")
    p.add_argument("--only", type=lambda t: [int(i) for i in t.split(",")], default=None,
                   help="comma-separated indices of the settings to run (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "bench" / "vae_anime")
    args = p.parse_args()
    vae_anime.setup_logging()
    cfg = vae_anime.Config()
    try:
        images, info = vae_anime.load_images(ROOT / cfg.data_dir, 32, ROOT / cfg.out / "cache", cfg.workers)
    except vae_anime.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    vae_anime.seed_everything(0)
    train_idx, test_idx = vae_anime.split_indices(len(images), 0.1, 0)
    load = [os.getloadavg()[0]]
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{len(train_idx)} training images; "
          f"matmul peaks {peaks['float32']:.0f} (fp32) / {peaks['bfloat16']:.0f} (bf16) GFLOP/s; "
          f"load {load[0]:.2f}", flush=True)
    specs = [CONTESTANTS[i] for i in args.only] if args.only else CONTESTANTS
    contestants = [Contestant(*spec, info["key"]) for spec in specs]
    while any(c.seconds < args.budget for c in contestants):
        for c in contestants:
            if c.seconds < args.budget:
                c.train_for(min(args.slice, args.budget - c.seconds), images, train_idx)
        load.append(os.getloadavg()[0])
        print(f"  {min(c.seconds for c in contestants):.0f}/{args.budget:.0f} s each, load {load[-1]:.2f}",
              flush=True)
    for c in contestants:
        c.neg_elbo = vae_anime.evaluate(c.t.model, images, test_idx, 1.0, 0)[0]["neg_elbo"]
    after = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    peaks = {k: max(v, after[k]) for k, v in peaks.items()}
    table = results_table(contestants, peaks, len(train_idx))
    note = (f"Budget {args.budget:.0f} s of training per setting, taken in turns of {args.slice:.0f} s; "
            f"load average {min(load):.2f} to {max(load):.2f} on {os.cpu_count()} CPUs; "
            f"matmul peaks {peaks['float32']:.0f} GFLOP/s (fp32), {peaks['bfloat16']:.0f} (bf16); "
            "MFLOP per training image: forward + backward as each setting computes them.")
    print("\n" + table + "\n\n" + note)
    vae_anime.write_text_atomically(args.out / "results.md", table + "\n\n" + note + "\n")
    vae_anime.write_text_atomically(args.out / "results.json", json.dumps(
        {"peaks_gflops": peaks, "load": load, "budget_s": args.budget,
         "contestants": [{"name": c.name, "batch_size": c.batch_size, "lr": c.lr, "flops_per_image": c.flops,
                          "images": c.images,
                          "seconds": c.seconds, "neg_elbo": c.neg_elbo} for c in contestants]},
        indent=1) + "\n")
    samples_figure(contestants, torch.randn(64, 128, generator=torch.Generator().manual_seed(0)),
                   args.out / "samples_side_by_side.png")
    print(f"wrote {args.out}/results.md, results.json, samples_side_by_side.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
