"""World map of rnn_covid.py: ISO-3 mapping of both data files, the files write_world_map
writes, the no-browser path, and the map really drawn in red and blue (kaleido PNG, and the
HTML opened in headless Chromium offline)."""
import csv
import io
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import pandas as pd
import pycountry
import pytest

import rnn_covid
from tests.conftest import ROOT

DATA = ROOT / "data"
ASSIGNMENT_CSV = DATA / "covid_19.csv"
JHU_CSV = DATA / "time_series_covid19_confirmed_global.csv"
TOPOJSON = DATA / "topojson"
IN_CI = os.environ.get("CI", "").lower() == "true"


def need(path):
    """Skip without the prepared data (`make data`); in CI its absence is a failure."""
    if not Path(path).exists():
        if IN_CI:
            pytest.fail(f"{path} missing in CI (make data)")
        pytest.skip(f"{path} missing: run `make data`")


def need_browser():
    """The Chrome/Chromium kaleido would use (BROWSER_PATH, then PATH)."""
    from choreographer.browsers.chromium import Chromium

    browser = Chromium.find_browser(skip_local=False)
    if not browser:
        if IN_CI:
            pytest.fail("CI=true but no Chrome/Chromium found")
        pytest.skip("no Chrome/Chromium found")
    return browser


def assignment_names():
    need(ASSIGNMENT_CSV)
    rows = list(csv.reader(ASSIGNMENT_CSV.open(encoding="utf-8-sig", newline="")))
    return [r[0] for r in rows[3:] if r and r[0].strip()]  # 3 header lines


def jhu_names():
    need(JHU_CSV)
    with JHU_CSV.open(encoding="utf-8-sig", newline="") as f:
        return sorted({r["Country/Region"] for r in csv.DictReader(f)})


def valid_iso3(code):
    return code == "XKX" or pycountry.countries.get(alpha_3=code) is not None


# --------------------------------------------------------------------------- ISO-3 mapping

@pytest.mark.parametrize("names, non_countries", [
    (assignment_names, {"Diamond Princess", "MS Zaandam"}),
    (jhu_names, {"Diamond Princess", "MS Zaandam", "Summer Olympics 2020", "Winter Olympics 2022"}),
], ids=["assignment", "jhu"])
def test_every_country_of_the_data_file_maps_to_iso3(names, non_countries):
    names = names()
    assert len(names) > 150
    assert {n for n in names if n in rnn_covid.NON_COUNTRIES} == non_countries
    codes = {n: rnn_covid.country_iso3(n) for n in names}
    assert all(codes[n] is None for n in non_countries)
    bad = {n: c for n, c in codes.items() if n not in non_countries and not (c and valid_iso3(c))}
    assert bad == {}
    real = [codes[n] for n in names if n not in non_countries]
    assert len(set(real)) == len(real), "two names of one file share an ISO-3 code"


@pytest.mark.parametrize("name, code", [
    ("US", "USA"), ("Korea South", "KOR"), ("Korea, South", "KOR"), ("Korea, North", "PRK"),
    ("Taiwan*", "TWN"), ("Burma", "MMR"), ("Congo (Brazzaville)", "COG"),
    ("Congo (Kinshasa)", "COD"), ("Cote d'Ivoire", "CIV"), ("Holy See", "VAT"),
    ("West Bank and Gaza", "PSE"), ("Kosovo", "XKX"), ("Micronesia", "FSM"), ("Laos", "LAO"),
    ("Russia", "RUS"), ("Iran", "IRN"), ("Syria", "SYR"), ("Vietnam", "VNM"), ("Brunei", "BRN"),
    ("Turkey", "TUR"), ("Bolivia", "BOL"), ("Venezuela", "VEN"), ("Tanzania", "TZA"),
    ("Moldova", "MDA"), ("Eswatini", "SWZ"), ("Cabo Verde", "CPV"), ("Czechia", "CZE"),
    ("North Macedonia", "MKD"), ("Timor-Leste", "TLS"), ("United Kingdom", "GBR"),
    ("Western Sahara", "ESH"), ("Antarctica", "ATA"), (" France ", "FRA"),
    ("Diamond Princess", None), ("MS Zaandam", None), ("Summer Olympics 2020", None),
    ("Winter Olympics 2022", None), ("Atlantis", None),
])
def test_spot_checks(name, code):
    assert rnn_covid.country_iso3(name) == code


def test_local_topojson_has_a_shape_for_every_jhu_country_but_kosovo_and_tuvalu():
    need(TOPOJSON / "world_50m.json")
    topo = rnn_covid.load_world_topojson(TOPOJSON)
    ids = {g.get("id") for g in topo["objects"]["countries"]["geometries"]}
    missing = sorted(n for n in jhu_names() if (c := rnn_covid.country_iso3(n)) and c not in ids)
    assert missing == ["Kosovo", "Tuvalu"]  # Kosovo's shape ships without an id


# --------------------------------------------------------------------------- write_world_map

# Big countries, so that a rendered map shows plenty of red and of blue.
RED = ["US", "Russia", "Brazil", "Australia", "Kazakhstan", "Algeria", "Congo (Kinshasa)"]
BLUE = ["China", "Canada", "India", "Argentina", "Korea, South", "Saudi Arabia", "Mongolia",
        "Kosovo"]


def synthetic_world(extra=()):
    rows = [(n, 0.9, "5, 7, 9") for n in RED] + [(n, 0.1, "9, 7, 5") for n in BLUE] + list(extra)
    world = pd.DataFrame(rows, columns=["country", "probability", "last_values"])
    return world.assign(in_C=False, low_activity=False)


def write_map(world, out, topojson=None, title="test map", caption="grey: not in the data",
              png=False):
    return rnn_covid.write_world_map(world, title, caption, out, topojson, png=png)


