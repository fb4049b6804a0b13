"""A convolutional VAE on anime faces, trained with the KL term weighted 1, 100 and 0.

What it does
    Decodes every image of --data-dir (searched recursively: jpg, jpeg, png, webp; any size
    or mode) once into a cached uint8 tensor of RGB --image-size squares (antialiased), splits
    it 90/10 by seed, and trains one VAE per KL weight λ (5 stride-2 convolutions, 32..512
    channels, a 128-d latent, a mirrored transposed-convolution decoder, Bernoulli likelihood).
    Every λ gets the same seed, split, initial weights and epochs.

How to run
    python vae_anime.py                          # λ = 1, 100, 0 on data/anime_faces (2 CPU cores: 8 min)
    python vae_anime.py --kl-weight 1 --epochs 3 # one λ
    python vae_anime.py --resume                 # continue interrupted runs from their checkpoints
    python vae_anime.py --preset long            # 64×64, 100 epochs: for a GPU (bfloat16 there)
    torchrun --nproc_per_node=N vae_anime.py     # one VAE per λ, data-parallel over N processes
    python vae_anime.py --help                   # every flag, its default and what each preset sets

What it writes (all into --out, default figures/vae_anime/)
    REPORT.md, metrics.json, lambda_<λ>_{learning_curve,reconstructions,samples,interpolations,
    active_units,kl_per_dim}.png, lambda_comparison.png, checkpoints/lambda_<λ>.pt (everything
    needed to resume), cache/images_<size>px.pt (the decoded images; rebuilt when the files or
    the size change). Under torchrun only rank 0 writes.
Every file is written to a temporary name and renamed into place, so none is ever half-written.
Bad input (missing data, unreadable images, unwritable --out, invalid flags) and a diverging
loss stop with one line naming the problem and its fix, exit code 2. The first Ctrl-C (or
SIGTERM) stops between two training steps, saves a checkpoint, writes the figures so far and
exits 130; a second one stops at once without saving.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# OpenMP threads that spin while waiting make a training step 10-20x slower whenever another
# process shares the CPU (measured: 0.25 s vs 4 s per step on 2 loaded cores); idle ones sleep.
# libgomp reads this once, when torch loads, so it must be set before the import below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# ======================================================================================
# Config
# ======================================================================================


def setting(default, doc, parse=None, bare=None):
    """A Config field: its default, the one line that documents it (also its --help text),
    the function that parses its flag and the value the flag takes when given bare."""
    return field(default=default, metadata={"doc": doc, "parse": parse, "bare": bare})


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text):
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def kl_weight(text):
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"a KL weight must be a number >= 0, got {text}")
    return value


def kl_weight_list(text):
    weights = tuple(kl_weight(part) for part in text.split(",") if part.strip())
    if not weights or len(set(weights)) != len(weights):
        raise argparse.ArgumentTypeError(f"give distinct KL weights separated by commas, got {text!r}")
    return weights


def fraction(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def seed_int(text):
    value = int(text)
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {2**31 - 1}, got {text}")
    return value


def amp_mode(text):
    if text not in ("auto", "on", "off"):
        raise argparse.ArgumentTypeError(f"choose auto, on or off, got {text!r}")
    return text


def device_name(text):
    if text not in ("auto", "cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"choose auto, cpu or cuda, got {text!r}")
    return text


@dataclass(frozen=True)
class Config:
    """Every setting of a run, built once from the command line by build_config()."""
    data_dir: Path = setting(Path("data/anime_faces"), "folder of images, searched recursively", Path)
    out: Path = setting(Path("figures/vae_anime"), "output folder for everything", Path)
    cache_dir: Path = setting(None, "where the decoded-image cache lives (none: OUT/cache)", Path)
    image_size: int = setting(32, "side of the square images; a multiple of the encoder's total "
                                  "stride (32)", positive_int)
    latent_dim: int = setting(128, "dimensions of the latent z", positive_int)
    kl_weights: tuple = setting((1.0, 100.0, 0.0), "comma-separated KL weights λ, one model each",
                                kl_weight_list)
    epochs: int = setting(5, "passes over the training images per λ", positive_int)
    batch_size: int = setting(64, "images per optimisation step", positive_int)
    lr: float = setting(1e-3, "Adam learning rate of the first epoch", positive_float)
    lr_decay: float = setting(1.0, "factor applied to the learning rate after each epoch (1: constant)",
                              positive_float)
    test_fraction: float = setting(0.1, "share of the images held out as the test set", fraction)
    seed: int = setting(0, "seed of the split, the initial weights and every noise draw", seed_int)
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda", device_name)
    amp: str = setting("auto", "bfloat16 autocast in training: auto (on CUDA GPUs that support it, "
                               "float32 on the CPU), on (also bare --amp) or off; evaluation is "
                               "always float32", amp_mode, bare="on")
    workers: int = setting(min(2, os.cpu_count() or 1),
                           "processes decoding images when the cache is (re)built", positive_int)
    resume: bool = setting(False, "continue each λ from its checkpoint in OUT/checkpoints")

    @property
    def cache_folder(self):
        return self.cache_dir or self.out / "cache"


PRESETS = {
    "default": Config(),
    # For a GPU: 64×64 faces, enough epochs for sharp samples and a learning rate that decays
    # to 5% of its start; its own folder keeps the default results. CPU cost: docs/vae_anime.md.
    "long": Config(out=Path("figures/vae_anime_long"), image_size=64, epochs=100, lr_decay=0.97),
}
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
ARCHIVE_SUFFIXES = {".tar", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"}
ACTIVE_UNIT_VARIANCE = 0.01      # Burda et al. 2016: active when Var_x(E_q[z_d]) exceeds this
KL_ACTIVE_NATS = 0.01            # a second, KL-based count: mean KL of the dimension above this
LOG_EVERY = 50                   # steps between reads of the running loss (each read syncs)
N_FIXED_TEST = 32                # reconstructions of the same 32 test images for every λ
N_SAMPLES = 64                   # samples decoded from one fixed z ~ N(0, I)
N_PAIRS, N_STEPS = 4, 10         # interpolations: 4 pairs of test images, 10 steps each
CACHE_FORMAT = 1                 # bump when the decoding below changes
NOT_IN_METRICS = ("resume", "workers")   # settings that do not change a single number


def flag_help(f):
    """A field's doc, its default and the value of every preset that changes it."""
    def show(value):
        return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else value
    default = getattr(PRESETS["default"], f.name)
    changed = [f"preset {name}: {show(getattr(cfg, f.name))}" for name, cfg in PRESETS.items()
               if getattr(cfg, f.name) != default]
    return f"{f.metadata['doc']} (default: {show(default)}" + "".join(f"; {c}" for c in changed) + ")"


def parse_args(argv=None):
    """The command line -> a Config (every flag is a Config field, plus --preset and --kl-weight)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=list(PRESETS), default="default",
                   help="named settings that the flags below override: default, or long (64×64, 100 epochs, for a GPU) (default: default)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action="store_true", default=None, help=flag_help(f))
        elif f.metadata["bare"] is not None:
            p.add_argument(flag, type=f.metadata["parse"], default=None, help=flag_help(f),
                           nargs="?", const=f.metadata["bare"], metavar=f.name.upper())
        else:
            p.add_argument(flag, type=f.metadata["parse"], default=None, help=flag_help(f),
                           metavar=f.name.upper())
    p.add_argument("--kl-weight", type=kl_weight, default=None,
                   help="train a single λ (overrides --kl-weights; default: none)")
    args = p.parse_args(argv)
    try:
        return build_config(args)
    except ValueError as err:
        p.error(str(err))


def build_config(args):
    """The preset with the given flags replaced; the model checks that the image size fits it."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
             if getattr(args, f.name) is not None}
    if args.kl_weight is not None:
        given["kl_weights"] = (args.kl_weight,)
    cfg = dataclasses.replace(PRESETS[args.preset], **given)
    try:
        VAE(cfg.latent_dim, cfg.image_size)
    except ValueError as err:
        raise ValueError(f"argument --image-size: {err}") from None
    return cfg


