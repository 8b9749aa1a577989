"""The documentation says what the code does, and cites what exists.

- help(fastmirror.MirrorJob) documents every public method, the `source`
  handle and its lifetime, close(), and that `with MirrorJob(...)` starts it;
- every repository path the README cites is a file (or folder) that git
  tracks: a fresh clone must have it;
- `fastmirror --help` describes bench as the README's command table does;
- the type hints say what the docs say: wait() without a timeout returns a
  JobEvent (not Optional), and JobEvent.error carries .offset (mypy checks
  a snippet that relies on both).
"""

from __future__ import annotations

import inspect
import os
import pydoc
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import fastmirror
from helpers import REQUIRE_ALL, fm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pydoc(obj) -> str:
    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


def _public_methods(cls) -> list[str]:
    return sorted(name for name, member in vars(cls).items()
                  if not name.startswith("_")
                  and (inspect.isfunction(member) or isinstance(member, property)))


def test_every_public_method_of_mirrorjob_has_a_docstring_in_help():
    text = _pydoc(fastmirror.MirrorJob)
    names = _public_methods(fastmirror.MirrorJob)
    for required in ("start", "pause", "resume", "set_speed", "status", "wait",
                     "complete", "cancel", "close"):
        assert required in names
    undocumented = []
    for name in names:
        member = vars(fastmirror.MirrorJob)[name]
        doc = inspect.getdoc(member.fget if isinstance(member, property) else member)
        if not doc or not doc.strip():
            undocumented.append(name)
            continue
        # pydoc shows the docstring under the method's name.
        first = doc.strip().splitlines()[0].strip()
        assert first in text, "help(MirrorJob) lacks the doc of %s" % name
    assert not undocumented, "public methods without a docstring: %s" % undocumented


def test_mirrorjob_help_documents_source_with_and_close():
    doc = inspect.getdoc(fastmirror.MirrorJob)
    text = " ".join(_pydoc(fastmirror.MirrorJob).split())
    # The `source` attribute: what it is and how long it lives.
    assert re.search(r"^\s*source\s*$", doc, re.M), "the source attribute is not documented"
    for words in ("tracked handle", "lifetime", "source.close()"):
        assert words in text, words
    # The context manager starts the job; close() and what it leaves open.
    assert "with MirrorJob(...)" in text and "starts the job" in text
    assert "close()" in text and "more than once" in text
    assert "job.source is not closed" in " ".join(inspect.getdoc(
        fastmirror.MirrorJob.close).split())


