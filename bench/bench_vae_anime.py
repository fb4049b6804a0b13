"""Quality at equal wall time of vae_anime.py's training settings, side by side in one run:
the likelihood p(x|z) (today's per-sub-pixel logistic against the coupled mixture with K
components), normalisation (BatchNorm or GroupNorm after every hidden convolution), the learning
rate and its decay per epoch.

    python bench/bench_vae_anime.py [--budget 180] [--slice 5] [--only 0,2] [--out DIR]

Only the script's training images take part: the script's own seeded 90/10 split of them holds
out validation images, so no choice looks at the test set. Every contestant trains λ = 1 from
the same seed on the same batches for `--budget` seconds of training time, taking turns in
slices of `--slice` seconds so that a change in the machine's load hits all alike. For each:
the step's images/s (and the ratio to the first contestant, measured in this run) and the
validation negative ELBO in bits per dimension (one seeded posterior sample per image) at each
quarter of the budget. Writes results.md and results.json into --out.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vae_anime  # noqa: E402  (first: it sets the OpenMP wait policy before torch starts)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

# (name, likelihood: "today" or K components of the coupled mixture, lr, lr factor per epoch,
#  normalisation after every hidden convolution: None, "batch" or "group")
CONTESTANTS = [
    ("today: a logistic per sub-pixel", "today", 1e-3, 1.0, None),
    ("coupled, K = 1", 1, 1e-3, 1.0, None),
    ("coupled mixture, K = 2", 2, 1e-3, 1.0, None),
    ("coupled mixture, K = 3", 3, 1e-3, 1.0, None),
    ("coupled mixture, K = 5", 5, 1e-3, 1.0, None),
    ("coupled mixture, K = 3, lr 2e-3", 3, 2e-3, 1.0, None),
    ("coupled mixture, K = 3, lr 2e-3 × 0.8 per epoch", 3, 2e-3, 0.8, None),
    ("coupled mixture, K = 3, BatchNorm", 3, 1e-3, 1.0, "batch"),
    ("coupled mixture, K = 3, lr 1e-3 × 0.7 per epoch", 3, 1e-3, 0.7, None),
    ("coupled mixture, K = 3, lr 1e-3 × 0.5 per epoch", 3, 1e-3, 0.5, None),
    ("coupled mixture, K = 3, GroupNorm (8 groups)", 3, 1e-3, 1.0, "group"),
    ("coupled mixture, K = 3, BatchNorm, lr 1e-3 × 0.7 per epoch", 3, 1e-3, 0.7, "batch"),
]


def with_norm(layers, kind):
    """The same layers with a BatchNorm2d (or an 8-group GroupNorm) after every convolution but
    the output's."""
    out = []
    for i, layer in enumerate(layers):
        out.append(layer)
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)) and i < len(layers) - 1:
            c = layer.out_channels
            out.append(nn.BatchNorm2d(c) if kind == "batch" else nn.GroupNorm(8, c))
    return nn.Sequential(*out)


def today_nats(out, x):
    """Today's (bb26a88) likelihood: a discretized logistic per sub-pixel, sigmoid means."""
    mean_logits, log_scale = out.chunk(2, dim=1)
    log_p = vae_anime.discretized_logistic_log_prob(x, torch.sigmoid(mean_logits), log_scale)
    return -log_p.flatten(1).sum(1)


def mixture_nats(out, x):
    return vae_anime.reconstruction_nats(out, x, "logistic-mixture")