# ======================================================================================
# Data: decode once into a cached uint8 tensor, split by seed
# ======================================================================================


def list_image_files(data_dir):
    if data_dir.is_file():
        fix = ("extract it and pass the folder" if data_dir.suffix.lower() in ARCHIVE_SUFFIXES
               else "pass the folder that holds it")
        raise UserError(f"--data-dir {data_dir} is a file, not a folder of images: {fix}")
    if not data_dir.is_dir():
        raise UserError(f"image folder {data_dir} does not exist: run `make data` "
                        "(or pass --data-dir with a folder of images)")
    files = sorted(p for p in data_dir.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(data_dir).parts))
    if not files:
        raise UserError(f"no .jpg/.jpeg/.png/.webp images in {data_dir}: run `make data` "
                        "(or pass --data-dir with a folder of images)")
    return files


def file_list_key(files, data_dir, size):
    """Hash of every file's relative path, byte size and mtime, plus the target size."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT} size {size}\n".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(data_dir)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decode_image(path, size):
    """One file -> (size×size×3 uint8 array or None if unreadable, whether it was upscaled)."""
    try:
        with Image.open(path) as im:
            # JPEG draft mode decodes straight at 1/2, 1/4 or 1/8 scale (never below `size`):
            # it is the DCT's own antialiased downscale and makes decoding ~1.5× faster.
            im.draft("RGB", (size, size))
            im.load()
            small = min(im.size) < size
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")   # transparent pixels become white, not black
                im = Image.new("RGB", rgba.size, (255, 255, 255))
                im.paste(rgba, mask=rgba.getchannel("A"))
            else:
                im = im.convert("RGB")
            side = min(im.size)        # centre square, so non-square pictures are not squashed
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.resize((size, size), Image.Resampling.BILINEAR,
                           box=(left, top, left + side, top + side))  # PIL filters antialias
            return np.asarray(im, dtype=np.uint8), small
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None, False


def _start_decoder():
    # The parent turns Ctrl-C and SIGTERM into its own exit and ends the pool (with SIGTERM);
    # a worker that inherited the parent's handlers would print a traceback for each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_chunk(job):
    paths, size = job
    return [decode_image(path, size) for path in paths]


def effective_workers(workers, n_files):
    """Below ~2,000 files a process pool costs more than it saves."""
    return workers if n_files >= 2000 else 1


def decode_images(files, size, workers):
    """Decode every file; `workers` processes share the work when there are enough files."""
    if effective_workers(workers, len(files)) == 1:
        return [decode_image(path, size) for path in tqdm(files, desc="decoding", leave=False,
                                                          disable=None)]
    chunks = [files[i:i + 500] for i in range(0, len(files), 500)]
    # Workers only run PIL and numpy, so forking after torch has started is safe.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                      else None)
    with ctx.Pool(workers, _start_decoder) as pool:
        results = []
        for part in tqdm(pool.imap(_decode_chunk, [(c, size) for c in chunks]), total=len(chunks),
                         desc="decoding", leave=False, disable=None):
            results.extend(part)
    return results


def read_cache(cache_path, key):
    """The cached images and their info when the cache exists and its key matches, else None."""
    if not cache_path.exists():
        return None
    try:
        cached = torch.load(cache_path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None             # a damaged cache is simply rebuilt
    return cached if cached.get("key") == key else None


def load_images(data_dir, size, cache_dir, workers=1, write_cache=True):
    """All images as an N×3×size×size uint8 tensor, from the cache when its key still matches."""
    files = list_image_files(data_dir)
    key = file_list_key(files, data_dir, size)
    cache_path = cache_dir / f"images_{size}px.pt"
    start = time.perf_counter()
    cached = read_cache(cache_path, key)
    if cached is not None:
        return cached["images"], dict(cached["info"], cache="hit", seconds=time.perf_counter() - start)
    decoded = decode_images(files, size, workers)
    names = [str(p.relative_to(data_dir)) for p in files]
    skipped = [n for n, (arr, _) in zip(names, decoded) if arr is None]
    upscaled = [n for n, (arr, small) in zip(names, decoded) if arr is not None and small]
    arrays = [arr for arr, _ in decoded if arr is not None]
    if not arrays:
        raise UserError(f"none of the {len(files)} image files in {data_dir} could be decoded "
                        f"(e.g. {name_some(names, 3)}): replace them or run `make data`")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    info = {"folder": str(data_dir), "files_found": len(files), "images": len(arrays),
            "skipped": skipped, "upscaled": upscaled, "image_size": size,
            "key": key, "decode_workers": effective_workers(workers, len(files))}
    seconds = time.perf_counter() - start
    try:
        if write_cache:
            save_torch_atomically({"key": key, "images": images, "info": info}, cache_path)
    except OSError as err:      # the images are in memory; only the next run pays again
        log.warning(f"warning: could not write the image cache {cache_path} "
                    f"({err.strerror or err}); pass a writable --cache-dir to skip decoding next time")
    return images, dict(info, cache="built", seconds=seconds)


def split_indices(n, fraction, seed):
    """Deterministic split: a seeded permutation, the first `fraction` of it is the test set."""
    n_test = max(2, round(n * fraction))
    if n - n_test < 2:
        raise UserError(f"only {n} readable images: need at least {n_test + 2} for a "
                        "train/test split; add images to --data-dir")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test]


def to_float(batch_uint8):
    return batch_uint8.float().div_(255)


@dataclass(frozen=True)
class Data:
    """The images on the device, the split, and what every λ is judged against."""
    images: torch.Tensor         # N×3×S×S uint8
    train_idx: torch.Tensor
    test_idx: torch.Tensor
    info: dict                   # where the images came from, what was skipped, cache hit or not
    fixed_test: torch.Tensor     # the test images every λ reconstructs and interpolates
    mean_image: torch.Tensor     # mean training image, the "no model" anchor
    z: torch.Tensor              # the fixed prior draws every λ decodes into samples
    anchors: dict                # test MSE of the mean image, the Bernoulli reconstruction floor


def prepare_data(cfg, device, ranks):
    """Under torchrun rank 0 builds the cache while the others wait, then they read it."""
    if not ranks.main:
        barrier(ranks)
    images, info = load_images(cfg.data_dir, cfg.image_size, cfg.cache_folder, cfg.workers,
                               write_cache=ranks.main)
    if ranks.main:
        barrier(ranks)
    log_data(info)
    images = images.to(device)                       # once; batches are sliced on the device
    train_idx, test_idx = (i.to(device) for i in split_indices(len(images), cfg.test_fraction,
                                                                 cfg.seed))
    # Summed in float64 straight from uint8: no float copy of the whole training set.
    mean_image = (images[train_idx].sum(0, dtype=torch.float64) / (255 * len(train_idx))).float().cpu()
    test_cpu = to_float(images[test_idx]).cpu()
    anchors = {"mean_image_mse": (test_cpu - mean_image).pow(2).mean().item(),
               "recon_floor": F.binary_cross_entropy(test_cpu, test_cpu, reduction="sum").item()
               / len(test_cpu)}
    return Data(images, train_idx, test_idx, info, to_float(images[test_idx[:N_FIXED_TEST]]),
                mean_image, fixed_z(cfg.latent_dim, cfg.seed, device), anchors)


def fixed_z(latent_dim, seed, device):
    return torch.randn(N_SAMPLES, latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)


# ======================================================================================
# Model and loss
# ======================================================================================


def keep_taps(layer, live):
    """Store only the kernel rows and columns `live` of a layer (None: the whole kernel)."""
    layer.live = live
    if live:
        layer.weight = nn.Parameter(layer.weight.detach()[:, :, live, live].contiguous())


class Conv2d(nn.Conv2d):
    """nn.Conv2d for inputs of a known side. When its output is a single pixel it keeps only
    the kernel taps that can meet the image and is one matrix multiply."""
    # The seed's deepest convolution maps 2×2 to 1×1 with a 4×4 kernel and padding 1: only the
    # kernel's 2×2 centre taps ever meet an image value. The other 12 multiply padding zeros,
    # get zero gradient and so never move under Adam; kept, they cost a 16-tap oneDNN
    # convolution, an 8 MB gradient and Adam's time on every step (docs/vae_anime.md, Speed).
    def __init__(self, c_in, c_out, kernel_size, stride, padding, side):
        super().__init__(c_in, c_out, kernel_size, stride, padding)  # torch's initialisation
        k, s, p = kernel_size, stride, padding
        # One output pixel (side + 2p - k < s) whose window holds the whole input (side + p <= k);
        # a kernel larger than the padded input (side + 2p < k) is left for torch to refuse.
        keep_taps(self, slice(p, p + side) if side + p <= k <= side + 2 * p < k + s else None)

    def forward(self, x):
        if self.live is None:
            return super().forward(x)
        return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d for inputs of a known side. When its input is a single pixel it keeps
    only the kernel taps that reach the output and is one matrix multiply."""
    # The mirror of Conv2d's single-pixel case, 1×1 to 2×2: tap i lands on output row i - p,
    # so the padding crops all but the taps [p, k - p).
    def __init__(self, c_in, c_out, kernel_size, stride, padding, side):
        super().__init__(c_in, c_out, kernel_size, stride, padding)  # torch's initialisation
        k, p = kernel_size, padding
        keep_taps(self, slice(p, k - p) if side == 1 and k > 2 * p else None)

    def forward(self, x):
        if self.live is None:
            return super().forward(x)
        out = (x.flatten(1) @ self.weight.flatten(1)).unflatten(1, self.weight.shape[1:])
        return out if self.bias is None else out + self.bias[:, None, None]


