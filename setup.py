"""Build the Cython extensions.  Metadata lives in pyproject.toml.

FASTMIRROR_DEBUG=1 builds with bounds checks, line tracing and -O0 -g.
"""
import glob
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("FASTMIRROR_DEBUG") == "1"

macros = [("_GNU_SOURCE", "1")]
cflags = ["-O0", "-g3"] if DEBUG else ["-O2"]
directives = {
    "language_level": 3,
    "embedsignature": True,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "linetrace": DEBUG,
    "freethreading_compatible": True,
}
if DEBUG:
    macros += [("CYTHON_TRACE_NOGIL", "1"), ("FASTMIRROR_DEBUG", "1")]

# Every .pyx under src/fastmirror is a module named by its path:
# src/fastmirror/_core/engine.pyx -> fastmirror._core.engine.
extensions = [
    Extension(
        os.path.splitext(os.path.relpath(path, "src"))[0].replace(os.sep, "."),
        [path],
        define_macros=macros,
        include_dirs=["src/fastmirror/_core"],   # ring.h
        extra_compile_args=cflags,
        extra_link_args=[] if DEBUG else ["-Wl,--strip-debug"],
    )
    for path in sorted(glob.glob("src/fastmirror/**/*.pyx", recursive=True))
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=DEBUG,
        include_path=["src"],
    ),
)
