# Quick start targets: the README's commands. Every install goes through requirements/lock.txt (constraints:
# exact versions of everything the suite was last run green with, torch 2.13.0 = the CPU build on local disk).
PYTHON ?= python
LOCK := -c requirements/lock.txt

.PHONY: demo app-demo test lock test-latest

# Offline CPU demo, end to end: install, train (or reuse) a DoRA and a LoRA, write the side-by-side grid PNG.
demo:
	$(PYTHON) -m pip install -q $(LOCK) -e ".[train]" && $(PYTHON) -m dora_diffusion.demo

# The same adapters in the comparison page (http://127.0.0.1:7860).
app-demo:
	$(PYTHON) -m pip install -q $(LOCK) -e ".[train,app]" && $(PYTHON) app.py --demo

# The test suite, as CI runs it.
test:
	$(PYTHON) -m pip install -q $(LOCK) -e ".[test]" && $(PYTHON) -m pytest -q

# Refresh the lock to the newest releases (minus requirements/holds.txt); then run `make test` before committing it.
lock:
	bash requirements/refresh-lock.sh

# The suite on the newest releases, without the lock, in its own venv; says which upstream package broke which tests.
# Never gates CI.
test-latest:
	python3 requirements/test_latest.py
