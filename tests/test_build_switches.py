"""The build switches: FM_ASSERT (fm_assert.h) checks in debug builds and is
nothing in release builds; setup.py turns FASTMIRROR_DEBUG and
FASTMIRROR_SANITIZE into the right compiler flags; and the extensions this
run imports were built the way its environment says (`make debug-test` and
`make sanitize-test` set the variables for the builds they test)."""

import importlib.util
import os
import shutil
import signal
import subprocess

import pytest

from helpers import require_that

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = os.path.join(ROOT, "src", "fastmirror", "_core")

# Each mode of the program makes one check fail; "ok" fails none.  The first
# check always holds and records that its condition was evaluated.
PROGRAM = r"""
#include <stdio.h>
#include <pthread.h>
#include "fm_assert.h"

static int evaluated;
__attribute__((unused)) static int seen(int v) { evaluated = 1; return v; }

int main(int argc, char **argv)
{
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    char mode = argc > 1 ? argv[1][0] : 'o';
    FM_ASSERT(seen(1) == 1);
    pthread_mutex_lock(&mu);
    FM_ASSERT_LOCKED(&mu);
    pthread_mutex_unlock(&mu);
    FM_ASSERT(mode != 'c');
    if (mode == 'l')
        FM_ASSERT_LOCKED(&mu);
    printf("evaluated=%d debug=%d\n", evaluated, FM_DEBUG);
    return 0;
}
"""


def line_of(text: str) -> int:
    return next(i for i, line in enumerate(PROGRAM.splitlines(), 1) if text in line)


@pytest.fixture(scope="module", params=["debug", "release"])
def program(request, tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    require_that(cc is not None, "no C compiler to build the FM_ASSERT test program")
    if not os.path.exists(os.path.join(CORE, "fm_assert.h")):
        pytest.skip("the source tree (fm_assert.h) is not here")
    d = tmp_path_factory.mktemp("fm_assert_" + request.param)
    src = d / "check.c"
    src.write_text(PROGRAM)
    debug = ["-DFASTMIRROR_DEBUG=1"] if request.param == "debug" else []
    subprocess.run([cc, "-Wall", "-Werror", "-O2", "-I", CORE, *debug, "-o", str(d / "check"),
                    str(src), "-lpthread"], check=True)
    return request.param, str(d / "check"), str(src)


def run(path, mode):
    return subprocess.run([path, mode], capture_output=True, text=True, timeout=30)


def test_holding_checks_pass_and_debug_builds_evaluate_them(program):
    kind, path, _ = program
    r = run(path, "ok")
    assert r.returncode == 0, r.stderr
    flag = "1" if kind == "debug" else "0"
    assert r.stdout.strip() == "evaluated=%s debug=%s" % (flag, flag)


@pytest.mark.parametrize("mode, text, what", [
    ("c", "FM_ASSERT(mode != 'c');", "mode != 'c'"),
    ("l", "FM_ASSERT_LOCKED(&mu);", "lock held: &mu"),
])
def test_failed_check_aborts_with_place_and_condition_in_debug_builds(program, mode, text,
                                                                      what):
    kind, path, src = program
    r = run(path, mode)
    if kind == "release":
        assert r.returncode == 0, r.stderr      # compiled out: not even evaluated
        assert r.stdout.strip() == "evaluated=0 debug=0"
        return
    assert r.returncode == -signal.SIGABRT, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    line = line_of(text) if mode == "c" else line_of("        " + text)
    assert r.stderr == "%s:%d: main: assertion failed: %s\n" % (src, line, what)


def load_setup():
    pytest.importorskip("Cython.Build")       # the wheel's test venv has no Cython
    spec = importlib.util.spec_from_file_location("fastmirror_setup",
                                                  os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)               # defines; builds only as __main__
    return mod


def test_setup_release_build_flags():
    opts = load_setup().build_options({})
    assert "-O2" in opts["cflags"] and "-Wl,--strip-debug" in opts["ldflags"]
    assert ("FASTMIRROR_DEBUG", "1") not in opts["macros"]
    assert not any(f.startswith("-fsanitize") for f in opts["cflags"] + opts["ldflags"])
    assert opts["build_dir"] is None and not opts["directives"]["boundscheck"]


def test_setup_debug_build_defines_the_assertion_macro():
    opts = load_setup().build_options({"FASTMIRROR_DEBUG": "1",
                                       "FASTMIRROR_CYTHON_DIR": "build/debug/c"})
    assert ("FASTMIRROR_DEBUG", "1") in opts["macros"]
    assert "-O0" in opts["cflags"] and "-Wl,--strip-debug" not in opts["ldflags"]
    assert opts["directives"]["boundscheck"] and opts["build_dir"] == "build/debug/c"


def test_setup_sanitize_switch_compiles_and_links_with_the_sanitizers():
    opts = load_setup().build_options({"FASTMIRROR_SANITIZE": "address,undefined"})
    assert "-fsanitize=address,undefined" in opts["cflags"]
    assert "-fno-omit-frame-pointer" in opts["cflags"] and "-g" in opts["cflags"]
    assert opts["ldflags"] == ["-fsanitize=address,undefined"]     # and not stripped


@pytest.mark.parametrize("value", ["adress", "address,thread", "undefined,fuzzer"])
def test_setup_refuses_unknown_sanitizers(value):
    with pytest.raises(ValueError, match="FASTMIRROR_SANITIZE"):
        load_setup().build_options({"FASTMIRROR_SANITIZE": value})


def test_imported_engine_was_built_as_the_environment_says():
    from fastmirror._core import engine

    with open(engine.__file__, "rb") as f:
        image = f.read()
    debug = os.environ.get("FASTMIRROR_DEBUG") == "1"
    assert (b"assertion failed" in image) == debug, (
        "%s %s the FM_ASSERT checks but FASTMIRROR_DEBUG is %s: a stale in-place build? "
        "(make clean build)" % (engine.__file__, "lacks" if debug else "has",
                                "set" if debug else "not set"))
    asan = "address" in os.environ.get("FASTMIRROR_SANITIZE", "").split(",")
    assert (b"__asan_" in image) == asan, engine.__file__
