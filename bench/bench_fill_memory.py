"""What deterministic mode's NaN fill of every new tensor costs each script's training step.

torch.use_deterministic_algorithms(True) also sets
torch.utils.deterministic.fill_uninitialized_memory, so every torch.empty is filled with NaN.
This times Adam steps of each script's own model at its default shapes with the fill on and
off, interleaved in one run (so both settings see the same machine load), and prints the ratio.
    .venv/bin/python bench/bench_fill_memory.py [--rounds 8]
The VAE step uses a squared-error reconstruction: the fill's cost follows the allocations of
the model's forward and backward passes, not the likelihood.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import rnn_covid  # noqa: E402
import vae_anime  # noqa: E402


def rnn_step(cell, hidden, layers, windows=2048, L=10):
    model = rnn_covid.RiseClassifier(cell, 1, hidden, layers)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(windows, L, 1), torch.rand(windows).round()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def vae_step(batch=64):
    model = vae_anime.VAE()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, 3, 32, 32)

    def step():
        mu, logvar = model.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        recon = model.decoder(z)[:, :3]
        loss = (recon - x).square().sum((1, 2, 3)).mean() + vae_anime.kl_per_dimension(
            mu, logvar).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def time_steps(step, fill, n):
    torch.utils.deterministic.fill_uninitialized_memory = fill
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds per setting")
    rounds = p.parse_args().rounds
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    cases = {"rnn_covid LSTM, 64 units, 2,048 windows": (rnn_step("lstm", 64, 1), 20),
             "rnn_covid GRU, 64 units, 2,048 windows": (rnn_step("gru", 64, 1), 20),
             "rnn_covid LSTM, report preset (2 x 510)": (rnn_step("lstm", 510, 2, 256), 3),
             "vae_anime VAE, batch 64, 32x32": (vae_step(), 5)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds\n")
    print("| step | fill on (ms) | fill off (ms) | on / off |\n|---|---|---|---|")
    for name, (step, n) in cases.items():
        step()
        times = {True: [], False: []}
        for _ in range(rounds):
            for fill in (True, False):
                times[fill].append(time_steps(step, fill, n))
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"| {name} | {1e3 * on:.1f} | {1e3 * off:.1f} | {on / off:.2f} |")


if __name__ == "__main__":
    main()