class VAE(nn.Module):
    """Stride-2 convolutions -> (μ, log σ²) of a Gaussian latent -> a mirrored decoder.
    The only place that knows the layers: the report and the image-size check read them here."""

    def __init__(self, latent_dim=128, image_size=32, channels=(32, 64, 128, 256, 512)):
        super().__init__()
        self.total_stride = 2 ** len(channels)                     # each layer halves the side
        if image_size % self.total_stride:
            raise ValueError(f"the encoder's strides divide the image side by {self.total_stride}, "
                             f"so it must be a multiple of {self.total_stride}, got {image_size}")
        widths = (3, *channels)
        sides = [image_size // 2 ** i for i in range(len(widths))]  # each layer's input side, going down
        down = [m for c_in, c_out, side in zip(widths, widths[1:], sides)
                for m in (Conv2d(c_in, c_out, 4, stride=2, padding=1, side=side), nn.LeakyReLU(0.2))]
        self.encoder = nn.Sequential(*down, nn.Flatten())
        flat = channels[-1] * sides[-1] ** 2
        self.to_moments = nn.Linear(flat, 2 * latent_dim)           # μ and log σ²
        up = [m for c_in, c_out, side in zip(widths[::-1], widths[::-1][1:], sides[::-1])
              for m in (ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, side=side),
                        nn.LeakyReLU(0.2))]
        self.decoder = nn.Sequential(nn.Linear(latent_dim, flat), nn.LeakyReLU(0.2),
                                     nn.Unflatten(1, (channels[-1], sides[-1], sides[-1])),
                                     *up[:-1])                      # logits of the Bernoulli means
        self.output = nn.Sigmoid()                                  # logits -> pixel means in [0, 1]

    def encode(self, x):
        mu, logvar = self.to_moments(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z):
        return self.output(self.decoder(z))

    def forward(self, x, noise):
        mu, logvar = self.encode(x)
        z = mu + noise * torch.exp(0.5 * logvar)                    # reparameterisation
        return self.decoder(z), mu, logvar


def loss_terms(logits, x, mu, logvar):
    """Per-image reconstruction and KL, in nats (vectors of length batch)."""
    # Reduction: both terms are summed per image (recon over the 3×H×W values, KL over the
    # latent dimensions); the training objective is the batch mean of recon + λ·KL.
    recon = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none").flatten(1).sum(1)
    return recon, kl_per_dimension(mu.float(), logvar.float()).sum(1)


def kl_per_dimension(mu, logvar):
    """KL(N(μ, σ²) ‖ N(0, 1)) of each latent dimension, in nats."""
    # Closed form: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", appendix B.
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


# ======================================================================================
# Training
# ======================================================================================


class StopRequested(Exception):
    """The first Ctrl-C or SIGTERM, acted on between two training steps; carries the run."""

    def __init__(self, run):
        super().__init__("stop requested")
        self.run = run


def epoch_order(n, seed, epoch):
    """Each epoch's shuffle comes from (seed, epoch) alone, so a resumed run replays it exactly
    and every torchrun rank draws the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def use_bf16(amp, device):
    """--amp auto: bfloat16 autocast on CUDA GPUs that support it, float32 on the CPU; on / off
    force it. On the 2-core build CPU (avx512_bf16) oneDNN's bfloat16 convolution gradients
    ran 1.1x faster than float32 when idle but up to 25x slower when another process shared
    the cores (docs/vae_anime.md), so the CPU default stays float32."""
    if amp != "auto":
        return amp == "on"
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def memory_format(device):
    """channels_last lets cuDNN skip layout conversions; on the CPU it measured slower here."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def run_settings(cfg, kl_weight, device, bf16):
    """The settings that define one run; a checkpoint made with other settings is not resumed."""
    return {"kl_weight": kl_weight, "seed": cfg.seed, "image_size": cfg.image_size,
            "latent_dim": cfg.latent_dim, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "lr_decay": cfg.lr_decay, "test_fraction": cfg.test_fraction, "amp": bf16,
            "device": device.type}


def empty_sums():
    return {"sums": [0.0, 0.0, 0.0], "n": 0}       # objective, recon, KL summed over images


def new_run(settings, data_key, device, ranks):
    torch.manual_seed(settings["seed"])         # the same initial weights for every λ
    model = VAE(settings["latent_dim"], settings["image_size"]).to(device,
                                                                  memory_format=memory_format(device))
    return {"model": model, "net": data_parallel(model, device, ranks),
            "optimizer": torch.optim.Adam(model.parameters(), lr=settings["lr"], fused=True),
            "settings": settings, "data_key": data_key, "epoch": 0, "step": 0,
            "partial": empty_sums(), "history": [],
            "noise_gen": torch.Generator(device=device).manual_seed(settings["seed"] + 1),
            "train_seconds": 0.0}


def save_checkpoint(run, path):
    """nanoGPT-style: everything needed to continue, including the mid-epoch position."""
    save_torch_atomically({
        "model": run["model"].state_dict(), "optimizer": run["optimizer"].state_dict(),
        "config": run["settings"], "data_key": run["data_key"], "epoch": run["epoch"],
        "step": run["step"], "partial": run["partial"], "history": run["history"],
        "noise_rng": run["noise_gen"].get_state(), "torch_rng": torch.get_rng_state(),
        "train_seconds": run["train_seconds"],
    }, path)


