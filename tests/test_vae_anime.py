"""Tests for vae_anime.py, in pipeline order: config, data, model and loss, training,
evaluation, report, then the whole script end to end and its answers to bad input.

End-to-end tests run `python vae_anime.py` through subprocess on a few hundred real faces with
tiny budgets (one or two short epochs); nothing is mocked. With CI=true a missing data folder
fails the tests instead of skipping them.
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vae_anime

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "vae_anime.py"
FACES = ROOT / "data" / "anime_faces"
N_SUBSET = 300
FIGURES = ("learning_curve", "reconstructions", "samples", "interpolations")


def run_script(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-u", str(SCRIPT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)


def without_timing(path):
    metrics = json.loads(Path(path).read_text())
    metrics.pop("timing")
    return metrics


def assert_clean_error(result, *phrases):
    """Exit code 2, one line on stderr naming the problem, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


def files_under(folder):
    return sorted(p.relative_to(folder) for p in Path(folder).rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def subset(tmp_path_factory):
    """A few hundred real faces copied from data/anime_faces."""
    if not FACES.is_dir():
        message = "data/anime_faces is missing: run `make data`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("faces")
    for path in sorted(FACES.glob("*.jpg"))[:N_SUBSET]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def small(subset, tmp_path_factory):
    """120 of those faces, for runs that only need a few training steps."""
    folder = tmp_path_factory.mktemp("small")
    for path in sorted(subset.glob("*.jpg"))[:120]:
        shutil.copy(path, folder / path.name)
    return folder


DEFAULT_RUN = ("--epochs", 1, "--batch-size", 64, "--iw-samples", 8)


def finished_run(out, *args):
    result = run_script(*args, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


@pytest.fixture(scope="session")
def default_run(subset, tmp_path_factory):
    """The three default λ, one short epoch each, on the subset."""
    return finished_run(tmp_path_factory.mktemp("out"), "--data-dir", subset, *DEFAULT_RUN)


TWO_EPOCHS = ("--kl-weights", 1, "--batch-size", 8, "--epochs", 2)


@pytest.fixture(scope="session")
def two_epoch_run(small, tmp_path_factory):
    """λ = 1 for two uninterrupted epochs: what resumed and torchrun runs must reproduce."""
    return finished_run(tmp_path_factory.mktemp("two_epochs"), "--data-dir", small,
                        *TWO_EPOCHS)[0]


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def test_flags_replace_preset_fields():
    cfg = vae_anime.parse_args(["--epochs", "7", "--kl-weights", "2,0.5", "--lr", "3e-4", "--amp"])
    assert (cfg.epochs, cfg.kl_weights, cfg.lr, cfg.amp) == (7, (2.0, 0.5), 3e-4, "on")
    assert vae_anime.parse_args(["--amp", "off"]).amp == "off"
    assert vae_anime.parse_args(["--kl-weights", "5"]).kl_weights == (5.0,)


def test_preset_long_is_a_replacement_that_flags_override():
    cfg = vae_anime.parse_args(["--preset", "long", "--epochs", "5"])
    assert cfg == dataclasses.replace(vae_anime.PRESETS["long"], epochs=5)
    assert (cfg.image_size, cfg.out) == (64, Path("figures/vae_anime_long"))


def test_every_flag_states_its_own_default_and_the_presets_that_change_it():
    text = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout
    flat = " ".join(text.split()).split("options:", 1)[1]            # past the usage line
    defaults, long = vae_anime.Config(), vae_anime.PRESETS["long"]
    for f in dataclasses.fields(vae_anime.Config):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        shown = ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)
        # The help of this flag alone: from the flag to the next flag.
        own = flat[flat.index(" " + flag + " "):].split(" --", 2)[1]
        assert f"(default: {shown}" in own, (flag, own)
        changed = getattr(long, f.name) != value
        assert (f"preset long: {getattr(long, f.name)}" in own) == changed, (flag, own)


def test_image_size_check_comes_from_the_model():
    with pytest.raises(ValueError, match="multiple of 32"):
        vae_anime.VAE(image_size=48)
    # Four stride-2 layers instead of five: 48 becomes a valid size, without touching the check.
    assert vae_anime.VAE(image_size=48, channels=(32, 64, 128, 256)).total_stride == 16


def test_import_changes_no_backend_and_sets_the_wait_policy_before_torch_loads():
    """libgomp reads OMP_WAIT_POLICY once, when torch loads: it must be set by then (and a
    user's own value kept); importing the script must not switch matplotlib's backend."""
    code = ("import os, sys, matplotlib\n"
            "seen = []\n"
            "class Spy:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' and not seen:\n"
            "            seen.append(os.environ.get('OMP_WAIT_POLICY'))\n"
            "sys.meta_path.insert(0, Spy())\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import vae_anime\n"
            "print(seen[0], matplotlib.get_backend())\n")
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = {"PATH": "/usr/bin:/bin", "MPLBACKEND": "svg"} | ({"OMP_WAIT_POLICY": given}
                                                                if given else {})
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=True)
        assert result.stdout.split() == [expected, "svg"]


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def make_odd_images(folder):
    """Grayscale, RGBA, palette, small, non-square, in sub-folders, plus two broken files."""
    rng = np.random.default_rng(0)
    (folder / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), "L").save(folder / "gray.png")
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0] = 200                              # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "sub" / "clear.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE).save(folder / "sub" / "palette.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / "small.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(
        folder / "sub" / "deeper" / "wide.webp")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "UPPER.JPEG")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    full = (folder / "UPPER.JPEG").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (folder / "notes.txt").write_text("not an image")


