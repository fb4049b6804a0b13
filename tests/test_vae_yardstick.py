"""Tests for vae_anime.py's yardstick: the discretized likelihood, bits per dimension, the
importance-weighted bound, the density baselines and the verdict, then two tiny runs of the
script (default likelihood and Bernoulli) on real faces. Nothing is mocked.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import vae_anime
from test_vae_anime import small, subset  # noqa: F401  (120 real faces)

ROOT = Path(__file__).resolve().parent.parent
LEVELS = torch.arange(256, dtype=torch.float32) / 255


# --------------------------------------------------------------------------------------
# The discretized logistic likelihood
# --------------------------------------------------------------------------------------


def test_the_256_levels_sum_to_one_for_random_parameters():
    gen = torch.Generator().manual_seed(0)
    mean = torch.rand(500, 1, generator=gen) * 1.4 - 0.2         # some outside [0, 1]
    log_scale = torch.rand(500, 1, generator=gen) * 10 - 8        # bins 1/255 wide: ±e^-8 .. e^2
    log_p = vae_anime.discretized_logistic_log_prob(LEVELS, mean, log_scale)
    total = torch.logsumexp(log_p.double(), dim=1).exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4), total.min()


def test_the_edge_bins_hold_the_tails():
    mean, log_scale = torch.tensor(0.3), torch.tensor(-2.0)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))                  # noqa: E731
    s, half = math.exp(-2.0), 0.5 / 255
    log_p = vae_anime.discretized_logistic_log_prob(LEVELS, mean, log_scale).double()
    assert log_p[0].exp().item() == pytest.approx(sigmoid((half - 0.3) / s), rel=1e-5)
    assert log_p[255].exp().item() == pytest.approx(1 - sigmoid((1 - half - 0.3) / s), rel=1e-4)
    inner = sigmoid((100 / 255 + half - 0.3) / s) - sigmoid((100 / 255 - half - 0.3) / s)
    assert log_p[100].exp().item() == pytest.approx(inner, rel=1e-5)


def test_extreme_parameters_give_finite_values_and_gradients():
    mean = torch.tensor([-5.0, 0.0, 0.5, 1.0, 6.0]).repeat(3)
    log_scale = torch.tensor([-12.0] * 5 + [0.0] * 5 + [6.0] * 5, requires_grad=True)
    x = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0]).repeat(3)
    log_p = vae_anime.discretized_logistic_log_prob(x, mean.requires_grad_(), log_scale)
    log_p.sum().backward()
    assert torch.isfinite(log_p).all() and torch.isfinite(log_scale.grad).all()
    assert (log_p <= 0).all()
    # A scale far below the bin width puts (almost) all mass on the bin of the mean.
    assert log_p[2].item() == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------------------
# The coupled mixture (PixelCNN++'s per-pixel distribution)
# --------------------------------------------------------------------------------------


def mixture_output(k, n, gen, log_scale_range=(-8.0, 2.0)):
    """n pixels of the decoder's 10k channels (as n 1×1 images): random weights, means partly
    outside [0, 1], log scales in `log_scale_range`, coupling logits of any size."""
    logits = torch.randn(n, k, 1, 1, generator=gen) * 3
    means = torch.rand(n, 3 * k, 1, 1, generator=gen) * 1.4 - 0.2
    lo, hi = log_scale_range
    log_scales = torch.rand(n, 3 * k, 1, 1, generator=gen) * (hi - lo) + lo
    coupling = torch.randn(n, 3 * k, 1, 1, generator=gen) * 3
    return torch.cat([logits, means, log_scales, coupling], dim=1)


@pytest.mark.parametrize("log_scales", [(-8.0, 2.0), (-14.0, -10.0), (5.0, 9.0)])
def test_each_coupled_conditional_sums_to_one_over_the_256_levels(log_scales):
    """p(R), p(G | R) and p(B | R, G) of every component, for random actual R and G; in
    float64, as float32's rounding of x − mean is a visible share of a scale below e^-10."""
    gen = torch.Generator().manual_seed(0)
    out = mixture_output(3, 200, gen, log_scales).double()
    _, means, scales, coupling = vae_anime.mixture_parts(out)
    r, g = (torch.randint(0, 256, (200, 1, 1, 1), generator=gen).double() / 255 for _ in range(2))
    shifted = vae_anime.coupled_means(means, coupling, r, g)            # 200×3×3×1×1
    log_p = vae_anime.discretized_logistic_log_prob(
        LEVELS.double().view(256, 1, 1, 1, 1, 1), shifted.unsqueeze(0), scales.unsqueeze(0))
    total = torch.logsumexp(log_p, dim=0).exp()                        # over the 256 levels
    assert torch.isfinite(log_p).all()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4), total.min()
    # The coupling uses the actual R and G: G's mean moved by a·R, B's by b·R + c·G.
    torch.testing.assert_close(shifted[:, 1], means[:, 1] + coupling[:, 0] * r)
    torch.testing.assert_close(shifted[:, 2], means[:, 2] + coupling[:, 1] * r + coupling[:, 2] * g)


