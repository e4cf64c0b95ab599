# Quick start targets. Both pin the CPU build of torch first: a bare `pip install torch` pulls a CUDA build.
PYTHON ?= python

.PHONY: demo app-demo test

# Offline CPU demo, end to end: install, train (or reuse) a tiny DoRA and LoRA, write the side-by-side grid PNG.
demo:
	$(PYTHON) -m pip install -q torch==2.13.0 && $(PYTHON) -m pip install -q -e . && $(PYTHON) -m dora_diffusion.demo

# The same adapters in the comparison page (http://127.0.0.1:7860).
app-demo:
	$(PYTHON) -m pip install -q torch==2.13.0 && $(PYTHON) -m pip install -q -e . && $(PYTHON) app.py --demo

# The test suite, as CI runs it.
test:
	$(PYTHON) -m pip install -q torch==2.13.0 && $(PYTHON) -m pip install -q -e ".[test]" && $(PYTHON) -m pytest -q