def resume_run(path, settings, data_key, device, ranks):
    """The run in `path`, checked against the current settings and data."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path} ({err}): delete it or drop --resume") from None
    changed = [f"{k} {ckpt['config'].get(k)} -> {v}" for k, v in settings.items()
               if ckpt["config"].get(k) != v]
    if changed:
        raise UserError(f"checkpoint {path} was made with other settings ({', '.join(changed)}): "
                        "use the same flags or drop --resume")
    if ckpt["data_key"] != data_key:
        raise UserError(f"checkpoint {path} was trained on other images: "
                        "use the same --data-dir or drop --resume")
    run = new_run(settings, data_key, device, ranks)
    try:
        run["model"].load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"checkpoint {path} holds weights of another shape (an older vae_anime.py "
                        "stored the single-pixel layers' whole kernels): "
                        "delete it or drop --resume") from None
    run["optimizer"].load_state_dict(ckpt["optimizer"])
    run["noise_gen"].set_state(ckpt["noise_rng"].cpu())     # generator states live on the CPU
    torch.set_rng_state(ckpt["torch_rng"].cpu())
    run.update(epoch=ckpt["epoch"], step=ckpt["step"], partial=ckpt["partial"],
               history=ckpt["history"], train_seconds=ckpt["train_seconds"], resumed=True)
    return run


def start_or_resume(cfg, kl_weight, data_key, device, bf16, ranks):
    settings, path = run_settings(cfg, kl_weight, device, bf16), checkpoint_path(cfg.out, kl_weight)
    if not (cfg.resume and path.exists()):
        return new_run(settings, data_key, device, ranks)
    run = resume_run(path, settings, data_key, device, ranks)
    log.info(f"λ={weight_tag(kl_weight)}: resuming from epoch {run['epoch']}"
             + (f", step {run['step']}" if run["step"] else "") + f" ({path})")
    return run


@contextlib.contextmanager
def stop_between_steps():
    """While training, the first Ctrl-C or SIGTERM only raises a flag that is checked between
    steps, so a checkpoint never holds half a step; a second one stops at once, unsaved."""
    flag = []

    def on_signal(signum, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if flag:        # the request came after the last step: honour it now
        raise KeyboardInterrupt


def train_epoch(run, data, ranks, stop):
    """One epoch from run["step"] on. Every rank takes its share of each global batch; the
    running sums stay on the device, read once per LOG_EVERY steps and at the end."""
    s = run["settings"]
    run["net"].train()
    # The rate depends on the epoch alone, so a resumed or extended run follows the same path.
    for group in run["optimizer"].param_groups:
        group["lr"] = s["lr"] * s["lr_decay"] ** run["epoch"]
    device, size = data.images.device, s["batch_size"]
    order = data.train_idx[epoch_order(len(data.train_idx), s["seed"], run["epoch"])]
    sums, n_before = torch.zeros(3, dtype=torch.float64, device=device), run["partial"]["n"]
    bar = tqdm(range(run["step"], math.ceil(len(order) / size)), leave=False,
               desc=f"λ={weight_tag(s['kl_weight'])} epoch {run['epoch'] + 1}",
               disable=None if ranks.main else True)
    for step in bar:
        if stop_requested(stop, ranks, step):
            raise StopRequested(add_partial(run, sums, ranks))
        batch = order[step * size:(step + 1) * size]
        sums += train_step(run, data.images, batch, ranks)
        run["step"], run["partial"]["n"] = step + 1, run["partial"]["n"] + len(batch)
        if run["step"] % LOG_EVERY == 0 and not bar.disable:
            seen = run["partial"]["n"] - n_before
            bar.set_postfix(objective=f"{sums[0].item() * ranks.world / seen:.1f}")
    objective, recon, kl = add_partial(run, sums, ranks)["partial"]["sums"]
    n = run["partial"]["n"]
    return {"objective": objective / n, "recon": recon / n, "kl": kl / n,
            "neg_elbo": (recon + kl) / n}


def train_step(run, images, batch, ranks):
    """One optimisation step on this rank's share of the global batch `batch` (image indices);
    returns the share's summed (objective, recon, KL) on the device, without a host sync."""
    s, device = run["settings"], images.device
    noise = torch.randn((len(batch), s["latent_dim"]), generator=run["noise_gen"], device=device)
    x = to_float(images[batch[ranks.rank::ranks.world]])
    with autocast(device, s["amp"]):
        logits, mu, logvar = run["net"](x.contiguous(memory_format=memory_format(device)),
                                        noise[ranks.rank::ranks.world])
    recon, kl = loss_terms(logits, x, mu, logvar)
    objective = recon + s["kl_weight"] * kl
    # This rank's share of the global batch mean; DDP averages the ranks' gradients.
    loss = objective.sum() * (ranks.world / len(batch))
    run["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    run["optimizer"].step()
    return torch.stack([objective.sum(), recon.sum(), kl.sum()]).detach().double()


def add_partial(run, sums, ranks):
    """Fold this epoch's device sums, added up over the ranks, into the run's partial sums."""
    totals = sum_across(sums, ranks).tolist()
    run["partial"]["sums"] = [a + b for a, b in zip(run["partial"]["sums"], totals)]
    return run


def train(run, data, epochs, ranks, ckpt_path, stop):
    """Train to `epochs`, evaluating and checkpointing after each; a stop request checkpoints
    the step reached, so resuming replays the rest of the epoch exactly. Non-finite numbers
    never reach a checkpoint."""
    s = run["settings"]
    while run["epoch"] < epochs:
        start, seconds_before = time.perf_counter(), run["train_seconds"]
        try:
            train_stats = train_epoch(run, data, ranks, stop)
        except StopRequested:
            refuse_non_finite(run, {"objective": sum(run["partial"]["sums"])}, {}, ckpt_path)
            run["train_seconds"] = seconds_before + time.perf_counter() - start
            if ranks.main:
                save_checkpoint(run, ckpt_path)
            raise
        test_stats = evaluate(run["model"], data.images, data.test_idx, s["kl_weight"], s["seed"], ranks)
        refuse_non_finite(run, train_stats, test_stats, ckpt_path)
        seconds = time.perf_counter() - start
        run.update(history=run["history"] + [{"epoch": run["epoch"] + 1, "train": train_stats,
                                              "test": scalars(test_stats)}],
                   epoch=run["epoch"] + 1, step=0, train_seconds=seconds_before + seconds,
                   partial=empty_sums(), saved=True)
        if ranks.main:
            save_checkpoint(run, ckpt_path)
        log_epoch(run, epochs, train_stats, test_stats, seconds)
    return run


def refuse_non_finite(run, train_stats, test_stats, ckpt_path):
    """A NaN or inf anywhere stops the run before it can be saved; says what the checkpoint holds."""
    bad = {k: v for k, v in (train_stats | scalars(test_stats)).items() if not math.isfinite(v)}
    if not bad:
        return
    if not ckpt_path.exists():
        kept = "no checkpoint was written"
    elif run.get("saved") or run.get("resumed"):
        kept = f"{ckpt_path} still holds the last good state (epoch {run['epoch']})"
    else:
        kept = f"{ckpt_path}, from an earlier run, is left untouched"
    raise UserError(f"training diverged at λ={weight_tag(run['settings']['kl_weight'])} in epoch "
                    f"{run['epoch'] + 1} (non-finite {', '.join(sorted(bad))}): lower --lr; "
                    f"nothing of this epoch was saved, {kept}")


# ======================================================================================
# Evaluation and pictures
# ======================================================================================


@torch.no_grad()
def evaluate(model, images, idx, kl_weight, seed, ranks=None, batch_size=512):
    """On the test images, always in float32: objective, true neg-ELBO (λ = 1), recon, KL, MSE
    of the posterior-mean reconstruction, KL per latent dimension, and active units (Burda et
    al. 2016: dimensions whose posterior mean varies across the images with variance > 0.01).
    One seeded noise draw, so it is repeatable; under torchrun each rank takes a share."""
    ranks = ranks or Ranks()
    model.eval()
    d, device = model.to_moments.out_features // 2, images.device
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(3 + 3 * d, dtype=torch.float64, device=device)
    for start in range(0, len(idx), batch_size):
        chunk = idx[start:start + batch_size]
        noise = torch.randn((len(chunk), d), generator=noise_gen, device=device)[ranks.rank::ranks.world]
        x = to_float(images[chunk[ranks.rank::ranks.world]])
        with torch.autocast(device.type, enabled=False):
            mu, logvar = model.encode(x)
            recon, kl = loss_terms(model.decoder(mu + noise * torch.exp(0.5 * logvar)), x, mu, logvar)
            mse = (model.decode(mu) - x).pow(2).flatten(1).mean(1)
        parts = [torch.stack([recon.sum(), kl.sum(), mse.sum()]),
                 kl_per_dimension(mu, logvar).sum(0), mu.sum(0), mu.pow(2).sum(0)]
        sums += torch.cat([p.double() for p in parts])
    totals = sum_across(sums, ranks) / len(idx)
    mu_mean, mu_sq = totals[3 + d:3 + 2 * d], totals[3 + 2 * d:]
    out = dict(zip(("recon", "kl", "mse"), totals[:3].tolist()))
    out["neg_elbo"] = out["recon"] + out["kl"]
    out["objective"] = out["recon"] + kl_weight * out["kl"]
    out["kl_per_dim"] = totals[3:3 + d].tolist()
    out["mu_variance_per_dim"] = (mu_sq - mu_mean.pow(2)).clamp_min(0).tolist()
    out["active_units"] = sum(v > ACTIVE_UNIT_VARIANCE for v in out["mu_variance_per_dim"])
    out["kl_active_dims"] = sum(v > KL_ACTIVE_NATS for v in out["kl_per_dim"])
    return out


def scalars(stats):
    """The numbers of an evaluation without its per-dimension lists."""
    return {k: v for k, v in stats.items() if not isinstance(v, list)}


@torch.no_grad()
def interpolate(model, x_a, x_b, steps=N_STEPS):
    """Decoded points on the line between the posterior means of x_a and x_b (endpoints included)."""
    mu_a, mu_b = model.encode(x_a[None])[0], model.encode(x_b[None])[0]
    t = torch.linspace(0, 1, steps, device=mu_a.device)[:, None]
    return model.decode((1 - t) * mu_a + t * mu_b)


@torch.no_grad()
def run_pictures(model, fixed_test, z):
    """Reconstructions (posterior means), samples and interpolation rows, on the CPU as floats."""
    model.eval()
    recons = model.decode(model.encode(fixed_test)[0])
    samples = model.decode(z)
    pairs = []
    for i in range(min(N_PAIRS, len(fixed_test) // 2)):
        a, b = fixed_test[2 * i], fixed_test[2 * i + 1]
        pairs.append(torch.cat([a[None], interpolate(model, a, b), b[None]]))
    return {"recons": recons.float().cpu(), "samples": samples.float().cpu(),
            "pairs": [p.float().cpu() for p in pairs]}


def edge_energy(x):
    """Mean absolute difference between neighbouring pixels: a simple sharpness measure."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()).item() / 2


def picture_stats(pictures, fixed_test, mean_image):
    """Sharpness relative to the real images, and how close samples sit to the mean face."""
    real = edge_energy(fixed_test)
    samples = pictures["samples"]
    return {"recon_sharpness": edge_energy(pictures["recons"]) / real,
            "sample_sharpness": edge_energy(samples) / real,
            "sample_mse_to_mean_image": (samples - mean_image).pow(2).mean().item(),
            "sample_pixel_std": samples.std(0).mean().item()}


def finish_run(run, test, data, out):
    """Write the figures of a trained (or interrupted) run; returns its metrics entry."""
    w = run["settings"]["kl_weight"]
    pictures = run_pictures(run["model"], data.fixed_test, data.z)
    write_run_figures(out, w, run["history"], pictures, data.fixed_test, test)
    return {"kl_weight": w, "epochs": run["epoch"], "test": scalars(test),
            "kl_per_dim": test["kl_per_dim"], "mu_variance_per_dim": test["mu_variance_per_dim"],
            "pictures": picture_stats(pictures, data.fixed_test.float().cpu(), data.mean_image),
            "history": run["history"]}, pictures


# ======================================================================================
# Main: the steps of a run
# ======================================================================================


def main(argv=None):
    return exit_code(run, parse_args(argv))


def run(cfg):
    with sigterm_as_interrupt(), process_group(cfg.device) as (ranks, device):
        return run_all(cfg, ranks, device)


def run_all(cfg, ranks, device):
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    matplotlib.use("Agg")                # figures go to files, even where a display exists
    bf16 = use_bf16(cfg.amp, device)
    if ranks.main:
        check_writable(cfg.out)
    seed_everything(cfg.seed)
    data = prepare_data(cfg, device, ranks)
    log_plan(cfg, data, device, bf16, ranks)
    entries, pictures, train_s = [], {}, {}
    for w in cfg.kl_weights:
        try:
            trained = train_one_weight(cfg, w, data, device, bf16, ranks)
        except StopRequested as stopped:
            return finish_interrupted(cfg, stopped.run, data, ranks)
        test = evaluate(trained["model"], data.images, data.test_idx, w, cfg.seed, ranks)
        train_s[weight_tag(w)] = trained["train_seconds"]
        if ranks.main:
            entry, pictures[w] = finish_run(trained, test, data, cfg.out)
            entries.append(entry)
    if ranks.main:
        write_summary(cfg, data, entries, pictures,
                      timing(device, bf16, ranks, data, train_s, started, load_before))
    return 0


def train_one_weight(cfg, kl_weight, data, device, bf16, ranks):
    trained = start_or_resume(cfg, kl_weight, data.info["key"], device, bf16, ranks)
    with stop_between_steps() as stop:
        return train(trained, data, cfg.epochs, ranks, checkpoint_path(cfg.out, kl_weight), stop)


def finish_interrupted(cfg, stopped, data, ranks):
    """After a stop request: the checkpoint is saved; write this λ's figures so far, exit 130."""
    s = stopped["settings"]
    test = evaluate(stopped["model"], data.images, data.test_idx, s["kl_weight"], s["seed"], ranks)
    if ranks.main:
        finish_run(stopped, test, data, cfg.out)
        print(f"interrupted: checkpoint saved to {checkpoint_path(cfg.out, s['kl_weight'])}, "
              f"figures so far in {cfg.out}; continue with --resume", file=sys.stderr)
    return 130


def write_summary(cfg, data, entries, pictures, run_timing):
    """The side-by-side figure, metrics.json and REPORT.md."""
    plot_comparison(pictures, data.fixed_test.float().cpu(), cfg.out / "lambda_comparison.png")
    metrics = collect_metrics(cfg, data, entries) | {"timing": run_timing}
    write_text_atomically(cfg.out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    report = build_report(metrics, VAE(cfg.latent_dim, cfg.image_size), cfg.out)
    write_text_atomically(cfg.out / "REPORT.md", report)
    log.info(f"done in {run_timing['total_s'] / 60:.1f} min: {cfg.out / 'REPORT.md'}, "
             f"{cfg.out / 'metrics.json'}")


def collect_metrics(cfg, data, entries):
    lambda_0 = next((e for e in entries if e["kl_weight"] == 0), None)
    config = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name not in NOT_IN_METRICS}
    config.update(cache_dir=cfg.cache_folder, kl_weights=list(cfg.kl_weights))
    return summarise({
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.items()},
        "data": {k: v for k, v in data.info.items() if k not in ("cache", "seconds", "decode_workers")}
        | {"train": len(data.train_idx), "test": len(data.test_idx)},
        "runs": entries,
        "anchors": {"mean_image_mse": data.anchors["mean_image_mse"],
                    "lambda_0_mse": lambda_0["test"]["mse"] if lambda_0 else None,
                    "recon_floor": data.anchors["recon_floor"]},
    })


def timing(device, bf16, ranks, data, train_s, started, load_before):
    return summarise({
        "device": str(device), "bf16_autocast": bf16, "processes": ranks.world,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "data_s": data.info["seconds"], "cache": data.info["cache"], "train_s": train_s,
        "total_s": time.perf_counter() - started,
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)})


def summarise(x):
    """Round floats for metrics.json (deterministic, so identical runs stay identical)."""
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, dict):
        return {k: summarise(v) for k, v in x.items()}
    if isinstance(x, list):
        return [summarise(v) for v in x]
    return x