def test_the_mixture_matches_a_hand_sum_over_components_with_scipy():
    """With the conditionals above summing to 1, this makes the joint sum to 1 over 256³."""
    gen = torch.Generator().manual_seed(2)
    out = mixture_output(2, 5, gen, (-4.0, -1.0)).double()
    x = torch.randint(0, 256, (5, 3, 1, 1), generator=gen).double() / 255
    got = vae_anime.reconstruction_nats(out, x, "logistic-mixture")
    cdf = lambda v, m, s: scipy.stats.logistic.cdf(v, m, s)            # noqa: E731
    for i in range(5):
        o, (r, g, b) = out[i, :, 0, 0].numpy(), x[i, :, 0, 0].numpy()
        w = np.exp(o[:2]) / np.exp(o[:2]).sum()
        p = 0.0
        for k in range(2):
            m, ls, c = (o[start:start + 6].reshape(3, 2)[:, k] for start in (2, 8, 14))
            a, bb, cc = np.tanh(c)
            means = (m[0], m[1] + a * r, m[2] + bb * r + cc * g)
            prob = 1.0
            for v, mean, s in zip((r, g, b), means, np.exp(ls)):
                hi = 1.0 if v > 1 - 1e-9 else cdf(v + 0.5 / 255, mean, s)
                lo = 0.0 if v < 1e-9 else cdf(v - 0.5 / 255, mean, s)
                prob *= hi - lo
            p += w[k] * prob
        assert got[i].item() == pytest.approx(-math.log(p), rel=1e-6)


def test_draws_follow_the_mixture_and_the_coupling():
    """Many draws of one pixel: their mean is the distribution's mean (scales small, means
    inside [0, 1]), and G follows the drawn R with the component's coefficient."""
    k, n = 2, 20_000
    out = torch.zeros(1, 10 * k, 1, 1)
    out[0, :k] = torch.tensor([0.0, math.log(3)]).view(2, 1, 1)          # weights 1/4, 3/4
    out[0, k:4 * k] = torch.tensor([0.3, 0.6, 0.2, 0.6, 0.5, 0.4]).view(6, 1, 1)  # R, G, B
    out[0, 4 * k:7 * k] = -3.0
    out[0, 7 * k:] = torch.tensor([0.5, -0.5, 0, 0, 0, 0]).atanh().view(6, 1, 1)  # a = ±0.5
    draws = vae_anime.draw_pixels(out.expand(n, -1, -1, -1), "logistic-mixture",
                                  torch.Generator().manual_seed(0))[:, :, 0, 0]
    assert draws.shape == (n, 3)
    assert torch.equal(draws, (draws * 255).round() / 255)                # on the 256 levels
    mean = vae_anime.distribution_mean(out, "logistic-mixture")[0, :, 0, 0]
    torch.testing.assert_close(draws.mean(0), mean, atol=0.01, rtol=0)
    second = draws[draws[:, 0] > 0.5]                                   # almost all component 2
    slope = np.polyfit(second[:, 0].numpy(), second[:, 1].numpy(), 1)[0]
    assert slope == pytest.approx(-0.5, abs=0.1)                        # G moves with the drawn R


# --------------------------------------------------------------------------------------
# The importance-weighted bound
# --------------------------------------------------------------------------------------


def posterior_away_from_prior():
    """A small untrained model whose posterior is far from N(0, I), so the bound's density
    ratio matters, and a few real-looking images."""
    torch.manual_seed(0)
    model = vae_anime.VAE(latent_dim=8, image_size=32)
    with torch.no_grad():
        model.to_moments.bias[:8] += 1.5                              # means off the prior
        model.to_moments.bias[8:] -= 2.0                              # narrower than the prior
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    return model.eval(), images


@torch.no_grad()
def analytic_kl_elbo_bits(model, images, draws):
    """Per-draw −ELBO in bits with the KL in closed form: draws × images."""
    x = (images.float() / 255)
    mu, logvar = model.encode(x)
    z = mu + torch.randn((draws, *mu.shape)) * torch.exp(0.5 * logvar)
    recon = vae_anime.reconstruction_nats(model.decoder(z.flatten(0, 1)),
                                          x.repeat(draws, 1, 1, 1), model.likelihood)
    kl = vae_anime.kl_per_dimension(mu, logvar).sum(1)
    return (recon.view(draws, -1) + kl) / math.log(2)


def test_one_sample_bound_matches_the_analytic_kl_elbo_on_average():
    model, images = posterior_away_from_prior()
    idx = torch.arange(len(images)).repeat(500)                        # 500 draws per image
    iw = vae_anime.importance_weighted_bits(model, images, idx, 1, seed=3).view(500, -1)
    torch.manual_seed(4)
    elbo = analytic_kl_elbo_bits(model, images, 500)
    noise = torch.sqrt(iw.var(0) / 500 + elbo.var(0) / 500)
    assert ((iw.mean(0) - elbo.mean(0)).abs() < 4 * noise).all(), (iw.mean(0), elbo.mean(0), noise)
    assert vae_anime.kl_per_dimension(*model.encode((images.float() / 255))).sum() > 20


