# make demo: create .venv, install, fetch the embedded model, run the main job.  make test: the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
# torch first and on its own: here pip finds the CPU build on disk; elsewhere set TORCH_SPEC as you like
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test bench-cpu clean sandbox

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m collocate.cli models
	$(PY) -m collocate.cli demo

# the HumanEval sandbox is bubblewrap: a Debian package (as root, as CI runs; elsewhere, install it yourself)
sandbox:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq bubblewrap || { apt-get update -qq && apt-get install -y -qq bubblewrap; }; } \
		>/dev/null 2>&1; } || echo "collocate: no bubblewrap (apt-get install bubblewrap): HumanEval is not scored"

# one pytest worker a core (at most 8); TEST_WORKERS=0 runs them in this process
TEST_WORKERS ?= auto
test: $(STAMP) sandbox
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxprocesses 8

# the committed CPU bench table (bench/README.md)
bench-cpu: $(STAMP)
	$(PY) -m collocate.cli bench --suite mtbench,gsm8k,humaneval --modes ar,clp,gate,compete,verify,verify-adaptive,hf \
		--n 10 --max-new-tokens 128 --out bench/results/cpu-smollm2

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
