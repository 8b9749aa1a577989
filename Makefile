# Everything a user needs: `make test` and `make demo` work from a clean clone
# with only Python, a C compiler and make installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS   := $(VENV)/.deps-stamp
PYTEST_ARGS ?=

.PHONY: all venv build debug test demo bench bench-smoke sdist wheel packaging clean

all: build

$(DEPS): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=77" "Cython>=3.1" wheel build numpy \
		pytest hypothesis pytest-benchmark pytest-timeout matplotlib mypy
	touch $@

venv: $(DEPS)

# An editable install: the extensions are compiled in place under src/.
build: $(DEPS)
	$(PIP) install -q --no-build-isolation --no-deps -e .

# Bounds checks, line tracing, -O0 -g and annotated HTML next to each .pyx.
debug: $(DEPS)
	rm -f src/fastmirror/_core/*.so
	FASTMIRROR_DEBUG=1 $(PIP) install -q --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest $(PYTEST_ARGS)

demo: build
	$(VENV)/bin/fastmirror demo

bench: build
	$(PY) -m pytest bench --benchmark-only --benchmark-json=bench/results/latest.json

bench-smoke: build
	$(PY) -m pytest bench -q --benchmark-disable -x

sdist: $(DEPS)
	$(PY) -m build --sdist --no-isolation

wheel: $(DEPS)
	$(PY) -m build --wheel --no-isolation

# Proof of packaging without Docker (.ci/packaging): an sdist built with build
# isolation, a wheel built from it, auditwheel show/repair, the test suite
# against the wheel installed in a fresh venv, stubtest, cibuildwheel's build
# list, validate-pyproject.  Work files go to build/packaging.
packaging: $(DEPS)
	PYTHON=$(PYTHON) VENV=$(VENV) bash .ci/packaging

clean:
	rm -rf build dist src/*.egg-info src/fastmirror/_core/*.so src/fastmirror/_core/*.c \
		src/fastmirror/_core/*.html .pytest_cache wheelhouse .mypy_cache