def test_more_samples_give_a_tighter_bound():
    model, images = posterior_away_from_prior()
    idx = torch.arange(len(images))
    one = vae_anime.importance_weighted_bits(model, images, idx.repeat(50), 1, seed=5).view(50, -1)
    many = vae_anime.importance_weighted_bits(model, images, idx, 50, seed=6)
    assert (many < one.mean(0) - 1).all(), (many, one.mean(0))


# --------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------


def test_uniform_baseline_is_exactly_8_bits_per_dimension():
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=gen)
    test = torch.randint(0, 256, (7, 3, 4, 4), dtype=torch.uint8, generator=gen)
    bits = vae_anime.baseline_bits(train, test, seed=0)
    assert (bits["uniform over 256 levels"] / 48 == 8.0).all()
    assert len(bits) == 5


def test_histogram_baseline_against_a_hand_count():
    # Two sub-pixels, three training images: values (0, 7), (0, 7), (5, 7).
    train = torch.tensor([[0, 7], [0, 7], [5, 7]], dtype=torch.uint8).view(3, 2, 1, 1)
    test = torch.tensor([[0, 9], [5, 7]], dtype=torch.uint8).view(2, 2, 1, 1)
    bits = vae_anime.histogram_bits(train, test)
    expected = [-math.log2(3 / 259) - math.log2(1 / 259), -math.log2(2 / 259) - math.log2(4 / 259)]
    assert bits.tolist() == pytest.approx(expected)


def test_gaussian_baseline_against_scipy_with_the_256_jacobian():
    rng = np.random.default_rng(0)
    train = rng.multivariate_normal([0.4, 0.5, 0.6], [[0.02, 0.01, 0], [0.01, 0.03, 0.005],
                                                      [0, 0.005, 0.01]], size=300)
    test = rng.uniform(0.2, 0.8, size=(5, 3))
    bits = vae_anime.gaussian_bits(torch.tensor(train, dtype=torch.float32),
                                   torch.tensor(test, dtype=torch.float32))
    ridge = np.eye(3) / (12 * 256**2)                 # the dequantization noise's variance
    mle = scipy.stats.multivariate_normal(train.mean(0), np.cov(train.T, bias=True) + ridge)
    expected = -mle.logpdf(test) / math.log(2) + 3 * 8
    assert bits.numpy() == pytest.approx(expected, abs=1e-3)


def test_dequantized_pixels_stay_inside_their_bins():
    images = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).view(1, 4, 1, 1).repeat(50, 1, 1, 1)
    y = vae_anime.dequantize(images, torch.Generator().manual_seed(0))
    low = images.flatten(1).float() / 256
    assert ((y >= low) & (y < low + 1 / 256)).all() and y.std(0).min() > 0.5 / 256 / 2


def test_codec_bits_are_the_file_sizes_with_headers():
    image = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    bits = vae_anime.codec_bits(image, format="PNG", optimize=True)
    assert 8 * 60 < bits.item() < 8 * 200           # a flat image is about 100 bytes of PNG


# --------------------------------------------------------------------------------------
# The verdict
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift, word", [(-0.3, "beats"), (0.0, "indistinguishable"),
                                         (0.3, "below")])
def test_each_verdict_branch_follows_the_interval(shift, word):
    rng = np.random.default_rng(0)
    dims, n = 3072, 400
    strongest = torch.tensor(rng.normal(5.0, 0.5, n)) * dims
    noise = rng.normal(0.0, 0.2, n)
    model = strongest + torch.tensor(shift + noise - noise.mean()) * dims   # mean gap −shift
    baselines = {"weak": strongest + dims, "strong": strongest}
    v = vae_anime.verdict(model, baselines, dims, seed=0)
    assert v["baseline"] == "strong" and v["claim"] == word
    assert v["ci95"][0] < v["gap"] < v["ci95"][1]
    assert v["gap"] == pytest.approx(-shift)


# --------------------------------------------------------------------------------------
# The script end to end
# --------------------------------------------------------------------------------------


def run_script(faces, out, *args):
    result = subprocess.run([sys.executable, str(ROOT / "vae_anime.py"), "--data-dir", str(faces),
                             "--out", str(out), "--epochs", "1", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((out / "metrics.json").read_text()), (out / "REPORT.md").read_text(), result


def test_a_bernoulli_run_writes_no_bits_per_dimension(small, tmp_path):
    metrics, report, _ = run_script(small, tmp_path, "--likelihood", "bernoulli",
                                    "--kl-weights", "1")
    assert metrics["yardstick"] is None
    assert "bpd" not in json.dumps(metrics)
    assert "no bits per dimension" in report
    assert not (tmp_path / "rate_distortion.png").exists()
