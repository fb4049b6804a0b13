"""Tests for vae_anime.py: the real script on a few hundred real images, plus unit tests.

The end-to-end tests run `python vae_anime.py` through subprocess with tiny budgets (one or
two short epochs); nothing is mocked.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
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
FIGURES = ("learning_curve", "reconstructions", "samples", "interpolations", "kl_per_dim")


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, "-u", str(SCRIPT), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="session")
def subset(tmp_path_factory):
    """A few hundred real faces copied from data/anime_faces."""
    if not FACES.is_dir():
        pytest.skip("data/anime_faces is missing: run `make data`")
    folder = tmp_path_factory.mktemp("faces")
    for path in sorted(FACES.glob("*.jpg"))[:N_SUBSET]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="session")
def default_run(subset, tmp_path_factory):
    """The three default λ, one short epoch each, on the subset."""
    out = tmp_path_factory.mktemp("out")
    result = run_script("--data-dir", subset, "--out", out, "--epochs", 1, "--batch-size", 64)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def test_default_run_writes_every_output(default_run):
    out, result = default_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"config", "data", "runs", "anchors", "timing"} <= set(metrics)
    assert [r["kl_weight"] for r in metrics["runs"]] == [1.0, 100.0, 0.0]
    assert metrics["data"]["images"] == N_SUBSET and not metrics["data"]["skipped"]
    assert metrics["data"]["train"] + metrics["data"]["test"] == N_SUBSET
    for r in metrics["runs"]:
        test = r["test"]
        assert {"neg_elbo", "recon", "kl", "mse", "active_units"} <= set(test)
        assert all(math.isfinite(test[k]) for k in ("neg_elbo", "recon", "kl", "mse"))
        assert test["neg_elbo"] == pytest.approx(test["recon"] + test["kl"], abs=1e-3)
        assert 0 <= test["active_units"] <= 128 and len(r["kl_per_dim"]) == 128
        assert len(r["history"]) == 1
        tag = vae_anime.weight_tag(r["kl_weight"])
        for name in FIGURES:
            assert (out / f"lambda_{tag}_{name}.png").stat().st_size > 1000
        assert (out / "checkpoints" / f"lambda_{tag}.pt").exists()
    assert metrics["anchors"]["mean_image_mse"] > 0
    assert metrics["anchors"]["lambda_0_mse"] == metrics["runs"][2]["test"]["mse"]
    assert (out / "lambda_comparison.png").exists()
    report = (out / "REPORT.md").read_text()
    for needle in ("## Preprocessing", "| layer | output shape | parameters |", "Bernoulli",
                   "lambda_comparison.png", "lambda_100_samples.png", "active units"):
        assert needle in report
    assert not list(out.rglob("*.tmp"))          # nothing half-written left behind
    assert "epoch   1/1" in result.stdout


def test_same_seed_gives_identical_metrics(default_run, subset):
    out, _ = default_run
    first = without_timing(out / "metrics.json")
    result = run_script("--data-dir", subset, "--out", out, "--epochs", 1, "--batch-size", 64)
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
    result = run_script("--data-dir", folder, "--out", tmp_path / "out", "--kl-weight", 0,
                        "--epochs", 1)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 unreadable or corrupt files: broken.jpg" in result.stdout
    assert "upscaled (blurry): tiny.png" in result.stdout
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())["data"]
    assert (data["files_found"], data["images"], data["skipped"]) == (42, 41, ["broken.jpg"])


def test_64px_images_work_end_to_end(subset, tmp_path):
    result = run_script("--data-dir", subset, "--out", tmp_path, "--image-size", 64,
                        "--kl-weight", 1, "--epochs", 1, "--batch-size", 64)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["image_size"] == 64 and metrics["data"]["image_size"] == 64
    assert "| enc Conv2d 4×4/2 | 512×2×2 |" in (tmp_path / "REPORT.md").read_text()


def test_resume_continues_where_it_stopped(subset, tmp_path):
    common = ("--data-dir", subset, "--kl-weight", 1, "--batch-size", 64)
    assert run_script(*common, "--out", tmp_path / "a", "--epochs", 1).returncode == 0
    resumed = run_script(*common, "--out", tmp_path / "a", "--epochs", 2, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch 1" in resumed.stdout
    assert run_script(*common, "--out", tmp_path / "b", "--epochs", 2).returncode == 0
    a, b = without_timing(tmp_path / "a" / "metrics.json"), without_timing(tmp_path / "b" / "metrics.json")
    assert [h["epoch"] for h in a["runs"][0]["history"]] == [1, 2]
    assert a["runs"] == b["runs"]                 # resumed == uninterrupted, to the last digit


def test_ctrl_c_saves_checkpoint_and_figures_then_resumes_exactly(subset, tmp_path):
    common = ["--data-dir", subset, "--kl-weight", 1, "--batch-size", 8, "--epochs", 3]
    proc = subprocess.Popen([sys.executable, "-u", str(SCRIPT), *map(str, common), "--out",
                             str(tmp_path / "a")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                      # interrupt during epoch 2
        if "epoch   1/3" in line:
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert "continue with --resume" in stderr and "Traceback" not in stderr
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "lambda_1.pt", weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["history"]) == 1
    assert (tmp_path / "a" / "lambda_1_samples.png").exists()
    resumed = run_script(*common, "--out", tmp_path / "a", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert run_script(*common, "--out", tmp_path / "b").returncode == 0
    a, b = without_timing(tmp_path / "a" / "metrics.json"), without_timing(tmp_path / "b" / "metrics.json")
    assert a["runs"] == b["runs"]


# --------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing half-written
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
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(default_run, subset, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    ckpt = out / "checkpoints" / "lambda_1.pt"
    before = ckpt.read_bytes(), (out / "metrics.json").read_bytes()
    result = run_script("--data-dir", subset, "--out", out, "--kl-weight", 1, "--epochs", 1,
                        "--lr", "1e30")
    assert_clean_error(result, "the loss became", "lower --lr", "checkpoint is kept")
    assert (ckpt.read_bytes(), (out / "metrics.json").read_bytes()) == before


def test_unwritable_output_folder(subset, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_clean_error(run_script("--data-dir", subset, "--out", blocker / "out"),
                       "cannot write to output folder", "--out")


@pytest.mark.parametrize("flags", [("--image-size", "33"), ("--kl-weights", "1,-1"),
                                   ("--epochs", "0"), ("--lr", "nan"), ("--device", "tpu"),
                                   ("--test-fraction", "1.5")])
def test_invalid_flags(flags, tmp_path):
    result = run_script(*flags, "--out", tmp_path / "o")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_resume_with_other_settings_is_refused(default_run, subset, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(default_run[0], out)
    result = run_script("--data-dir", subset, "--out", out, "--kl-weight", 1, "--lr", "0.01",
                        "--resume")
    assert_clean_error(result, "other settings", "lr")


# --------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_encoder_decoder_shapes(size):
    model = vae_anime.VAE(latent_dim=16, image_size=size)
    x = torch.rand(4, 3, size, size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 16)
    assert model.decode(mu).shape == (4, 3, size, size)
    logits, mu2, _ = model(x, torch.zeros(4, 16))
    assert logits.shape == (4, 3, size, size) and torch.equal(mu, mu2)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 512]
    assert all(c.stride == (2, 2) for c in convs)


def test_loss_matches_hand_computed_value():
    x = torch.tensor([[0.0, 0.5, 1.0]])
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    recon, kl = vae_anime.loss_terms(logits, x, mu, logvar)
    p = [1 / (1 + math.exp(-v)) for v in (0.0, 2.0, -1.0)]
    expected_recon = -sum(xi * math.log(pi) + (1 - xi) * math.log(1 - pi)
                          for xi, pi in zip((0.0, 0.5, 1.0), p))
    expected_kl = 0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 2 - 1 - math.log(2))
    assert recon.item() == pytest.approx(expected_recon, rel=1e-6)
    assert kl.item() == pytest.approx(expected_kl, rel=1e-6)


def test_kl_is_zero_for_standard_normal_posterior():
    _, kl = vae_anime.loss_terms(torch.zeros(5, 3, 2, 2), torch.rand(5, 3, 2, 2),
                                 torch.zeros(5, 7), torch.zeros(5, 7))
    assert torch.equal(kl, torch.zeros(5))


def test_interpolation_endpoints_are_decoded_posterior_means():
    torch.manual_seed(0)
    model = vae_anime.VAE(latent_dim=8).eval()
    a, b = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    path = vae_anime.interpolate(model, a, b, steps=10)
    assert path.shape == (10, 3, 32, 32)
    with torch.no_grad():
        ends = model.decode(model.encode(torch.stack([a, b]))[0])
    torch.testing.assert_close(path[0], ends[0])
    torch.testing.assert_close(path[-1], ends[1])


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


def test_split_is_deterministic_and_disjoint():
    train_a, test_a = vae_anime.split_indices(1000, 0.1, seed=3)
    train_b, test_b = vae_anime.split_indices(1000, 0.1, seed=3)
    assert torch.equal(train_a, train_b) and torch.equal(test_a, test_b)
    assert len(test_a) == 100 and len(set(train_a.tolist()) | set(test_a.tolist())) == 1000
    assert not torch.equal(vae_anime.split_indices(1000, 0.1, seed=4)[1], test_a)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    vae_anime.write_text_atomically(target, "old")
    with pytest.raises(RuntimeError):
        with vae_anime.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