def test_odd_modes_sizes_and_corrupt_files(tmp_path):
    make_odd_images(tmp_path / "imgs")
    images, info = vae_anime.load_images(tmp_path / "imgs", 32, tmp_path / "cache")
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    assert info["files_found"] == 8
    assert sorted(info["skipped"]) == ["corrupt.jpg", "truncated.jpg"]
    assert info["upscaled"] == ["small.jpg"]
    names = sorted(["gray.png", "small.jpg", "UPPER.JPEG", "sub/clear.png", "sub/palette.png",
                    "sub/deeper/wide.webp"])
    clear = images[names.index("sub/clear.png")]
    assert torch.all(clear == 255)                  # transparency composited over white
    gray = images[names.index("gray.png")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_cache_is_rebuilt_when_the_folder_or_size_changes(subset, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in sorted(subset.glob("*.jpg"))[:20]:
        shutil.copy(path, folder / path.name)
    first, info = vae_anime.load_images(folder, 32, tmp_path / "cache")
    assert info["cache"] == "built" and len(first) == 20
    again, info = vae_anime.load_images(folder, 32, tmp_path / "cache")
    assert info["cache"] == "hit" and torch.equal(first, again)
    shutil.copy(sorted(subset.glob("*.jpg"))[20], folder / "new.jpg")
    grown, info = vae_anime.load_images(folder, 32, tmp_path / "cache")
    assert info["cache"] == "built" and len(grown) == 21
    bigger, info = vae_anime.load_images(folder, 64, tmp_path / "cache")
    assert info["cache"] == "built" and bigger.shape == (21, 3, 64, 64)
    (folder / "new.jpg").unlink()
    _, info = vae_anime.load_images(folder, 32, tmp_path / "cache")
    assert info["cache"] == "built"


@pytest.mark.parametrize("garbage", [b"\x00\x13junk", b"", b"PK\x03\x04 half a zip"])
def test_a_damaged_cache_is_rebuilt_with_one_warning(subset, tmp_path, garbage):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "images_32px.pt").write_bytes(garbage)
    result = run_script("--data-dir", subset, "--out", tmp_path, "--kl-weights", 1,
                        "--epochs", 1, "--iw-samples", 2)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warnings = [line for line in result.stdout.splitlines() if " warning: " in line]
    assert len(warnings) == 1 and "rebuilding it" in warnings[0], result.stdout
    assert f"from {N_SUBSET} files" in result.stdout
    images, info = vae_anime.load_images(subset, 32, tmp_path / "cache")
    assert info["cache"] == "hit" and len(images) == N_SUBSET       # the rebuilt cache is whole


def test_split_is_deterministic_and_disjoint():
    train_a, test_a = vae_anime.split_indices(1000, 0.1, seed=3)
    train_b, test_b = vae_anime.split_indices(1000, 0.1, seed=3)
    assert torch.equal(train_a, train_b) and torch.equal(test_a, test_b)
    assert len(test_a) == 100 and len(set(train_a.tolist()) | set(test_a.tolist())) == 1000
    assert not torch.equal(vae_anime.split_indices(1000, 0.1, seed=4)[1], test_a)


# --------------------------------------------------------------------------------------
# Model and loss
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_encoder_decoder_shapes_and_zero_noise_decodes_the_mean(size):
    torch.manual_seed(0)
    model = vae_anime.VAE(latent_dim=16, image_size=size)
    x = torch.rand(4, 3, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 16)
    assert model.decode(mu).shape == (4, 3, size, size)
    logits, _, _ = model(x, torch.zeros(4, 16))
    assert logits.shape == (4, 10 * vae_anime.Config.components, size, size)
    torch.testing.assert_close(vae_anime.distribution_mean(logits, "logistic-mixture"),
                               model.decode(mu))
    noisy, _, _ = model(x, torch.ones(4, 16))
    assert not torch.allclose(noisy, logits)        # the noise does reach the decoder
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 512]


