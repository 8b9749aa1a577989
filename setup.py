"""Build the Cython extensions.  Metadata lives in pyproject.toml.

Build switches (environment variables):
  FASTMIRROR_DEBUG=1      bounds checks, line tracing, -O0 -g and the C
                          invariant checks of fm_assert.h (FM_ASSERT)
  FASTMIRROR_SANITIZE=... compile and link the extensions with
                          -fsanitize=... (e.g. address,undefined); load the
                          matching libasan first (LD_PRELOAD), since the
                          Python interpreter itself is not instrumented
  FASTMIRROR_CYTHON_DIR=d write the generated C under d instead of beside
                          each .pyx, so that a variant build never leaves C
                          that a later release build would take as up to date
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

SANITIZERS = {"address", "undefined", "leak", "thread"}


def build_options(env=os.environ):
    """What the switches above mean: a dict of macros, cflags, ldflags,
    directives, annotate and build_dir.  Raises ValueError on a switch that
    makes no sense, before anything is compiled."""
    debug = env.get("FASTMIRROR_DEBUG") == "1"
    sanitize = [s for s in env.get("FASTMIRROR_SANITIZE", "").split(",") if s]
    unknown = sorted(set(sanitize) - SANITIZERS)
    if unknown:
        raise ValueError("FASTMIRROR_SANITIZE: unknown sanitizer %s (known: %s)"
                         % (", ".join(unknown), ", ".join(sorted(SANITIZERS))))
    if "thread" in sanitize and len(sanitize) > 1:
        raise ValueError("FASTMIRROR_SANITIZE: thread cannot be combined with another")
    macros = [("_GNU_SOURCE", "1")]
    cflags = ["-O0", "-g3"] if debug else ["-O2"]
    ldflags = [] if debug else ["-Wl,--strip-debug"]
    if debug:
        macros += [("CYTHON_TRACE_NOGIL", "1"), ("FASTMIRROR_DEBUG", "1")]
    if sanitize:
        # Frame pointers and debug info for readable reports; nothing stripped.
        flag = "-fsanitize=" + ",".join(sanitize)
        cflags += [flag, "-fno-omit-frame-pointer"] + ([] if debug else ["-g"])
        ldflags = [flag]
    directives = {
        "language_level": 3,
        "embedsignature": True,
        "boundscheck": debug,
        "wraparound": debug,
        "initializedcheck": debug,
        "cdivision": not debug,
        "linetrace": debug,
        "freethreading_compatible": True,
    }
    return {"macros": macros, "cflags": cflags, "ldflags": ldflags,
            "directives": directives, "annotate": debug,
            "build_dir": env.get("FASTMIRROR_CYTHON_DIR") or None}


def extensions(opts):
    # Every .pyx under src/fastmirror is a module named by its path:
    # src/fastmirror/_core/engine.pyx -> fastmirror._core.engine.
    return [
        Extension(
            os.path.splitext(os.path.relpath(path, "src"))[0].replace(os.sep, "."),
            [path],
            define_macros=opts["macros"],
            include_dirs=["src/fastmirror/_core"],   # ring.h, fm_assert.h
            extra_compile_args=opts["cflags"],
            extra_link_args=opts["ldflags"],
        )
        for path in sorted(glob.glob("src/fastmirror/**/*.pyx", recursive=True))
    ]


if __name__ == "__main__":
    OPTS = build_options()
    setup(
        ext_modules=cythonize(
            extensions(OPTS),
            compiler_directives=OPTS["directives"],
            annotate=OPTS["annotate"],
            include_path=["src"],
            build_dir=OPTS["build_dir"],
        ),
    )