# ======================================================================================
# Appendix A: figures
# ======================================================================================


def grid_image(images, nrow, pad=1):
    """N×3×H×W floats -> one H'×W'×3 array, `nrow` images per row, with a white gutter.
    (torchvision's make_grid would do; importing torchvision sets an environment variable.)"""
    n, c, h, w = images.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    canvas = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, image in enumerate(images.clamp(0, 1)):
        top, left = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
        canvas[:, top:top + h, left:left + w] = image
    return canvas.permute(1, 2, 0).numpy()


def show_grid(ax, images, nrow, title=None):
    ax.imshow(grid_image(images, nrow), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10)


def plot_learning_curve(history, kl_weight, path):
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("neg_elbo", "recon", "kl"),
                              ("negative ELBO (λ = 1), nats/image", "reconstruction, nats/image",
                               "KL(q(z|x) ‖ N(0, I)), nats/image")):
        ax.plot(epochs, [h["train"][key] for h in history], "o-", label="train")
        ax.plot(epochs, [h["test"][key] for h in history], "s--", label="test")
        if key == "neg_elbo" and kl_weight != 1:
            ax.plot(epochs, [h["test"]["objective"] for h in history], ":", color="grey",
                    label=f"test objective (λ = {weight_tag(kl_weight)})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Learning curve, λ = {weight_tag(kl_weight)} (train: running mean over the epoch)")
    save_figure_atomically(fig, path)