def test_loss_matches_hand_computed_value():
    x = torch.tensor([[0.0, 0.5, 1.0]])
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    recon, kl = vae_anime.loss_terms(logits, x, mu, logvar, "bernoulli")
    p = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0)]
    expected_recon = -sum(xi * math.log(pi) + (1 - xi) * math.log(1 - pi)
                          for xi, pi in zip((0.0, 0.5, 1.0), p))
    expected_kl = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - math.log(2))
    assert recon.item() == pytest.approx(expected_recon, rel=1e-6)
    assert kl.item() == pytest.approx(expected_kl, rel=1e-6)


def test_kl_is_zero_for_standard_normal_posterior():
    _, kl = vae_anime.loss_terms(torch.zeros(5, 10, 2, 2), torch.rand(5, 3, 2, 2),
                                 torch.zeros(5, 7), torch.zeros(5, 7), "logistic-mixture")
    assert torch.equal(kl, torch.zeros(5))


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def tiny_data(n=12):
    images = (torch.rand(n, 3, 32, 32) * 255).to(torch.uint8)
    train_idx, test_idx = vae_anime.split_indices(n, 0.25, seed=0)
    return vae_anime.Data(images, train_idx, test_idx, {"key": "k"}, None, None, None, None)


def tiny_training(amp=False, lr=1e-3):
    settings = vae_anime.RunSettings(kl_weight=1.0, seed=0, image_size=32, latent_dim=8,
                                     batch_size=4, lr=lr, lr_decay=1.0, test_fraction=0.25,
                                     amp=amp, device="cpu", likelihood="logistic-mixture",
                                     components=2)
    return vae_anime.new_training(settings, "k", torch.device("cpu"))


