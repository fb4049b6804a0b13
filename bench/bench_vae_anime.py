"""Training images/s of vae_anime.py's default model: our cached-tensor data path against the
common torchvision ImageFolder + DataLoader pipeline that decodes and resizes every image each
epoch. Same model, batch size, optimiser and machine, measured in one run; printed as a ratio.

    python bench/bench_vae_anime.py [--steps 60] [--loader-workers 2]

Our path is timed from an empty cache, so the one-off decode is reported too (later runs load
the cache in well under a second).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import vae_anime  # noqa: E402  (first: it sets the OpenMP wait policy before torch starts)

import torch  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402


def train_step(model, opt, x, noise_gen):
    noise = torch.randn((len(x), model.to_moments.out_features // 2), generator=noise_gen)
    logits, mu, logvar = model(x, noise)
    recon, kl = vae_anime.loss_terms(logits, x, mu, logvar)
    loss = (recon + kl).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def time_steps(batches, steps, warmup, image_size):
    """Run `warmup + steps` training steps; returns (seconds, seconds waiting for data) of the
    timed ones. `batches` yields float batches and is consumed lazily, so waiting is measured."""
    torch.manual_seed(0)
    model = vae_anime.VAE(128, image_size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    noise_gen = torch.Generator().manual_seed(1)
    total = data = 0.0
    for i in range(warmup + steps):
        start = time.perf_counter()
        x = next(batches)
        got = time.perf_counter()
        train_step(model, opt, x, noise_gen)
        if i >= warmup:
            total += time.perf_counter() - start
            data += got - start
    return total, data


def cached_batches(images, batch_size, seed=0):
    """Our path: random batches sliced from the uint8 tensor and scaled, epoch after epoch."""
    epoch = 0
    while True:
        order = vae_anime.epoch_order(len(images), seed, epoch)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield vae_anime.to_float(images[order[i:i + batch_size]])
        epoch += 1


def imagefolder_batches(data_dir, image_size, batch_size, workers):
    """The common approach: ImageFolder + DataLoader, decode + resize + ToTensor per image."""
    root = Path(tempfile.mkdtemp(prefix="bench-imagefolder-"))
    (root / "faces").symlink_to(data_dir.resolve())      # ImageFolder wants one class folder
    dataset = datasets.ImageFolder(root, transform=transforms.Compose([
        transforms.Resize((image_size, image_size), antialias=True), transforms.ToTensor()]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0)
    while True:
        for x, _ in loader:
            yield x


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=ROOT / vae_anime.DEFAULT_DATA_DIR)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=vae_anime.parse_args([]).batch_size)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--loader-workers", type=int, default=2)
    args = p.parse_args()
    try:
        vae_anime.list_image_files(args.data_dir)
    except vae_anime.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"default model, batch {args.batch_size}, {args.image_size}px, {args.steps} timed "
          f"steps after {args.warmup} warm-up steps each")

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        images, info = vae_anime.load_images(args.data_dir, args.image_size, Path(cache),
                                             workers=min(2, os.cpu_count() or 1))
        decode_s = time.perf_counter() - start
    ours, ours_data = time_steps(cached_batches(images, args.batch_size), args.steps,
                                 args.warmup, args.image_size)
    plain, plain_data = time_steps(
        imagefolder_batches(args.data_dir, args.image_size, args.batch_size, args.loader_workers),
        args.steps, args.warmup, args.image_size)

    n = args.steps * args.batch_size
    print(f"\n{'pipeline':<44} {'images/s':>9} {'data share of a step':>21}")
    print(f"{'ours: cached uint8 tensor, sliced per batch':<44} {n / ours:9.0f} "
          f"{100 * ours_data / ours:20.2f}%")
    print(f"{'ImageFolder + DataLoader (' + str(args.loader_workers) + ' workers)':<44} "
          f"{n / plain:9.0f} {100 * plain_data / plain:20.2f}%")
    print(f"\nratio ours / plain: {plain / ours:.2f}x (target >= 2x); our data path is "
          f"{100 * ours_data / ours:.2f}% of a training step (target < 10%)")
    print(f"one-off decode of {info['images']} images into the cache: {decode_s:.1f} s "
          f"({info['images'] / decode_s:.0f} images/s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
