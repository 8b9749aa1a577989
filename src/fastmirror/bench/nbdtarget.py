"""`fastmirror bench --nbd-target SRC DST`: mirroring into an NBD export,
fastmirror against nbdcopy and QEMU's mirror job, in the same run.

The runs themselves are fastmirror.bench.nbd's (its docstring says what each
tool and target is): the qemu-nbd target serves DST (a file, emptied before
every run), the delay target is nbdkit's memory plugin behind the delay
filter (2 ms per WRITE and WRITE_ZEROES; no file).  Every round runs, on
each target in turn, every tool once in an order shuffled with --seed; the
server is restarted empty before each run (untimed), the source's pages
dropped from the page cache (nbd.drop_source: not the whole cache), and
after each run the target is compared with the source
(untimed; the delay target read back with nbdcopy).

The report gives, per target and tool, the median time, throughput and CPU
seconds per GiB of the source, the median of the per-round ratios
fastmirror against each other tool (time: above 1 means fastmirror was
faster; CPU: below 1 means fastmirror used less), and the issue's goals:
at least 1.0x nbdcopy on both targets and 1.0x QEMU's mirror into qemu-nbd,
CPU per GiB at most nbdcopy's.

SRC is only read.  DST is created, or truncated before every run: an
existing DST that is not empty is refused without --destroy-target.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Sequence

from fastmirror.bench import nbd
from fastmirror.bench.disk import tool_version
from fastmirror.bench.report import machine_line
from fastmirror.units import human

__all__ = ["TARGETS", "TOOLS", "plan", "summarize_runs", "format_report", "run_nbd_target"]

TARGETS = nbd.TARGETS
TOOLS = nbd.TOOLS
GiB = 1 << 30
GB = 1e9
# The goals: which rows carry one, and what it asks.
GOALS = {
    ("qemu-nbd", "nbdcopy"): "time >= 1.0x, CPU/GiB <= nbdcopy's",
    ("qemu-nbd", "qemu-mirror"): "time >= 1.0x",
    ("delay", "nbdcopy"): "time >= 1.0x, CPU/GiB <= nbdcopy's",
}
DESCRIBE = {
    "qemu-nbd": "qemu-nbd -t -k SOCK -f raw DST (emptied before every run)",
    "delay": "nbdkit -U SOCK --filter=delay memory size=SIZE delay-write=%s delay-zero=%s"
             % (nbd.DELAY, nbd.DELAY),
}
COMMANDS = {
    "fastmirror": "MirrorJob(SRC, URI%s) built untimed (opens, connects), then timed: "
                  "start, READY, complete, COMPLETED (flushed); CPU: this process",
    "nbdcopy": "nbdcopy SRC URI (its defaults; flushes nothing)",
    "nbdcopy-flush": "nbdcopy --flush SRC URI",
    "qemu-mirror": "qemu-storage-daemon: SRC as a file node (cache.direct=on, aio=native), "
                   "the target as an nbd node; QMP blockdev-mirror sync=full (QEMU's "
                   "defaults), block-job-complete at READY (the nodes opened and connected "
                   "before the clock); CPU: the daemon's",
}


def plan(targets: Sequence[str], tools: Sequence[str],
         which=None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """What can run here: (target -> its tools, fastmirror first; what is
    skipped -> why).  A target runs only with at least one peer tool.
    `which`: shutil.which, or a stand-in."""
    which = which or shutil.which
    runs: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    for kind in targets:
        binary = nbd.BINARIES[kind]
        if which(binary) is None:
            skipped[kind] = "%s is not installed" % binary
            continue
        names = ["fastmirror"]
        for tool in tools:
            if tool == "fastmirror":
                continue
            key = "%s on %s" % (tool, kind)
            if tool not in nbd.scenario_tools(kind):
                skipped[key] = "runs on the qemu-nbd target only"
                continue
            need = nbd.BINARIES[tool]
            if need is not None and which(need) is None:
                skipped[key] = "%s is not installed" % need
                continue
            names.append(tool)
        if kind == "delay" and which("nbdcopy") is None:
            skipped[kind] = "nbdcopy is not installed (it reads the target back to check it)"
            continue
        if len(names) < 2:
            skipped[kind] = "no other tool to compare with"
            continue
        runs[kind] = names
    return runs, skipped


def summarize_runs(runs: Sequence[dict], size: int) -> dict:
    """target -> tool -> medians over the runs that succeeded; the
    ratios against fastmirror are medians of per-round ratios (rounds where
    both succeeded); the goals of the rows that have one."""
    gib = size / GiB
    out: dict = {}
    for kind in dict.fromkeys(r["target"] for r in runs):
        mine = [r for r in runs if r["target"] == kind]
        tools: dict = {}
        for name in sorted(dict.fromkeys(r["tool"] for r in mine), key=_order):
            ok = [r for r in mine if r["tool"] == name and r["ok"]]
            bad = [r for r in mine if r["tool"] == name and not r["ok"]]
            t: dict = {"runs": len(ok), "failed": len(bad),
                       "errors": [r["error"] for r in bad]}
            if ok:
                secs = [r["s"] for r in ok]
                t.update(s=statistics.median(secs), s_min=min(secs), s_max=max(secs),
                         bytes_per_s=size / statistics.median(secs),
                         cpu_per_gib=statistics.median(r["cpu"] / gib for r in ok))
            tools[name] = t
        fm = {r["round"]: r for r in mine if r["tool"] == "fastmirror" and r["ok"]}
        for name, t in tools.items():
            if name == "fastmirror":
                continue
            pairs = [(fm[r["round"]], r) for r in mine
                     if r["tool"] == name and r["ok"] and r["round"] in fm]
            if pairs:
                t["speedup"] = statistics.median(o["s"] / f["s"] for f, o in pairs)
                cpu = [f["cpu"] / o["cpu"] for f, o in pairs if o["cpu"] > 0]
                t["cpu_ratio"] = statistics.median(cpu) if cpu else None
                t["rounds_won"] = sum(1 for f, o in pairs if f["s"] <= o["s"])
                t["rounds_paired"] = len(pairs)
            goal = GOALS.get((kind, name))
            if goal is not None:
                t["goal"] = goal
                met = "speedup" in t and t["speedup"] >= 1.0
                if "CPU" in goal:
                    met = met and "cpu_per_gib" in t and "cpu_per_gib" in tools["fastmirror"] \
                        and tools["fastmirror"]["cpu_per_gib"] <= t["cpu_per_gib"]
                t["goal_met"] = bool(met)
        out[kind] = tools
    return out


def _order(tool: str) -> int:
    return TOOLS.index(tool) if tool in TOOLS else len(TOOLS)


def _title(kind: str) -> str:
    return ("qemu-nbd target (a file on this machine)" if kind == "qemu-nbd" else
            "delay target (nbdkit memory + delay filter, %s per WRITE and WRITE_ZEROES)"
            % nbd.DELAY)


def format_report(summary: dict, rounds: int) -> str:
    """One table per target."""
    lines: list[str] = []
    for kind, tools in summary.items():
        if lines:
            lines.append("")
        lines.append("%s: medians of %d interleaved round%s" % (_title(kind), rounds,
                                                                 "s" if rounds != 1 else ""))
        head = ("tool", "time (min-max)", "MB/s", "CPU s/GiB", "fastmirror vs",
                "CPU vs", "won", "goal")
        rows = [head]
        for name, t in tools.items():
            if not t["runs"]:
                rows.append((name, "FAILED: %s" % (t["errors"][0] if t["errors"] else "?"),
                             "", "", "", "", "", _goal(t)))
                continue
            rows.append((
                name, "%.3f s (%.3f-%.3f)" % (t["s"], t["s_min"], t["s_max"]),
                "%.1f" % (t["bytes_per_s"] / 1e6), "%.2f" % t["cpu_per_gib"],
                "%.2fx" % t["speedup"] if t.get("speedup") is not None else "-",
                "%.2fx" % t["cpu_ratio"] if t.get("cpu_ratio") is not None else "-",
                "%d of %d" % (t["rounds_won"], t["rounds_paired"]) if "rounds_won" in t
                else "-",
                _goal(t)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        failed = ["%s: %d failed (%s)" % (n, t["failed"], "; ".join(t["errors"]))
                  for n, t in tools.items() if t["failed"] and t["runs"]]
        lines.extend("  " + f for f in failed)
    lines.append("")
    lines.append("fastmirror vs = median of the per-round ratios tool time / fastmirror "
                 "time (>1: fastmirror faster); CPU vs = median of fastmirror CPU / tool "
                 "CPU (<1: fastmirror used less); CPU = user + system seconds per GiB of "
                 "the source; won = rounds fastmirror was at least as fast; MB/s = 1e6 "
                 "bytes/s of the source's size (holes included)")
    return "\n".join(lines)


def _goal(t: dict) -> str:
    if "goal" not in t:
        return "-"
    return "%s: %s" % (t["goal"], "met" if t["goal_met"] else "NOT met")


def _line(r: dict) -> str:
    if not r["ok"]:
        return "FAILED: %s" % r["error"]
    return "%7.3f s  CPU %.3f s%s" % (r["s"], r["cpu"],
                                      "  (%s)" % r["calls"] if r.get("calls") else "")


def run_nbd_target(args, src: str, dst: str, size: int, runs_plan: dict[str, list[str]],
                   skipped: dict[str, str], notes: list[str]) -> tuple[dict, str]:
    """The rounds; returns (the JSON document, the text report).  The header
    and a line per run go to stdout as they happen."""
    dropping = args.drop_caches
    conns = args.connections
    header = [
        "fastmirror bench --nbd-target: %s (%s, %d bytes) into NBD targets, %d round%s, "
        "order shuffled each round (seed %d)" % (src, human(size), size, args.rounds,
                                                 "s" if args.rounds != 1 else "", args.seed),
        "page cache: %s" % ("sync, then the source's pages dropped (posix_fadvise) before "
                            "every run" if dropping else
                            "not dropped (--no-drop-caches), sync before every run"),
        machine_line(),
    ]
    for kind, tools in runs_plan.items():
        header.append("%s: %s; tools %s" % (kind, DESCRIBE[kind].replace("DST", dst),
                                            ", ".join(tools)))
    described = dict.fromkeys(t for tools in runs_plan.values() for t in tools)
    commands = {t: COMMANDS[t] % ((", connections=%d" % conns if conns else "",)
                                  if t == "fastmirror" else ()) for t in described}
    header.extend("%s: %s" % (t, c) for t, c in commands.items())
    for what, why in skipped.items():
        header.append("skipped %s: %s" % (what, why))
    for line in notes + header:
        print(line)
    sys.stdout.flush()

    def before_run() -> None:
        if dropping:
            nbd.drop_source(src)
        else:
            os.sync()
        if args.settle:
            time.sleep(args.settle)

    def log(r: dict) -> None:
        print("  round %-2d %-9s %-14s %s" % (r["round"], r["target"], r["tool"], _line(r)))
        sys.stdout.flush()

    folder = tempfile.mkdtemp(prefix="fastmirror-bench-nbd-")
    try:
        runs = nbd.run_rounds(runs_plan, src, folder, args.rounds, size, seed=args.seed,
                              target_file=dst, connections=conns, keep_going=True,
                              before_run=before_run, log=log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for r in runs:
        if r["ok"]:
            r["cpu_per_gib"] = r["cpu"] / (size / GiB)
            r["bytes_per_s"] = size / r["s"]
    summary = summarize_runs(runs, size)
    text = format_report(summary, args.rounds)
    doc = {
        "version": 1,
        "kind": "nbd-target",
        "source": src, "target": dst, "size": size,
        "settings": {"rounds": args.rounds, "seed": args.seed, "settle": args.settle,
                     "targets": list(runs_plan), "tools": runs_plan,
                     "connections": conns, "delay": nbd.DELAY,
                     "drop_caches": bool(dropping)},
        "commands": commands,
        "servers": {k: DESCRIBE[k].replace("DST", dst) for k in runs_plan},
        "skipped": skipped,
        "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
                    "kernel": os.uname().release,
                    "versions": {b: tool_version(b, b) for b in
                                 ("qemu-nbd", "nbdkit", "nbdcopy", "qemu-storage-daemon")
                                 if shutil.which(b)}},
        "notes": notes,
        "header": header,
        "runs": runs,
        "summary": summary,
        "goals": {"%s %s" % k: {"goal": v, "met": summary.get(k[0], {}).get(k[1], {})
                                .get("goal_met")} for k, v in GOALS.items()},
    }
    return doc, text