def test_bfloat16_training_step_runs_on_the_cpu_and_changes_the_weights():
    data, t = tiny_data(), tiny_training(amp=True)
    before = [p.detach().clone() for p in t.model.parameters()]
    sums = vae_anime.train_step(t, data.images, data.train_idx[:4])
    assert sums.dtype == torch.float64 and torch.isfinite(sums).all()
    assert any(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
    assert all(p.dtype == torch.float32 for p in t.model.parameters())


def test_a_diverging_epoch_is_not_saved(tmp_path):
    data, wild = tiny_data(), tiny_training(lr=1e30)
    with pytest.raises(vae_anime.UserError, match="training diverged.*no checkpoint was written"):
        vae_anime.train(wild, data, 2, tmp_path / "c.pt")
    assert not (tmp_path / "c.pt").exists()


def test_local_rank_beyond_the_visible_gpus_is_a_user_error():
    assert vae_anime.cuda_device_for(1, 2) == torch.device("cuda", 1)
    with pytest.raises(vae_anime.UserError, match="LOCAL_RANK 1 .* 1 CUDA device.*--device cpu"):
        vae_anime.cuda_device_for(1, 1)


# --------------------------------------------------------------------------------------
# Evaluation and pictures
# --------------------------------------------------------------------------------------


def test_interpolation_rows_run_between_the_decoded_posterior_means():
    torch.manual_seed(0)
    model = vae_anime.VAE(latent_dim=8).eval()
    fixed = torch.rand(4, 3, 32, 32)
    pairs = vae_anime.run_pictures(model, fixed, torch.zeros(2, 8), seed=0)["pairs"]
    assert len(pairs) == 2 and pairs[0].shape == (vae_anime.N_STEPS + 2, 3, 32, 32)
    with torch.no_grad():
        ends = model.decode(model.encode(fixed)[0])
    for i, row in enumerate(pairs):
        assert torch.equal(row[0], fixed[2 * i]) and torch.equal(row[-1], fixed[2 * i + 1])
        torch.testing.assert_close(row[1], ends[2 * i])
        torch.testing.assert_close(row[-2], ends[2 * i + 1])


def model_with_one_active_unit():
    """A 2-d latent: μ_0 follows the image, μ_1 is the constant 3 (large KL, zero variance)."""
    torch.manual_seed(0)
    model = vae_anime.VAE(latent_dim=2)
    with torch.no_grad():
        model.to_moments.weight.zero_()
        model.to_moments.bias.zero_()
        model.to_moments.weight[0] = torch.randn(model.to_moments.in_features) * 10
        model.to_moments.bias[1] = 3.0
    return model


def test_active_units_follow_burda_over_the_whole_test_split():
    model = model_with_one_active_unit()
    images = (torch.rand(10, 3, 32, 32) * 255).to(torch.uint8)
    idx = torch.arange(10)
    stats, per_dim = vae_anime.evaluate(model, images, idx, 1.0, seed=0, batch_size=4)
    with torch.no_grad():
        mu = model.encode((images.float() / 255))[0]
    expected = mu.double().var(0, unbiased=False)
    assert per_dim["mu_variance_per_dim"] == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-9)
    assert expected[0] > vae_anime.ACTIVE_UNIT_VARIANCE
    assert stats["active_units"] == 1                  # μ_1 never moves: not active ...
    assert per_dim["kl_per_dim"][1] == pytest.approx(4.5, rel=1e-4)
    assert stats["kl_active_dims"] == 2                # ... although it carries 4.5 nats of KL