def plot_reconstructions(originals, recons, kl_weight, path):
    half = (len(originals) + 1) // 2
    rows = [originals[:half], recons[:half], originals[half:], recons[half:]]
    fig, ax = plt.subplots(figsize=(12, 3.4))
    show_grid(ax, torch.cat([r for r in rows if len(r)]), half,
              f"λ = {weight_tag(kl_weight)}: test images (rows 1, 3) and their reconstructions "
              "from the posterior mean (rows 2, 4)")
    save_figure_atomically(fig, path)


def plot_samples(samples, kl_weight, path):
    fig, ax = plt.subplots(figsize=(6, 6.3))
    show_grid(ax, samples, 8, f"λ = {weight_tag(kl_weight)}: 64 samples from one fixed z ~ N(0, I)")
    save_figure_atomically(fig, path)


def plot_interpolations(pairs, kl_weight, path):
    fig, ax = plt.subplots(figsize=(12, 1.1 * len(pairs) + 0.6))
    show_grid(ax, torch.cat(pairs), N_STEPS + 2,
              f"λ = {weight_tag(kl_weight)}: original, {N_STEPS} decoded steps between the "
              "two posterior means, original")
    save_figure_atomically(fig, path)


def plot_per_dimension(values, threshold, kl_weight, what, path):
    """One bar per latent dimension, sorted, with the threshold that makes a dimension count."""
    values = np.sort(np.asarray(values))[::-1]
    above = int((values > threshold).sum())
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.bar(np.arange(len(values)), np.maximum(values, 1e-5), width=1.0,
           color=np.where(values > threshold, "tab:blue", "tab:grey"))
    ax.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_yscale("log")
    ax.set_xlabel("latent dimension, sorted")
    ax.set_ylabel(f"{what['axis']}\n(below 1e-5 drawn at 1e-5)", fontsize=9)
    ax.set_title(f"λ = {weight_tag(kl_weight)}: {what['title']}, {above}/{len(values)} above "
                 "the threshold", fontsize=10)
    ax.legend(fontsize=8)
    save_figure_atomically(fig, path)


def plot_comparison(pictures_by_weight, fixed_test, path):
    weights = list(pictures_by_weight)
    fig, axes = plt.subplots(3, len(weights), figsize=(4.2 * len(weights), 9.5), squeeze=False,
                             gridspec_kw={"height_ratios": [6, 4, 1.4]})
    n = min(8, len(fixed_test))
    for col, w in enumerate(weights):
        pics = pictures_by_weight[w]
        show_grid(axes[0, col], pics["samples"][:36], 6, f"λ = {weight_tag(w)}: samples")
        show_grid(axes[1, col], torch.cat([fixed_test[:n], pics["recons"][:n]]), n // 2 or 1,
                  "test images (top) / reconstructions")
        if pics["pairs"]:
            show_grid(axes[2, col], torch.cat(pics["pairs"][:2]), N_STEPS + 2, "interpolations")
        else:
            axes[2, col].set_axis_off()
    fig.tight_layout()
    save_figure_atomically(fig, path)


def figure_paths(out, kl_weight):
    tag = weight_tag(kl_weight)
    return {name: out / f"lambda_{tag}_{name}.png"
            for name in ("learning_curve", "reconstructions", "samples", "interpolations",
                         "active_units", "kl_per_dim")}


def write_run_figures(out, kl_weight, history, pictures, fixed_test, test):
    paths = figure_paths(out, kl_weight)
    if history:
        plot_learning_curve(history, kl_weight, paths["learning_curve"])
    plot_reconstructions(fixed_test.float().cpu(), pictures["recons"], kl_weight, paths["reconstructions"])
    plot_samples(pictures["samples"], kl_weight, paths["samples"])
    if pictures["pairs"]:
        plot_interpolations(pictures["pairs"], kl_weight, paths["interpolations"])
    plot_per_dimension(test["mu_variance_per_dim"], ACTIVE_UNIT_VARIANCE, kl_weight,
                       {"axis": "variance of the posterior mean\nover the test images",
                        "title": "active units (Burda et al. 2016)"}, paths["active_units"])
    plot_per_dimension(test["kl_per_dim"], KL_ACTIVE_NATS, kl_weight,
                       {"axis": "mean KL over the test set, nats", "title": "KL per latent dimension"},
                       paths["kl_per_dim"])


# ======================================================================================
# Appendix B: the report
# ======================================================================================


def fmt(x, digits=1):
    return f"{x:,.{digits}f}"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def layer_label(layer):
    """A layer's name with what the report needs from it: kernel and stride, activation slope."""
    label = type(layer).__name__
    if hasattr(layer, "kernel_size"):
        label += f" {layer.kernel_size[0]}×{layer.kernel_size[1]}/{layer.stride[0]}"
    if getattr(layer, "live", None):
        label += f" (centre {layer.weight.shape[-2]}×{layer.weight.shape[-1]} taps)"
    if isinstance(layer, nn.LeakyReLU):
        label += f" {layer.negative_slope:g}"
    return label