def test_writes_html_and_csv_without_browser(tmp_path, caplog):
    need(TOPOJSON / "world_50m.json")
    world = synthetic_world([("Diamond Princess", 0.5, "0, 0, 0"), ("Atlantis", 0.3, "1, 2, 3"),
                             ("Holy See", 0.6, "0, 1, 0")])
    with caplog.at_level(logging.INFO, logger="rnn_covid"):
        res = write_map(world, tmp_path / "out", TOPOJSON)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["world_map.html", "world_probabilities.csv"]
    assert res == rnn_covid.WorldMap(
        countries_mapped=len(RED) + len(BLUE) + 1, countries_total=len(world),
        excluded=["Diamond Princess"], unmapped=["Atlantis"],
        png=None, png_skipped_reason="not asked for")
    skipped = [r for r in caplog.records if "PNG skipped" in r.getMessage()]
    assert len(skipped) == 1 and "not asked for" in skipped[0].getMessage()

    table = pd.read_csv(out / "world_probabilities.csv", keep_default_na=False)
    assert list(table.columns) == ["country", "iso3", "probability", "last_values", "in_C",
                                   "low_activity"]
    assert len(table) == len(world)
    assert table["probability"].is_monotonic_decreasing
    by_name = table.set_index("country")
    assert by_name.loc["US", "iso3"] == "USA" and by_name.loc["Kosovo", "iso3"] == "XKX"
    assert by_name.loc["Diamond Princess", "iso3"] == "" and by_name.loc["Atlantis", "iso3"] == ""
    assert by_name.loc["Holy See", "probability"] == pytest.approx(0.6)
    assert by_name.loc["Korea, South", "last_values"] == "9, 7, 5"

    html = (out / "world_map.html").read_text(encoding="utf-8")
    assert "window.PlotlyGeoAssets" in html and '"world_50m"' in html  # shapes embedded
    assert "<script src=" not in html  # plotly.js inline: nothing fetched
    assert '"locationmode":"ISO-3"' in html and '"zmin":0.0' in html and '"zmax":1.0' in html
    assert "Diamond Princess" not in html and "Atlantis" not in html  # not on the map
    assert "%{customdata[0]}" in html and "%{z:.3f}" in html and "%{customdata[1]}" in html  # hover


def test_no_browser_found_via_browser_path_env(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    with caplog.at_level(logging.INFO, logger="rnn_covid"):
        res = write_map(synthetic_world(), tmp_path / "out", png=True)
    assert res.png is None and "BROWSER_PATH" in res.png_skipped_reason
    assert (tmp_path / "out" / "world_map.html").is_file()
    assert (tmp_path / "out" / "world_probabilities.csv").is_file()
    assert not (tmp_path / "out" / "world_map.png").exists()
    assert len([r for r in caplog.records if "PNG skipped" in r.getMessage()]) == 1


def test_two_names_of_one_country_are_refused_and_nothing_written(tmp_path):
    with pytest.raises(rnn_covid.UserError, match="KOR"):
        write_map(synthetic_world([("Korea South", 0.5, "1")]), tmp_path / "c")
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- rendered maps

def colour_counts(png_bytes):
    """Pixels clearly red and clearly blue in a screenshot."""
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r > 120) & (r - g > 70) & (r - b > 70)
    blue = (b > 100) & (b - r > 60) & (b - g > 30)
    return int(red.sum()), int(blue.sum()), r.size


def test_png_via_kaleido_shows_red_and_blue_countries(tmp_path):
    need(TOPOJSON / "world_50m.json")
    need_browser()
    res = write_map(synthetic_world(), tmp_path, TOPOJSON, "kaleido test", png=True)
    assert res.png_skipped_reason is None and Path(res.png).is_file()
    red, blue, total = colour_counts(Path(res.png).read_bytes())
    assert red > 0.01 * total and blue > 0.01 * total, (red, blue, total)


def test_html_in_headless_chromium_offline_shows_red_and_blue_countries(tmp_path):
    need(TOPOJSON / "world_50m.json")
    browser = need_browser()
    write_map(synthetic_world(), tmp_path / "map", TOPOJSON, "browser test")
    shot = tmp_path / "shot.png"
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
               "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: a self-contained page
               "--window-size=1400,800", "--virtual-time-budget=15000", "--hide-scrollbars",
               f"--screenshot={shot}", (tmp_path / "map" / "world_map.html").as_uri()]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"no screenshot (rc {run.returncode}): {run.stderr[-2000:]}"
    red, blue, total = colour_counts(shot.read_bytes())
    assert red > 0.01 * total and blue > 0.01 * total, (red, blue, total)


def test_countries_outside_C_and_low_activity_are_marked(tmp_path):
    world = synthetic_world()
    world["in_C"] = world["country"].isin(["US", "China"])
    world["low_activity"] = world["country"].isin(["Mongolia"])
    write_map(world, tmp_path, None, "marks<br><sub>trained up to 2020-03-13</sub>",
              caption="thick outline: in C")
    table = pd.read_csv(tmp_path / "world_probabilities.csv").set_index("country")
    assert table.loc["US", "in_C"] and not table.loc["Russia", "in_C"]
    assert table.loc["Mongolia", "low_activity"] and table["low_activity"].sum() == 1
    html = (tmp_path / "world_map.html").read_text(encoding="utf-8")
    assert "<title>marks</title>" in html and "trained up to 2020-03-13" in html
    assert '"locations":["MNG"]' in html and "rgba(255,255,255,0.6)" in html  # the veil
    assert '"locations":["USA","CHN"]' in html and '"width":1.2' in html  # the outline
    assert "thick outline: in C" in html
