# Quick start: `make train` trains the reference CNN, `make test` runs the tests.
# Both create .venv with the course installed when it is missing or stale.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test benchmark notebooks lab clean

train: $(STAMP)
	$(PY) -m course_lib train $(ARGS)

# One torch thread per process: the tests run a pytest process, training
# subprocesses and notebook kernels side by side, and on 2 cores their thread
# pools would otherwise contend and slow each one down many times over.
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest $(ARGS)

benchmark: $(STAMP)
	$(PY) benchmarks/run.py $(ARGS)

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(ARGS)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10 or later is needed, found " + sys.version.split()[0] + "; run make with PYTHON=python3.X")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs .pytest_cache