def test_evaluation_is_float32_even_inside_autocast():
    model = model_with_one_active_unit()
    images = (torch.rand(6, 3, 32, 32) * 255).to(torch.uint8)
    plain = vae_anime.evaluate(model, images, torch.arange(6), 1.0, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = vae_anime.evaluate(model, images, torch.arange(6), 1.0, seed=0)
    assert inside == plain


def test_non_finite_numbers_are_refused_with_what_the_checkpoint_holds(tmp_path):
    ckpt = tmp_path / "lambda_1.pt"
    t = tiny_training()
    t.epoch = 2
    with pytest.raises(vae_anime.UserError, match="non-finite neg_elbo.*no checkpoint was written"):
        vae_anime.refuse_non_finite(t, {"objective": 1.0, "neg_elbo": math.nan}, ckpt)
    ckpt.write_bytes(b"earlier")
    with pytest.raises(vae_anime.UserError, match="from an earlier run, is left untouched"):
        vae_anime.refuse_non_finite(t, {"objective": math.inf}, ckpt)
    t.checkpointed = True
    with pytest.raises(vae_anime.UserError, match=r"still holds the last good state \(epoch 2\)"):
        vae_anime.refuse_non_finite(t, {"objective": math.inf}, ckpt)
    vae_anime.refuse_non_finite(t, {"objective": 1.0}, ckpt)


# --------------------------------------------------------------------------------------
# Report: every branch of the discussion
# --------------------------------------------------------------------------------------


def kl_metrics(yardstick, test_elbos=(6000.0, 5900.0)):
    history = [{"test": {"neg_elbo": e}} for e in test_elbos]
    return {"yardstick": yardstick, "runs": [{"kl_weight": 1.0, "history": history}]}


U = vae_anime.UNCOUPLED_IW_BPD


@pytest.mark.parametrize("gauss, bound, word, closed", [
    (4.8, U - 0.5 * (U - 4.8), "fewer", "closes 50% of the gap"),
    (4.8, U + 0.25 * (U - 4.8), "fewer", "widens 25% of the gap"), (7.2, 5.0, "more", "")])
def test_the_gaussian_is_weighed_against_the_bound(gauss, bound, word, closed):
    y = {"baselines": {"Gaussian, full covariance": gauss, "histogram per sub-pixel": 7.4},
         "iw": {"k": 50, "bpd": bound}, "dims": 3072}
    text = " ".join(vae_anime.gaussian_reading(kl_metrics(y)).split())
    assert f"{gauss:.3f} bits per dimension against λ = 1's bound {bound:.3f}: {word}." in text
    assert closed in text
    # 100 nats per image over 3,072 dimensions: 0.047 bits per dimension in the last epoch.
    assert "fell by 0.047 bits per dimension in the last epoch" in text
    assert vae_anime.gaussian_reading(kl_metrics(None)) == ""     # Bernoulli: no bpd


def test_a_rising_curve_is_said_to_rise():
    y = {"baselines": {"Gaussian, full covariance": 4.8}, "iw": {"k": 50, "bpd": 6.0},
         "dims": 3072}
    text = " ".join(vae_anime.gaussian_reading(kl_metrics(y, (5900.0, 6000.0))).split())
    assert "rose by 0.047 bits per dimension in the last epoch" in text


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def test_default_run_writes_every_output(default_run):
    out, result = default_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["kl_weight"] for r in metrics["runs"]] == [1.0, 100.0, 0.0]
    assert metrics["data"]["images"] == N_SUBSET and not metrics["data"]["skipped"]
    assert metrics["data"]["train"] + metrics["data"]["test"] == N_SUBSET
    for r in metrics["runs"]:
        assert len(r["history"]) == 1 and len(r["kl_per_dim"]) == 128
        tag = vae_anime.weight_tag(r["kl_weight"])
        assert all((out / f"lambda_{tag}_{name}.png").exists() for name in FIGURES)
        assert (out / "checkpoints" / f"lambda_{tag}.pt").exists()
    report = (out / "REPORT.md").read_text()
    elbo_1 = metrics["yardstick"]["models"]["1"]["elbo_bpd"]
    assert f"| VAE λ = 1, negative ELBO | {elbo_1:.3f} |" in report              # from the run
    mse = metrics["anchors"]["mean_image_mse"]
    assert f"| mean training image |  |  |  | {mse:.4f} |" in report
    ckpt = torch.load(out / "checkpoints" / "lambda_1.pt", weights_only=False)
    trained = sum(p.numel() for p in ckpt["model"].values())
    assert f"The model as PyTorch prints it, {trained:,} parameters" in report
    for needle in ("## Preprocessing", "(0): Conv2d(3, 32, kernel_size=(4, 4), stride=(2, 2)",
                   "discretized logistics", "lambda_comparison.png", "lambda_100_samples.png",
                   "(8): Conv2d(256, 512, kernel_size=(2, 2), stride=(1, 1))"):
        assert needle in report
    assert not list(out.rglob("*.tmp"))          # nothing half-written left behind
    assert "epoch   1/1" in result.stdout


