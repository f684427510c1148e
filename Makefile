# Two commands do all set-up on a fresh machine:
#   make app    - set up .venv and run the main job
#   make test   - set up .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.qvl-installed

.PHONY: app test lab inspect install assets bench notebooks clean

# (Re)install when pyproject.toml changes. torch is pinned here: on a CPU-only
# machine with the local wheel this is the CPU build, elsewhere the CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[app,notebooks,train,test]"
	touch $(STAMP)

install: $(STAMP)

app: $(STAMP)
	$(PY) app.py

inspect: $(STAMP)
	$(PY) -m qvl inspect assets/shapes_640x480.png assets/text_scripts_1280x320.png assets/motion_4s_8fps.mp4

test: $(STAMP)
	$(PY) -m pytest -q tests

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

assets: $(STAMP)
	$(PY) scripts/make_assets.py

bench: $(STAMP)
	$(PY) benchmarks/bench_preprocess.py
	$(PY) benchmarks/bench_positions.py

notebooks: $(STAMP)
	$(PY) notebooks/_build.py

clean:
	rm -rf $(VENV) .pytest_cache