class Contestant:
    """One setting's training: its model, optimiser, position in the epoch and time spent."""

    def __init__(self, name, likelihood, lr, lr_decay, norm):
        self.name, self.lr, self.lr_decay = name, lr, lr_decay
        torch.manual_seed(0)                      # the script's initial weights
        if likelihood == "today":
            self.model, self.nats = vae_anime.VAE(likelihood="bernoulli"), today_nats
            self.model.decoder[-1] = nn.ConvTranspose2d(32, 6, 4, stride=2, padding=1)
            nn.init.constant_(self.model.decoder[-1].bias[3:], vae_anime.INITIAL_LOG_SCALE)
        else:
            self.model, self.nats = vae_anime.VAE(components=likelihood), mixture_nats
        if norm:
            self.model.encoder = with_norm(self.model.encoder, norm)
            self.model.decoder = with_norm(self.model.decoder, norm)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, fused=True)
        self.noise = torch.Generator().manual_seed(1)
        self.seconds, self.images, self.epoch, self.position, self.order = 0.0, 0, 0, 0, None
        self.curve = []                           # (training seconds, epochs, validation bpd)

    def step(self, x):
        """vae_anime.train_step's arithmetic at λ = 1, with this contestant's likelihood."""
        noise = torch.randn((len(x), 128), generator=self.noise)
        out, mu, logvar = self.model(x, noise)
        objective = self.nats(out.float(), x) + vae_anime.kl_per_dimension(mu, logvar).sum(1)
        self.optimizer.zero_grad(set_to_none=True)
        objective.mean().backward()
        self.optimizer.step()

    def train_for(self, seconds, images, fit_idx):
        """Steps until `seconds` have passed; epochs shuffled as in the script."""
        self.model.train()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            if self.order is None or self.position >= len(self.order):
                shuffle = torch.Generator().manual_seed(self.epoch)
                self.order = fit_idx[torch.randperm(len(fit_idx), generator=shuffle)]
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr * self.lr_decay ** self.epoch
                self.epoch, self.position = self.epoch + 1, 0
            batch = self.order[self.position:self.position + 64]
            self.step(images[batch].float() / 255)
            self.position += len(batch)
            self.images += len(batch)
        self.seconds += time.perf_counter() - start

    @torch.no_grad()
    def validation_bpd(self, images, val_idx):
        """Negative ELBO in bits per dimension, one posterior sample per image (seed 0)."""
        self.model.eval()
        gen, total = torch.Generator().manual_seed(0), 0.0
        for chunk in val_idx.split(512):
            x = images[chunk].float() / 255
            mu, logvar = self.model.encode(x)
            z = mu + torch.randn(mu.shape, generator=gen) * torch.exp(0.5 * logvar)
            total += (self.nats(self.model.decoder(z), x)
                      + vae_anime.kl_per_dimension(mu, logvar).sum(1)).sum().item()
        return vae_anime.bits_per_dim(total / len(val_idx), x[0].numel())


def results_table(contestants, n_fit):
    base = contestants[0].images / contestants[0].seconds
    lines = ["| setting | images/s | vs first | epochs | validation bpd at each quarter |",
             "|---|---|---|---|---|"]
    for c in contestants:
        rate = c.images / c.seconds
        curve = " → ".join(f"{bpd:.3f}" for _, _, bpd in c.curve)
        lines.append(f"| {c.name} | {rate:,.0f} | {rate / base:.2f}× | {c.images / n_fit:.2f} "
                     f"| {curve} |")
    return "\n".join(lines)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=180,
                   help="training seconds per setting (default: 180)")
    p.add_argument("--slice", type=float, default=5, help="seconds per turn (default: 5)")
    p.add_argument("--only", type=lambda t: [int(i) for i in t.split(",")], default=None,
                   help="comma-separated indices of the settings to run (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "figures" / "bench" / "vae_anime")
    return p.parse_args()


def main():
    args = parse_args()
    vae_anime.setup_logging()
    cfg = vae_anime.Config()
    try:
        images, _ = vae_anime.load_images(ROOT / cfg.data_dir, 32, ROOT / cfg.out / "cache")
    except vae_anime.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    vae_anime.seed_everything(0)
    train_idx, _ = vae_anime.split_indices(len(images), cfg.test_fraction, cfg.seed)
    fit_pos, val_pos = vae_anime.split_indices(len(train_idx), 0.1, cfg.seed)
    fit_idx, val_idx = train_idx[fit_pos], train_idx[val_pos]
    specs = [CONTESTANTS[i] for i in args.only] if args.only else CONTESTANTS
    contestants, load = [Contestant(*spec) for spec in specs], [os.getloadavg()[0]]
    print(f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads; {len(fit_idx)} training, "
          f"{len(val_idx)} validation images; load {load[0]:.2f}", flush=True)
    for quarter in range(1, 5):
        while any(c.seconds < args.budget * quarter / 4 for c in contestants):
            for c in contestants:
                left = args.budget * quarter / 4 - c.seconds
                if left > 0:
                    c.train_for(min(args.slice, left), images, fit_idx)
        for c in contestants:
            c.curve.append((c.seconds, c.images / len(fit_idx), c.validation_bpd(images, val_idx)))
        load.append(os.getloadavg()[0])
        print(f"  {quarter}/4: " + ", ".join(f"{c.curve[-1][2]:.3f}" for c in contestants)
              + f"; load {load[-1]:.2f}", flush=True)
    table = results_table(contestants, len(fit_idx))
    note = (f"Budget {args.budget:.0f} s of training per setting, in turns of {args.slice:.0f} s; "
            f"load average {min(load):.2f} to {max(load):.2f} on {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} threads.")
    print("\n" + table + "\n\n" + note)
    vae_anime.write_text_atomically(args.out / "results.md", table + "\n\n" + note + "\n")
    vae_anime.write_text_atomically(args.out / "results.json", json.dumps(
        {"load": load, "budget_s": args.budget, "contestants": [
            {"name": c.name, "lr": c.lr, "lr_decay": c.lr_decay, "images": c.images,
             "seconds": c.seconds, "curve": c.curve} for c in contestants]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