def test_the_kl_weight_changes_what_is_learned(default_run):
    metrics = json.loads((default_run[0] / "metrics.json").read_text())
    runs = {r["kl_weight"]: r for r in metrics["runs"]}
    # After a few steps only the strong pull is reliable: λ = 1 and 0 trade places from run
    # to run under the discretized logistic (its distortion is ~10x the Bernoulli's in nats).
    assert runs[100.0]["test"]["kl"] < min(runs[1.0]["test"]["kl"], runs[0.0]["test"]["kl"])
    # λ = 100's posterior means stop following the image: fewer active units than λ = 1.
    assert runs[100.0]["test"]["active_units"] < runs[1.0]["test"]["active_units"]


def test_default_run_reports_bits_per_dimension_and_a_verdict(default_run):
    out, result = default_run                                  # with --iw-samples 8
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "REPORT.md").read_text()
    y = metrics["yardstick"]
    assert y["baselines"]["uniform over 256 levels"] == 8.0 and len(y["baselines"]) == 5
    assert set(y["models"]) == {"1", "100", "0"}
    for m in y["models"].values():
        assert m["elbo_bpd"] == pytest.approx(m["distortion_bpd"] + m["rate_bpd"], abs=1e-4)
    assert y["iw"]["k"] == 8 and 0 < y["iw"]["bpd"] < y["models"]["1"]["elbo_bpd"] + 0.01
    v = y["verdict"]
    assert v["baseline"] == min(y["baselines"], key=y["baselines"].get)
    lo, hi = v["ci95"]
    assert v["claim"] == ("beats" if lo > 0 else "below" if hi < 0 else "indistinguishable")
    assert lo <= v["gap"] <= hi
    assert "bits per dimension" in report and v["baseline"] in report
    assert "(k = 8)" in result.stdout                          # the table is printed too
    assert (out / "rate_distortion.png").exists()
    for needle in ("negative ELBO in nats / (3,072 · ln 2)", "(k = 8)", "Theis et al. 2016",
                   "headers included", "G's mean moves by a·R", "one draw from p(x|z)",
                   "| bits per dimension | distortion (bpd) | rate (bpd) | MSE | active units |",
                   "VQ-VAE, sec. 4.1", "IAF, table 2", "95% bootstrap interval"):
        assert needle in report, needle                        # what issue 14 asks of REPORT.md


def test_same_seed_gives_identical_metrics(default_run, subset):
    out, _ = default_run
    first = without_timing(out / "metrics.json")
    result = run_script("--data-dir", subset, "--out", out, *DEFAULT_RUN)
    assert result.returncode == 0, result.stderr
    assert "from the cache" in result.stdout
    assert without_timing(out / "metrics.json") == first


def test_corrupt_and_small_files_are_named_in_the_log(subset, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for path in sorted(subset.glob("*.jpg"))[:40]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"garbage")
    Image.new("RGB", (20, 20), (10, 200, 30)).save(folder / "tiny.png")
    result = run_script("--data-dir", folder, "--out", tmp_path / "out", "--kl-weights", 0,
                        "--epochs", 1)
    assert result.returncode == 0, result.stderr
    assert "1 unreadable or corrupt files were skipped: broken.jpg" in result.stdout
    assert "under 32px were upscaled: tiny.png" in result.stdout
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())["data"]
    assert (data["files_found"], data["images"], data["skipped"]) == (42, 41, ["broken.jpg"])


def test_64px_images_work_end_to_end(small, tmp_path):
    result = run_script("--data-dir", small, "--out", tmp_path, "--image-size", 64,
                        "--kl-weights", 1, "--epochs", 1, "--batch-size", 64)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["image_size"] == 64 and metrics["data"]["image_size"] == 64
    report = (tmp_path / "REPORT.md").read_text()     # at 64 px every layer is the seed's
    assert "(8): Conv2d(256, 512, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))" in report


