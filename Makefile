# The two commands of the README: `make demo` and `make test`.
#
# The install deliberately runs pip with --isolated: this machine type's pip config points at a local
# CPU-only torch wheel, with which torchvision (needed by open_clip) fails to import. --isolated ignores
# that user config and the PIP_* environment, so pip takes PyPI's regular torch build (CUDA 13, which
# also runs on a CPU).
PYTHON ?= python3
VENV ?= .venv
DALI ?= dali-cuda130
CLIP_BENCHMARK := 1.6.2
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --isolated --progress-bar off

.PHONY: install test demo lint bench rehearse clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt -e ".[dev,$(DALI)]"
	# Zero-shot class names and prompt templates come from CLIP_benchmark's JSON files. We read the
	# files only; its own dependencies (pycocoevalcap, webdataset, ...) are not needed, hence --no-deps.
	$(PIP) --no-deps clip-benchmark==$(CLIP_BENCHMARK)
	touch $@

# Two pytest workers (pytest-xdist), each running whole files, so module fixtures and a file's order hold:
# CI's 2 cores are busy while the other worker waits on a subprocess or a spawned rank.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The demo: generated noisy data -> shards -> CLIP / ALIP w/o gates / ALIP -> eval -> report (demo_out/report).
demo: install
	$(PY) -m alip.demo --out demo_out

lint: install
	$(VENV)/bin/ruff check alip tests benchmarks scripts tools
	$(VENV)/bin/ruff format --check alip tests benchmarks scripts tools

bench: install
	$(PY) benchmarks/loss_cost.py

# The lent GPU machine's software (Python 3.12, torch 2.11, ...) rehearsed on the CPU in .rehearse/
# (downloads ~3 GB once): not part of `make test` or CI. See benchmarks/device_rehearsal.sh.
rehearse:
	benchmarks/device_rehearsal.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .rehearse
