# Everything a user needs: `make test` and `make demo` work from a clean clone
# with only Python, a C compiler and make installed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS   := $(VENV)/.deps-stamp
PYTEST_ARGS ?=

.PHONY: all venv build debug test demo bench bench-smoke sdist wheel packaging clean \
	lint debug-test sanitize-test

all: build

$(DEPS): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "setuptools>=77" "Cython>=3.1" wheel build numpy \
		pytest pytest-xdist hypothesis pytest-benchmark pytest-timeout matplotlib mypy \
		qemu.qmp
	touch $@

venv: $(DEPS)

# An editable install: the extensions are compiled in place under src/.
build: $(DEPS)
	$(PIP) install -q --no-build-isolation --no-deps -e .

# Bounds checks, line tracing, -O0 -g and annotated HTML next to each .pyx.
debug: $(DEPS)
	rm -f src/fastmirror/_core/*.so
	FASTMIRROR_DEBUG=1 $(PIP) install -q --no-build-isolation --no-deps -e .

# Most test modules run in three processes at once (a module stays in one
# process: --dist loadfile); the modules marked `serial` change settings of the
# whole machine (kernel.io_uring_disabled, nr_hugepages, the page cache) and
# run alone afterwards.  Either half may select nothing (PYTEST_ARGS naming
# one file): pytest's 5 is a failure only when both selected nothing.
TEST_WORKERS ?= 3
test: build
	@a=0; b=0; \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial" $(PYTEST_ARGS) || a=$$?; \
	$(PY) -m pytest -m serial $(PYTEST_ARGS) || b=$$?; \
	if [ $$a = 5 ] && [ $$b = 5 ]; then exit 5; fi; \
	[ $$a = 5 ] && a=0; [ $$b = 5 ] && b=0; \
	[ $$a = 0 ] && [ $$b = 0 ] || exit 1

demo: build
	$(VENV)/bin/fastmirror demo

# Linters, in the venv but not in the test dependencies: ruff over the Python
# code, cython-lint (which runs pycodestyle) over the .pyx and .pxd files;
# their settings are in pyproject.toml.  Versions pinned so that a new release
# cannot fail a build that passed; raise them deliberately.
LINT_STAMP := $(VENV)/.lint-stamp
$(LINT_STAMP): $(DEPS)
	$(PIP) install -q ruff==0.17.6 cython-lint==0.22.1 pycodestyle==2.15.0
	touch $@

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check src tests bench examples
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/cython-lint src tests bench

# Variant builds of the extensions go to build/<variant>/lib, with a copy of
# the package, and their generated C to build/<variant>/c; the tests run
# against them through PYTHONPATH.  The in-place release build that
# `make test` uses is never touched.
VARIANT_BUILD = rm -rf build/$(1) && FASTMIRROR_CYTHON_DIR=build/$(1)/c $(2) \
	$(PY) setup.py -q build --build-base build/$(1) --build-lib build/$(1)/lib --force

# pytest captures Python's output only: what the C code writes to stderr
# (an FM_ASSERT or sanitizer report) is seen even when the process aborts.
VARIANT_PYTEST = $(PY) -m pytest --capture=sys $(PYTEST_ARGS)

# The debug build (-O0, bounds checks, line tracing, FM_ASSERT invariant
# checks in the engine, the ring and the bitmap) under the engine and job
# tests, the fault injection and the randomized schedules.
DEBUG_TESTS ?= tests/test_build_switches.py tests/test_io_engine.py tests/test_copy_mode.py \
	tests/test_job_lifecycle.py tests/test_job_invariants.py tests/test_job_stress.py \
	tests/test_schedules.py tests/test_faults.py tests/test_threads_many.py \
	tests/test_hbitmap.py tests/test_hbitmap_threads.py

debug-test: $(DEPS)
	$(call VARIANT_BUILD,debug,FASTMIRROR_DEBUG=1)
	FASTMIRROR_DEBUG=1 PYTHONPATH=build/debug/lib $(VARIANT_PYTEST) $(DEBUG_TESTS)

# The extensions built with AddressSanitizer and UndefinedBehaviorSanitizer,
# under the engine, I/O and bitmap tests.  Python itself is not instrumented:
# the sanitizer runtime must be loaded first (LD_PRELOAD of the compiler's own
# libasan), Python's allocations go through malloc so that ASan sees them, and
# leak checking is off (the interpreter frees little at exit).  test_faults is
# left out: its child processes replace LD_PRELOAD with the fault shim.
SANITIZE ?= address,undefined
SANITIZE_TESTS ?= tests/test_build_switches.py tests/test_io_engine.py tests/test_copy_mode.py \
	tests/test_job_lifecycle.py tests/test_job_invariants.py tests/test_threads_many.py \
	tests/test_hbitmap.py tests/test_hbitmap_hypothesis.py tests/test_hbitmap_threads.py
SANITIZE_CC = $${CC:-$$($(PY) -c 'import sysconfig; print(sysconfig.get_config_var("CC").split()[0])')}

sanitize-test: $(DEPS)
	$(call VARIANT_BUILD,sanitize,FASTMIRROR_SANITIZE=$(SANITIZE))
	asan=$$($(SANITIZE_CC) -print-file-name=libasan.so) && test -e "$$asan" \
		|| { echo "no libasan.so for $(SANITIZE_CC)"; exit 1; }; \
	LD_PRELOAD="$$asan" PYTHONMALLOC=malloc \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	FASTMIRROR_SANITIZE=$(SANITIZE) PYTHONPATH=build/sanitize/lib \
	$(VARIANT_PYTEST) $(SANITIZE_TESTS)

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