def architecture_table(model, image_size):
    """(layer, output shape, parameters) rows, traced through the model with one dummy image."""
    rows = [("input image", (3, image_size, image_size), 0)]

    def walk(layers, x, prefix):
        for layer in layers:
            x = layer(x)
            if not isinstance(layer, nn.Flatten):
                rows.append((f"{prefix}{layer_label(layer)}", tuple(x.shape[1:]),
                             sum(p.numel() for p in layer.parameters())))
        return x

    with torch.no_grad():
        h = walk(model.encoder, torch.zeros(1, 3, image_size, image_size), "enc ")
        walk([model.to_moments], h, "enc (μ, log σ²) ")
        z = torch.zeros(1, model.to_moments.out_features // 2)
        rows.append(("z = μ + σ·ε", tuple(z.shape[1:]), 0))
        walk([model.output], walk(model.decoder, z, "dec "), "dec ")
    return rows


def unstored_taps(model):
    """Weights of the seed's 4×4 kernels that the single-pixel layers do not store."""
    return sum(m.weight.shape[:2].numel() * (math.prod(m.kernel_size) - m.weight.shape[2:].numel())
               for m in model.modules() if getattr(m, "live", None))


def describe_layers(layers):
    """'5 Conv2d (4×4, stride 2)' for the convolutions among `layers`, with their activation."""
    convs = [m for m in layers if hasattr(m, "kernel_size")]
    kinds = sorted({type(m).__name__ for m in convs})
    kernels = sorted({"×".join(map(str, m.kernel_size)) for m in convs})
    strides = sorted({str(m.stride[0]) for m in convs})
    acts = sorted({layer_label(m) for m in layers if isinstance(m, (nn.LeakyReLU, nn.ReLU, nn.GELU,
                                                                      nn.SiLU, nn.Tanh))})
    return (f"{len(convs)} {'/'.join(kinds)} layers ({', '.join(kernels)}, stride "
            f"{', '.join(strides)}) with {', '.join(acts) or 'no'} activations")


def model_section(metrics, model):
    cfg, anchors = metrics["config"], metrics["anchors"]
    rows = architecture_table(model, cfg["image_size"])
    table = markdown_table(["layer", "output shape", "parameters"],
                           [(n, "×".join(map(str, s)), f"{p:,}") for n, s, p in rows])
    return f"""## Model and loss

Encoder: {describe_layers(model.encoder)}, no pooling,
then a linear layer giving μ and log σ² of a {cfg['latent_dim']}-dimensional Gaussian.
Decoder: a linear layer, then {describe_layers(model.decoder)},
and a {type(model.output).__name__} output. {parameter_sentence(rows, unstored_taps(model))}

{table}

Loss per image: reconstruction summed over the 3×{cfg['image_size']}×{cfg['image_size']} values plus
λ·KL(q(z|x) ‖ N(0, I)) summed over the latent dimensions, averaged over the batch. The likelihood is
**Bernoulli** (binary cross-entropy on the sigmoid's logits): it matches a sigmoid output in [0, 1],
needs no noise scale — a Gaussian's fixed σ² would silently rescale the reconstruction term and so
act as a second KL weight, confounding the λ comparison — and it is the usual choice for this
assignment. Its cost: for pixels that are not 0 or 1 it is not a normalised density, so its minimum
is the pixels' own binary entropy, not 0 — on this test set that floor is
{fmt(anchors['recon_floor'])} nats/image, and "neg-ELBO" here is that of the Bernoulli model. Adam,
learning rate {cfg['lr']}{f" multiplied by {cfg['lr_decay']} after each epoch" if cfg['lr_decay'] != 1 else ""}, batch {cfg['batch_size']}
(fused Adam). Test numbers use one seeded posterior sample per
image; MSE and reconstructions use the posterior mean.
"""


def parameter_sentence(rows, unstored):
    stored = sum(p for _, _, p in rows)
    if not unstored:
        return f"{stored:,} parameters."
    return (f"{stored:,} parameters: the seed's layout has {stored + unstored:,}, but where a layer's "
            f"input or output is a single pixel only its kernel's centre taps ever meet an image "
            f"value, so the other {unstored:,} (zero gradient, never moved by Adam) are not stored.")


def results_section(metrics):
    anchors, latent = metrics["anchors"], metrics["config"]["latent_dim"]
    rows = [(weight_tag(r["kl_weight"]), fmt(r["test"]["neg_elbo"]), fmt(r["test"]["recon"]),
             fmt(r["test"]["kl"], 2), fmt(r["test"]["mse"], 4), f"{r['test']['active_units']}/{latent}",
             f"{r['test']['kl_active_dims']}/{latent}",
             fmt(r["history"][-1]["train"]["objective"]) if r["history"] else "–")
            for r in metrics["runs"]]
    rows.append(("anchor: mean training image", "", "", "", fmt(anchors["mean_image_mse"], 4), "", "", ""))
    if anchors.get("lambda_0_mse") is not None:
        rows.append(("anchor: λ = 0 model", "", "", "", fmt(anchors["lambda_0_mse"], 4), "", "", ""))
    table = markdown_table(["λ", "test neg-ELBO (nats)", "recon (nats)", "KL (nats)", "test MSE",
                            "active units", "KL-active dims", "train objective"], rows)
    return f"""## Results (test set, per image)

{table}

Active units follow Burda et al. (2016): a latent dimension d is active when the variance over
all test images of its posterior mean, Var_x(E_q[z_d]), exceeds {ACTIVE_UNIT_VARIANCE}
(figure `lambda_<λ>_active_units.png`). "KL-active dims" is a different count: dimensions whose
KL(q(z_d|x) ‖ N(0, 1)), averaged over the test images, exceeds {KL_ACTIVE_NATS} nats
(figure `lambda_<λ>_kl_per_dim.png`). The two need not agree: a dimension can carry KL without
being active (a posterior variance away from 1 while its mean stays put), and one whose mean
varies just above the threshold carries less than {KL_ACTIVE_NATS} nats. Training used
{"bfloat16 autocast" if metrics["timing"]["bf16_autocast"] else "float32"}; every test number is
computed in float32.
"""


def preprocessing_section(metrics):
    cfg, data = metrics["config"], metrics["data"]
    skipped = (f"{len(data['skipped'])} unreadable files were skipped ({name_some(data['skipped'])}). "
               if data["skipped"] else "No file was unreadable. ")
    upscaled = (f"{len(data['upscaled'])} images smaller than {cfg['image_size']}px were upscaled. "
                if data["upscaled"] else "")
    return f"""## Preprocessing

{data['files_found']:,} image files in `{data['folder']}` (searched recursively); {data['images']:,} decoded.
{skipped}{upscaled}Each image is converted to RGB (transparency over white), cropped to its central
square, resized to {cfg['image_size']}×{cfg['image_size']} with an antialiasing bilinear filter (JPEGs are first
decoded at a reduced DCT scale, PIL's draft mode) and scaled to [0, 1]. The decoded uint8 tensor is
cached, keyed by the file list (paths, sizes, mtimes) and the size. Split by seed {cfg['seed']}:
{data['train']:,} training and {data['test']:,} test images.
"""


def figures_section(metrics, out):
    lines = ["## Figures\n", "![the three λ side by side](lambda_comparison.png)\n"]
    for r in metrics["runs"]:
        tag = weight_tag(r["kl_weight"])
        lines.append(f"### λ = {tag}\n")
        lines += [f"![λ = {tag} {name.replace('_', ' ')}]({path.name})\n"
                  for name, path in figure_paths(out, r["kl_weight"]).items() if path.exists()]
    return "\n".join(lines)


def timing_section(timing):
    return f"""## Timing

Data: {fmt(timing['data_s'])} s (cache {timing['cache']}). Training:
{', '.join(f"λ = {w}: {fmt(s)} s" for w, s in timing['train_s'].items())}.
Load average before / after: {timing['load_before']} / {timing['load_after']} on {timing['cpus']} CPUs.
"""


def build_report(metrics, model, out):
    cfg, timing = metrics["config"], metrics["timing"]
    header = f"""# VAE on anime faces: the KL weight λ at {', '.join(weight_tag(r['kl_weight']) for r in metrics['runs'])}

Generated by `vae_anime.py` from `metrics.json`; every number below is measured in this run
({timing['device']}, {cfg['epochs']} epochs per λ, seed {cfg['seed']}, total {fmt(timing['total_s'] / 60)} min).
"""
    discussion_md = "## What the numbers say about the KL term\n\n" + discussion(metrics) + "\n"
    return "\n".join([header, preprocessing_section(metrics), model_section(metrics, model),
                      results_section(metrics), discussion_md, figures_section(metrics, out),
                      timing_section(timing)])


def discussion(metrics):
    """Sentences about the KL term, each conditional on what the measured numbers show."""
    runs = {r["kl_weight"]: r for r in metrics["runs"]}
    lines = [best_elbo_line(runs)]
    lines += [strong_kl_line(w, r, metrics) for w, r in sorted(runs.items(), reverse=True) if w > 1]
    if 0.0 in runs:
        lines.append(lambda_0_line(runs))
    lines.append("- Sharpness (mean neighbouring-pixel difference relative to real test images): "
                 + ", ".join(f"λ = {weight_tag(w)}: reconstructions {fmt(r['pictures']['recon_sharpness'], 2)}, "
                             f"samples {fmt(r['pictures']['sample_sharpness'], 2)}"
                             for w, r in runs.items()) + ". Below 1 means blurrier than the data.")
    return "\n".join(lines)


def best_elbo_line(runs):
    best = min(runs.values(), key=lambda r: r["test"]["neg_elbo"])
    verdict = (", as expected, since only λ = 1 optimises the ELBO itself." if best["kl_weight"] == 1
               else "; λ = 1 optimises the ELBO itself, so this run is probably undertrained."
               if 1.0 in runs else ".")
    return (f"- The lowest test negative ELBO (λ = 1 accounting) is at λ = {weight_tag(best['kl_weight'])}: "
            f"{fmt(best['test']['neg_elbo'])} nats/image" + verdict)


def strong_kl_line(w, r, metrics):
    """λ > 1: has the posterior collapsed, and are the samples just the mean face?"""
    latent, mean_mse = metrics["config"]["latent_dim"], metrics["anchors"]["mean_image_mse"]
    t, s = r["test"], r["pictures"]
    collapsed = t["active_units"] <= max(1, latent // 10)
    state = ("the posterior has collapsed onto the prior: no latent dimension's posterior mean "
             f"varies across images by more than {ACTIVE_UNIT_VARIANCE}" if t["active_units"] == 0 else
             "the posterior has largely collapsed onto the prior" if collapsed
             else "the posterior has not collapsed (many units stay active)")
    near_mean = s["sample_mse_to_mean_image"] < 0.5 * mean_mse
    samples = (f"Its samples sit close to the mean face (MSE to it {fmt(s['sample_mse_to_mean_image'], 4)}, "
               f"while real test images are {fmt(mean_mse, 4)} from it)." if near_mean else
               f"Its samples are not just the mean face (MSE to it {fmt(s['sample_mse_to_mean_image'], 4)} "
               f"vs {fmt(mean_mse, 4)} for real images).")
    return (f"- λ = {weight_tag(w)}: KL {fmt(t['kl'], 2)} nats/image with {t['active_units']}/{latent} "
            f"active units; {state}. Its test MSE is {fmt(t['mse'], 4)} against {fmt(mean_mse, 4)} for "
            "always predicting the mean training image"
            + (" — no better than the mean face" if t["mse"] >= 0.95 * mean_mse else "") + ". " + samples)


def lambda_0_line(runs):
    """λ = 0: does it reconstruct best, and what does dropping the KL term do to its samples?"""
    r0 = runs[0.0]
    sharpest = all(r0["test"]["mse"] < r["test"]["mse"] for w, r in runs.items() if w != 0)
    line = (f"- λ = 0 (a plain autoencoder with noise): test MSE {fmt(r0['test']['mse'], 4)}, "
            + ("the lowest of all runs, so its reconstructions are the most faithful" if sharpest
               else "not the lowest of all runs, so the numbers do not show it reconstructing best")
            + f" (edge sharpness {fmt(r0['pictures']['recon_sharpness'], 2)} of the real images'). ")
    if 1.0 not in runs:
        return line
    kl0, kl1 = r0["test"]["kl"], runs[1.0]["test"]["kl"]
    line += (f"Nothing pulls its posterior towards N(0, I): KL {fmt(kl0)} nats/image vs "
             f"{fmt(kl1)} at λ = 1, so " + ("prior draws land far from the codes the decoder "
                                             "was trained on" if kl0 > 2 * kl1 else
                                             "its codes are not much further from the prior than λ = 1's"))
    s0, s1 = r0["pictures"], runs[1.0]["pictures"]
    worse = [what for what, bad in (("blurrier", s0["sample_sharpness"] < s1["sample_sharpness"]),
                                    ("less varied", s0["sample_pixel_std"] < s1["sample_pixel_std"]))
             if bad]
    return line + (f". Its prior samples are {' and '.join(worse) if worse else 'neither blurrier nor less varied'}"
                   f" than λ = 1's (sharpness {fmt(s0['sample_sharpness'], 2)} vs "
                   f"{fmt(s1['sample_sharpness'], 2)}; pixel std across the 64 samples "
                   f"{fmt(s0['sample_pixel_std'], 3)} vs {fmt(s1['sample_pixel_std'], 3)}); whether they "
                   "look like faces is for the samples figure to show.")


# ======================================================================================
# Appendix C: this script's own plumbing (names, paths, log lines)
# ======================================================================================


def weight_tag(kl_weight):
    return f"{kl_weight:g}"


def checkpoint_path(out, kl_weight):
    return out / "checkpoints" / f"lambda_{weight_tag(kl_weight)}.pt"


def name_some(names, limit=5):
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def log_data(info):
    if info["cache"] == "hit":
        log.info(f"data: {info['images']} images of {info['image_size']}px from the cache "
                 f"({info['seconds']:.1f} s)")
    else:
        log.info(f"data: decoded {info['images']} of {info['files_found']} files in "
                 f"{info['seconds']:.1f} s ({info['files_found'] / info['seconds']:.0f} files/s, "
                 f"{info['decode_workers']} processes); cached")
    if info["skipped"]:
        log.warning(f"warning: skipped {len(info['skipped'])} unreadable or corrupt files: "
                    f"{name_some(info['skipped'])}")
    if info["upscaled"]:
        log.warning(f"warning: {len(info['upscaled'])} images smaller than {info['image_size']}px "
                    f"were upscaled (blurry): {name_some(info['upscaled'])}")


def log_plan(cfg, data, device, bf16, ranks):
    log.info(f"device {device} ({'bfloat16 autocast' if bf16 else 'float32'}, {ranks.world} "
             f"process{'es' if ranks.world > 1 else ''}); {len(data.train_idx)} train / "
             f"{len(data.test_idx)} test images; λ = {', '.join(map(weight_tag, cfg.kl_weights))}; "
             f"{cfg.epochs} epochs each")


def log_epoch(run, epochs, train_stats, test_stats, seconds):
    log.info(f"λ={weight_tag(run['settings']['kl_weight']):>4} epoch {run['epoch']:>3}/{epochs}  "
             f"train obj {train_stats['objective']:8.1f} neg-ELBO {train_stats['neg_elbo']:7.1f} | "
             f"test obj {test_stats['objective']:8.1f} neg-ELBO {test_stats['neg_elbo']:7.1f} "
             f"recon {test_stats['recon']:7.1f} KL {test_stats['kl']:6.1f}  ({seconds:.0f} s)")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; a plain run is rank 0 of 1."""
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0


@contextlib.contextmanager
def process_group(device_name):
    """Under torchrun (WORLD_SIZE > 1): join the process group (nccl on CUDA, gloo on the CPU)
    and take this rank's GPU; otherwise a plain single process. Yields (ranks, device)."""
    device = choose_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Ranks(), device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    if not ranks.main:
        log.setLevel(logging.ERROR)       # one log, from rank 0
    try:
        yield ranks, device
        # Rank 0 still writes figures and reports when the others are done; a gloo rank that
        # tore its group down first was seen to abort ("terminate called without an active
        # exception"), so every rank waits for the last one before leaving.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def data_parallel(model, device, ranks):
    """The module that training calls: DDP (gradients all-reduced) under torchrun, else the model."""
    if ranks.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                               if device.type == "cuda" else None)


def sum_across(tensor, ranks):
    """The tensor summed over all ranks (a copy; the tensor itself is left as it was)."""
    total = tensor.clone()
    if ranks.world > 1:
        dist.all_reduce(total)
    return total


def barrier(ranks):
    if ranks.world > 1:
        dist.barrier()


def stop_requested(flag, ranks, step):
    """Whether to stop before this step. Under torchrun the ranks agree every LOG_EVERY steps
    (one tiny all-reduce), so all of them stop at the same step."""
    if ranks.world == 1:
        return bool(flag)
    if step % LOG_EVERY:
        return False
    return bool(sum_across(torch.tensor([float(bool(flag))]), ranks).item())


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM behaves like Ctrl-C everywhere (training turns both into a stop between steps)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ======================================================================================
# Appendix: plumbing shared by rnn_covid.py and vae_anime.py
# Identical, byte for byte, in both scripts (tests/test_shared_plumbing.py compares them):
# the price of two standalone files. Change it in both or in neither.
# ======================================================================================
log = logging.getLogger(Path(__file__).stem)
WRITTEN = []  # every file this process has put in place, so an interrupted run can say what


class UserError(Exception):
    """Bad input the user can fix: reported as one line on stderr, exit code 2."""


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file private (0600); give the output the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
        WRITTEN.append(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes_atomically(path, data):
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"cannot create output folder {folder}: {blocker} is a file; "
                        "pass another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"cannot write to output folder {folder} ({err.strerror or err}): "
                        "pass a writable --out") from None


def choose_device(name):
    """'auto' takes CUDA when present; 'cuda' without a GPU is a user error, not a silent CPU run."""
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
    torch.backends.cudnn.benchmark = False
    # --------------------------------------------------------------------------------------


def setup_logging():
    # The log goes to stdout so that stderr holds nothing but an error's one line.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def exit_code(run, *args):
    """Run the script's steps; bad input -> one line and exit 2; Ctrl-C -> exit 130,
    naming truthfully what had already been written."""
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
# ======================================================================================
# End of shared plumbing
# ======================================================================================


if __name__ == "__main__":
    sys.exit(main())
