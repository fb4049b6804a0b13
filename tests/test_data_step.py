"""The data step: checksums checked, files copied/extracted atomically, clear errors otherwise."""
import hashlib
import io
import os
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "data" / "prepare_data.py"
MIRROR = ROOT / os.environ.get("DATA_MIRROR", "../shared/data")  # make exports DATA_MIRROR


def run_step(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def make_mirror(tmp_path, csv_text="a,b\n1,2\n", tamper=False):
    """A tiny mirror with one COVID CSV and a two-image tar, plus its SHA256SUMS."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "covid_19.csv").write_text(csv_text)
    tar_path = mirror / "anime_faces_64.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name in ["anime_faces/1_2000.jpg", "anime_faces/2_2001.jpg"]:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lines = []
    for path in [mirror / "covid_19.csv", tar_path]:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if tamper and path.suffix == ".csv":
            digest = "0" * 64
        lines.append(f"{digest}  {path.name}")
    (mirror / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return mirror


def test_copies_and_extracts_after_checking(tmp_path):
    mirror = make_mirror(tmp_path)
    dest = tmp_path / "data"
    result = run_step("--mirror", mirror, "--dest", dest, "--only", "anime")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (dest / "anime_faces").glob("*.jpg")) == ["1_2000.jpg", "2_2001.jpg"]
    again = run_step("--mirror", mirror, "--dest", dest, "--only", "anime")
    assert "already extracted" in again.stdout
    assert not list(dest.glob(".extract-*")), "staging folder left behind"


def test_checksum_mismatch_is_refused(tmp_path):
    mirror = make_mirror(tmp_path, tamper=True)
    dest = tmp_path / "data"
    result = run_step("--mirror", mirror, "--dest", dest, "--only", "covid")
    assert result.returncode == 2
    assert "does not match its SHA-256" in result.stderr
    assert not (dest / "covid_19.csv").exists()
    assert "Traceback" not in result.stderr


def test_missing_mirror_says_how_to_get_each_file(tmp_path):
    dest = tmp_path / "data"
    result = run_step("--mirror", tmp_path / "nowhere", "--dest", dest, "--only", "anime")
    assert result.returncode == 2
    assert "kaggle.com/datasets/soumikrakshit/anime-faces" in result.stderr
    assert "Traceback" not in result.stderr


def test_real_mirror_files_match_their_checksums(tmp_path):
    if not (MIRROR / "SHA256SUMS").exists():
        # CI must test the real data; elsewhere a checkout without the mirror may skip.
        assert os.environ.get("CI") != "true", f"CI=true but no data mirror at {MIRROR}"
        pytest.skip("no data mirror beside the repo")
    result = run_step("--mirror", MIRROR, "--dest", tmp_path, "--only", "covid")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "covid_19.csv").read_bytes() == (MIRROR / "covid_19.csv").read_bytes()
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"