def test_resume_continues_where_it_stopped(small, two_epoch_run, tmp_path):
    common = ("--data-dir", small, "--out", tmp_path, *TWO_EPOCHS)
    assert run_script(*common[:-1], 1).returncode == 0           # --epochs 1
    resumed = run_script(*common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch 1" in resumed.stdout
    a, b = (without_timing(x / "metrics.json") for x in (tmp_path, two_epoch_run))
    assert [h["epoch"] for h in a["runs"][0]["history"]] == [1, 2]
    assert a["runs"] == b["runs"]                 # resumed == uninterrupted, to the last digit


def test_torchrun_two_processes_follow_the_single_process_run(small, two_epoch_run, tmp_path):
    """Two gloo processes share each global batch of 8: after a resumed torchrun run the
    numbers equal one process's up to float noise, and one set of outputs is written."""
    common = ["--data-dir", small, "--kl-weights", 1, "--batch-size", 8, "--device", "cpu",
              "--out", tmp_path / "two"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                str(SCRIPT)]
    for extra in (["--epochs", 1], ["--epochs", 2, "--resume"]):
        result = subprocess.run(torchrun + [str(a) for a in common + extra], cwd=ROOT,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("done in") == 1 and "resuming from epoch 1" in result.stdout
    assert "2 processes" in result.stdout
    assert files_under(tmp_path / "two") == files_under(two_epoch_run)
    two, one = (without_timing(out / "metrics.json")["runs"][0]
                for out in (tmp_path / "two", two_epoch_run))
    for a, b in zip(two["history"] + [two], one["history"] + [one]):
        for key in ("neg_elbo", "recon", "kl", "mse"):
            assert a["test"][key] == pytest.approx(b["test"][key], rel=1e-4, abs=1e-3), key


# --------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written
# --------------------------------------------------------------------------------------


def test_missing_folder_says_make_data(tmp_path):
    assert_clean_error(run_script("--data-dir", tmp_path / "nope", "--out", tmp_path / "o"),
                       "does not exist", "make data")


def test_empty_folder_says_make_data(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_script("--data-dir", tmp_path / "empty", "--out", tmp_path / "o"),
                       "no .jpg", "make data")


def test_all_unreadable_folder(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"broken{i}.jpg").write_bytes(b"not an image at all")
    result = run_script("--data-dir", folder, "--out", tmp_path / "o")
    assert_clean_error(result, "none of the 3 image files", "broken0.jpg")
    assert files_under(tmp_path / "o") == []


def test_nan_loss_stops_and_keeps_last_good_checkpoint(default_run, subset, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    ckpt = out / "checkpoints" / "lambda_1.pt"
    before = ckpt.read_bytes(), (out / "metrics.json").read_bytes()
    result = run_script("--data-dir", subset, "--out", out, "--kl-weights", 1, "--epochs", 1,
                        "--lr", "1e30")
    assert_clean_error(result, "training diverged", "lower --lr",
                       "from an earlier run, is left untouched")
    assert (ckpt.read_bytes(), (out / "metrics.json").read_bytes()) == before


def test_unwritable_output_folder(subset, tmp_path):
    """A folder without write permission. Root writes through chmod, so as root the test uses
    /sys, where not even root may create files."""
    if os.geteuid() == 0:
        target = Path("/sys")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "out"
    result = run_script("--data-dir", subset, "--out", target)
    assert_clean_error(result, "cannot write to output folder", "--out")


@pytest.mark.parametrize("name", ["faces.tar", "face.jpg"])
def test_data_dir_that_is_a_file(subset, tmp_path, name):
    path = tmp_path / name
    shutil.copy(sorted(subset.glob("*.jpg"))[0], path)
    result = run_script("--data-dir", path, "--out", tmp_path / "o")
    assert_clean_error(result, "is a file, not a folder", "folder that holds it")
    assert not (tmp_path / "o").exists() or files_under(tmp_path / "o") == []


def test_output_below_a_regular_file(subset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_clean_error(run_script("--data-dir", subset, "--out", blocker / "out"),
                       "is a file", "--out")


@pytest.mark.parametrize("flags", [("--image-size", "33"), ("--kl-weights", "1,-1"),
                                   ("--epochs", "0"), ("--lr", "nan"), ("--device", "tpu"),
                                   ("--test-fraction", "1.5"), ("--seed", "-1"),
                                   ("--seed", str(2**31)), ("--amp", "maybe")])
def test_invalid_flags(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        vae_anime.parse_args(list(flags))
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err.splitlines()[-1]


def test_an_invalid_flag_stops_the_script_before_it_writes(tmp_path):
    result = run_script("--image-size", "33", "--out", tmp_path / "o")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "multiple of 32" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_resume_with_other_settings_is_refused(default_run, subset, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    result = run_script("--data-dir", subset, "--out", out, "--kl-weights", 1, "--lr", "0.01",
                        "--resume")
    assert_clean_error(result, "other settings", "lr")


def test_resume_with_other_precision_is_refused(default_run, subset, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    ckpt = torch.load(out / "checkpoints" / "lambda_1.pt", weights_only=False)
    made_with = ckpt["settings"]["amp"]
    result = run_script("--data-dir", subset, "--out", out, "--kl-weights", 1, "--resume",
                        "--amp", "off" if made_with else "on")
    assert_clean_error(result, "other settings", f"amp {made_with} -> {not made_with}")


# --------------------------------------------------------------------------------------
# Signals: Ctrl-C or SIGTERM stops at once; the checkpoints keep every finished epoch
# --------------------------------------------------------------------------------------


def start_script(*args):
    # SIGINT back to its default: a shell's background job inherits it ignored, and Python only
    # turns it into KeyboardInterrupt when it is not.
    return subprocess.Popen([sys.executable, "-u", str(SCRIPT), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def signal_after(proc, needle, *signals, delay=0.0):
    """Send `signals` (back to back) `delay` seconds after the log shows `needle`;
    returns (stdout, stderr)."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if needle in line:
            time.sleep(delay)
            for sig in signals:
                proc.send_signal(sig)
            break
    stdout, stderr = proc.communicate(timeout=180)
    return "".join(seen) + stdout, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_keeps_the_last_finished_epoch_and_resume_reproduces_the_run(small, two_epoch_run,
                                                                              tmp_path, sig):
    common = ["--data-dir", small, *TWO_EPOCHS]
    proc = start_script(*common, "--out", tmp_path / "a")
    stdout, stderr = signal_after(proc, "epoch   1/2", sig, delay=0.2)   # usually mid-epoch 2
    assert proc.returncode == 130, stdout + stderr
    assert "continue with --resume" in stderr and "Traceback" not in stderr
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "lambda_1.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1
    assert not list((tmp_path / "a").rglob("*.tmp"))
    resumed = run_script(*common, "--out", tmp_path / "a", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (without_timing(x / "metrics.json") for x in (tmp_path / "a", two_epoch_run))
    assert a["runs"] == b["runs"]


def test_a_signal_after_training_keeps_the_model_and_resume_only_writes(small, tmp_path):
    common = ("--data-dir", small, "--kl-weights", 1, "--epochs", 1, "--out", tmp_path)
    proc = start_script(*common)
    stdout, stderr = signal_after(proc, "epoch   1/1", signal.SIGINT)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "continue with --resume" in stderr
    assert not (tmp_path / "metrics.json").exists()
    resumed = run_script(*common, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch 1" in resumed.stdout and "epoch   1/1" not in resumed.stdout
    assert (tmp_path / "metrics.json").exists()


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    vae_anime.write_text_atomically(target, "old")
    with pytest.raises(RuntimeError):
        with vae_anime.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