def test_events_and_status_are_documented():
    for cls in (fastmirror.JobEvent, fastmirror.JobStatus, fastmirror.JobError,
                fastmirror.EventType, fastmirror.JobState):
        assert cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("), cls
    assert ".offset" in fastmirror.JobEvent.__doc__


def test_job_error_is_an_oserror_of_the_right_subclass_with_offset():
    from fastmirror.job.events import io_error
    e = io_error(2, "/nowhere", 4096, "read")
    assert isinstance(e, FileNotFoundError) and isinstance(e, fastmirror.JobError)
    assert (e.errno, e.filename, e.offset, e.operation) == (2, "/nowhere", 4096, "read")
    e = io_error(28, "/t", None, "write")
    assert type(e) is fastmirror.JobError and e.offset is None


# ---------------------------------------------------------------------------
# README citations
# ---------------------------------------------------------------------------

_EXT = re.compile(r"\.(py|pyx|pxd|pyi|h|c|md|json|png|toml|txt|cfg|ya?ml|sh|ini)$")


def _git_files() -> set[str]:
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        if REQUIRE_ALL:
            pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but no git checkout at %s" % ROOT)
        pytest.skip("not a git checkout (an installed copy): nothing to compare with")
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def readme_citations(text: str, top_level: set[str]) -> list[str]:
    """Paths the README cites: link and image targets; in inline code, words
    with a folder in the repository's top level (`src/...`, `bench/...`) or
    a bare file name with a known extension (`test_faults.py`); in code
    blocks, words with a top-level folder.  Absolute paths, globs, options
    and paths of other projects (QEMU's `util/hbitmap.c`) are not ours."""
    found = []
    parts = re.split(r"^```.*$", text, flags=re.M)
    for i, part in enumerate(parts):
        if i % 2:                              # inside a code block
            for word in re.findall(r"[\w.\-/]+", part):
                if "/" in word and word.split("/")[0] in top_level:
                    found.append(word)
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", part):
            if not re.match(r"[a-z]+:|#", target):
                found.append(target)
        for span in re.findall(r"`([^`]+)`", part):
            words = span.split()
            if words[0].startswith("-"):       # an option's example value
                continue
            for word in words:
                word = word.strip(",;:()")
                if (word.startswith(("/", "-", "~")) or "*" in word or "=" in word
                        or re.fullmatch(r"\.\w+", word)):
                    continue
                if "/" in word:
                    if word.split("/")[0] in top_level:
                        found.append(word)
                elif _EXT.search(word):
                    found.append(word)
    return found


def test_readme_cites_only_files_in_the_repository():
    files = _git_files()
    folders = {"/".join(f.split("/")[:n]) for f in files
               for n in range(1, f.count("/") + 1)}
    names = {os.path.basename(f) for f in files}
    top = {f.split("/")[0] for f in files}
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        cited = readme_citations(f.read(), top)
    assert "bench/results/performance.png" in cited   # the scan finds citations
    missing = sorted({c for c in cited
                      if not (c.rstrip("/") in files or c.rstrip("/") in folders
                              or ("/" not in c and c in names))})
    assert not missing, ("README cites paths that git does not track (a fresh clone "
                         "lacks them): %s" % missing)


def test_citation_scan_flags_a_missing_file():
    top = {"bench", "src"}
    text = textwrap.dedent("""\
        Raw results in `bench/results/bench-bulk.json`, see `job.py`,
        ![chart](bench/results/x.png); QEMU's `util/hbitmap.c`, `/dev/sdb`,
        `--chart FILE.png`, `mirror_*`.
        ```sh
        python -m pytest bench/bench_copy.py --json out.json
        ```
        """)
    assert sorted(readme_citations(text, top)) == [
        "bench/bench_copy.py", "bench/results/bench-bulk.json",
        "bench/results/x.png", "job.py"]


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _words(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def test_help_describes_bench_as_the_readme_does():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    row = re.search(r"^\| `fastmirror bench SRC DST` \| (.*) \|$", readme, re.M)
    assert row, "the README's command table has no bench row"
    described = _words(re.sub(r"\s*\([^)]*\)\s*$", "", row.group(1)))
    r = fm("--help", timeout=60)
    assert r.returncode == 0, r.stderr
    assert described in _words(r.stdout), (described, r.stdout)


# ---------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------

SNIPPET = """\
from typing import Optional
import fastmirror
from fastmirror import JobEvent

def final(job: fastmirror.MirrorJob) -> Optional[int]:
    ev: JobEvent = job.wait()
    maybe: Optional[JobEvent] = job.wait(1.0)
    if maybe is not None and ev.error is not None:
        offset: Optional[int] = ev.error.offset
        operation: Optional[str] = ev.error.operation
        return offset
    status_error = job.status().error
    return status_error.offset if status_error is not None else None
"""


def test_types_wait_returns_an_event_and_error_has_offset(tmp_path):
    try:
        from mypy import api as mypy_api
    except ImportError:
        if REQUIRE_ALL:
            pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but mypy is not installed "
                        "(make venv installs it)", pytrace=False)
        pytest.skip("mypy is not installed: pip install mypy (make venv installs it)")
    snippet = tmp_path / "snippet.py"
    snippet.write_text(SNIPPET)
    out, err, status = mypy_api.run([
        "--no-incremental", "--cache-dir", os.devnull, "--python-executable",
        sys.executable, "--strict-optional", "--follow-imports", "silent",
        str(snippet)])
    assert status == 0, out + err
