"""Fill data/ from a read-only mirror after checking SHA-256 checksums.

Usage:
    python data/prepare_data.py [--mirror DIR] [--dest DIR] [--only covid|anime]

For each dataset the mirror's file is checked against the mirror's SHA256SUMS,
then copied (CSV) or extracted (tar) into data/. Files already in place with the
right checksum are left alone. Without a mirror, the full JHU series is downloaded
from its upstream URL and the user is told exactly how to get the rest.
Exit code 0 when every requested dataset is in place, 2 otherwise.
"""
import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
JHU_URL = ("https://raw.githubusercontent.com/CSSEGISandData/COVID-19/master/"
           "csse_covid_19_data/csse_covid_19_time_series/"
           "time_series_covid19_confirmed_global.csv")
# The checksums of the mirror's files; used when a file has to be fetched without a mirror.
KNOWN_SHA256 = {
    "covid_19.csv": "bf2e50b08d43898633fccd3ac85f1fbb510dc88b4ca38ea629ed3383730499f1",
    "time_series_covid19_confirmed_global.csv":
        "e6234a59eec4359d2577358b5220e1a7e3da74c162913cdb7d882db1413f98c2",
    "anime_faces_64.tar": "f757f7ae37d448944855e2bd2092aee364d0c6d1887246e43af6ba551ef0d115",
}
HOW_TO_GET = {
    "covid_19.csv": "the assignment's file (NCTU Deep Learning 2020, HW2): ask the course "
                    "staff, or use the full JHU series instead with "
                    "`python rnn_covid.py --data data/time_series_covid19_confirmed_global.csv`",
    "time_series_covid19_confirmed_global.csv": f"download {JHU_URL}",
    "anime_faces_64.tar": "download the Kaggle set soumikrakshit/anime-faces "
                          "(https://www.kaggle.com/datasets/soumikrakshit/anime-faces), unzip it "
                          "and put its images in data/anime_faces/ (any sub-folders), "
                          "or run `python vae_anime.py --data-dir <folder of images>`",
}
DATASETS = {
    "covid": ["covid_19.csv", "time_series_covid19_confirmed_global.csv"],
    "anime": ["anime_faces_64.tar"],
}


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checksums(mirror):
    sums = dict(KNOWN_SHA256)
    path = mirror / "SHA256SUMS"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                digest, name = line.split(maxsplit=1)
                sums[name.strip().lstrip("*")] = digest
    return sums


WRITTEN = []  # atomic_path records what it put in place (shared with the two scripts)


# atomic_path is a copy of the two scripts' own (tests/test_shared_plumbing.py compares them).
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}-{os.getpid()}{path.suffix}.tmp")  # one writer a process
    try:
        yield tmp
        os.replace(tmp, path)
        WRITTEN.append(path)
    finally:
        tmp.unlink(missing_ok=True)


def copy_atomically(src, dst):
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def extract_tar_atomically(tar_path, dest_dir, folder):
    """Extract `folder/` of the tar next to dest_dir, then rename it into place."""
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(staging, filter="data")
        target = dest_dir / folder
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / folder, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download(url, dst):
    with atomic_path(dst) as tmp, urllib.request.urlopen(url, timeout=60) as response, \
            open(tmp, "wb") as f:
        shutil.copyfileobj(response, f)


def prepare_csv(name, mirror, dest, sums):
    dst = dest / name
    if dst.exists() and sha256_of(dst) == sums[name]:
        return f"ok       {name} (already in place)"
    src = mirror / name
    if src.exists():
        if sha256_of(src) != sums[name]:
            raise ValueError(f"{src} does not match its SHA-256 in {mirror / 'SHA256SUMS'}: "
                             "the mirror is corrupt; fetch it again")
        copy_atomically(src, dst)
        return f"copied   {name} from {mirror}"
    if name == "time_series_covid19_confirmed_global.csv":
        try:
            download(JHU_URL, dst)
        except OSError as err:
            raise FileNotFoundError(f"{name}: no mirror at {mirror} and the download failed "
                                    f"({err}); {HOW_TO_GET[name]} into {dest}/") from None
        # The upstream file has been final since 2023-03-10; a mismatch means a changed upstream.
        if sha256_of(dst) != sums[name]:
            print(f"warning  {name}: downloaded, but its SHA-256 differs from the mirror's",
                  file=sys.stderr)
        return f"fetched  {name} from {JHU_URL}"
    raise FileNotFoundError(f"{name}: not in {mirror}; get it: {HOW_TO_GET[name]}, "
                            f"into {dest}/")


def prepare_anime(mirror, dest, sums):
    name = "anime_faces_64.tar"
    stamp = dest / "anime_faces" / ".source_sha256"
    if stamp.exists() and stamp.read_text().strip() == sums[name]:
        return "ok       anime_faces/ (already extracted)"
    src = mirror / name
    if not src.exists():
        if (dest / "anime_faces").is_dir() and any((dest / "anime_faces").iterdir()):
            return "ok       anime_faces/ (user-provided images, not from the mirror)"
        raise FileNotFoundError(f"{name}: not in {mirror}; {HOW_TO_GET[name]}")
    if sha256_of(src) != sums[name]:
        raise ValueError(f"{src} does not match its SHA-256 in {mirror / 'SHA256SUMS'}: "
                         "the mirror is corrupt; fetch it again")
    extract_tar_atomically(src, dest, "anime_faces")
    with atomic_path(stamp) as tmp:
        tmp.write_text(sums[name] + "\n")
    count = sum(1 for _ in (dest / "anime_faces").glob("*.jpg"))
    return f"extracted anime_faces/ ({count} images) from {src}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path,
                        default=Path(os.environ.get("DATA_MIRROR", HERE.parent.parent / "shared" / "data")),
                        help="read-only data mirror (default: $DATA_MIRROR or ../shared/data)")
    parser.add_argument("--dest", type=Path, default=HERE, help="where to put the data (default: data/)")
    parser.add_argument("--only", choices=sorted(DATASETS), action="append",
                        help="prepare only this dataset (repeatable; default: all)")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    sums = read_checksums(args.mirror)
    failures = 0
    for dataset in args.only or sorted(DATASETS):
        for name in DATASETS[dataset]:
            try:
                if name.endswith(".tar"):
                    print(prepare_anime(args.mirror, args.dest, sums))
                else:
                    print(prepare_csv(name, args.mirror, args.dest, sums))
            except (FileNotFoundError, ValueError) as err:
                print(f"error: {err}", file=sys.stderr)
                failures += 1
    return 2 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
