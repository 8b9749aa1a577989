"""What the runs come to: per-tool summaries (medians, ranges, ratios to
fastmirror, also per round), the writer rounds' summary, the text tables
and lines of the report."""

from __future__ import annotations

import json
import mmap
import os
import statistics
from typing import Optional, Sequence

from fastmirror.bench.baselines import CopyShape, HugePages
from fastmirror.bench.records import FIO_PARTS, GB, MB, MiB, Run
from fastmirror.units import human, short

__all__ = ["summarize", "summarize_writer", "format_table", "format_writer_table",
           "ceiling_lines", "writer_line", "write_json"]


def summarize(runs: Sequence[Run], tools: Sequence[str], base: str = "fastmirror") -> dict:
    """Per tool (variant label) over the timed, successful bulk runs: medians
    and ranges; and the ratio of `base`'s median throughput to each tool's,
    also per round (paired)."""
    runs = [r for r in runs if r.writer_rate is None]
    out: dict = {}
    for tool in tools:
        ok = [r for r in runs if r.tool == tool and not r.warmup and r.ok]
        failed = [r for r in runs if r.tool == tool and not r.warmup and not r.ok]
        s: dict = {"runs": len(ok), "failed": len(failed)}
        if ok:
            g = [r.gbps for r in ok]
            s.update(
                median_gbps=statistics.median(g), min_gbps=min(g), max_gbps=max(g),
                median_mibps=statistics.median(r.mibps for r in ok),
                min_mibps=min(r.mibps for r in ok), max_mibps=max(r.mibps for r in ok),
                median_bytes_per_s=statistics.median(r.bytes_per_s for r in ok),
                median_wall_s=statistics.median(r.wall_s for r in ok),
                median_cpu_s=statistics.median(r.cpu_s for r in ok),
                median_cpu_s_per_gib=statistics.median(r.cpu_s_per_gib for r in ok),
            )
            buffers = sorted({r.detail["buffers"] for r in ok if r.detail.get("buffers")})
            if buffers:
                s["buffers"] = ", ".join(buffers)
            ready = [r.ready_gbps for r in ok if r.ready_gbps is not None]
            if ready:
                s.update(median_ready_gbps=statistics.median(ready),
                         min_ready_gbps=min(ready), max_ready_gbps=max(ready),
                         median_ready_s=statistics.median(r.ready_s for r in ok
                                                          if r.ready_s is not None))
        out[tool] = s
    fm = out.get(base, {}).get("median_gbps")
    fm_by_round = {r.round: r for r in runs if r.tool == base and not r.warmup and r.ok}
    fm_cpu = out.get(base, {}).get("median_cpu_s_per_gib")
    for tool, s in out.items():
        if fm and s.get("median_gbps"):
            s["fastmirror_ratio"] = fm / s["median_gbps"]
        # Rounds run every tool back to back, so the ratio within a round is
        # less exposed to a machine whose speed drifts between rounds.
        mine = [r for r in runs if r.tool == tool and not r.warmup and r.ok
                and r.gbps > 0 and r.round in fm_by_round]
        if mine and tool != base:
            s["fastmirror_ratio_rounds"] = [[r.round, fm_by_round[r.round].gbps / r.gbps]
                                            for r in mine]
            s["fastmirror_ratio_paired"] = statistics.median(
                fm_by_round[r.round].gbps / r.gbps for r in mine)
            s["fastmirror_ratio_paired_min"] = min(fm_by_round[r.round].gbps / r.gbps
                                                   for r in mine)
            s["fastmirror_ratio_paired_max"] = max(fm_by_round[r.round].gbps / r.gbps
                                                   for r in mine)
            both = [r for r in mine if r.ready_s and fm_by_round[r.round].ready_s]
            if both:
                s["fastmirror_ready_ratio_paired"] = statistics.median(
                    r.ready_s / fm_by_round[r.round].ready_s for r in both)
            cpu = [r for r in mine if r.cpu_s > 0]
            if cpu:
                s["fastmirror_cpu_ratio_paired"] = statistics.median(
                    fm_by_round[r.round].cpu_s / r.cpu_s for r in cpu)
        if fm_cpu is not None and s.get("median_cpu_s_per_gib"):
            s["fastmirror_cpu_ratio"] = fm_cpu / s["median_cpu_s_per_gib"]
        if s.get("median_gbps"):
            s["spread"] = (s["max_gbps"] - s["min_gbps"]) / s["median_gbps"]
    return out


def machine_line() -> str:
    """The report header's line on this machine: CPUs and load average now."""
    return "machine: %d CPUs, load average %.2f %.2f %.2f" % ((os.cpu_count() or 0,)
                                                            + os.getloadavg())


def median_details(runs, keys) -> dict:
    """{name: median of run.detail[key]} for each (key, name) some run has."""
    out = {}
    for key, name in keys:
        vals = [r.detail[key] for r in runs if r.detail.get(key) is not None]
        if vals:
            out[name] = statistics.median(vals)
    return out


def final_copy_modes(runs) -> list:
    """The copy modes the runs ended in, sorted."""
    return sorted({r.detail.get("copy_mode_final") for r in runs
                   if r.detail.get("copy_mode_final")})


def summarize_writer(runs: Sequence[Run], labels: Sequence[str],
                     rates: Sequence[str]) -> dict:
    """Per variant and writer rate: how many runs reached READY, the medians
    and ranges of the time to READY and of the total time, the rate the
    writer achieved until READY, what was copied again, the copy mode; and
    the time to READY against the same variant with no writer ("0"), as the
    ratio of medians and the median of the per-round ratios."""
    runs = [r for r in runs if r.writer_rate is not None and not r.warmup]
    out: dict = {}
    for label in labels:
        per: dict = {}
        idle = {r.round: r for r in runs if r.tool == label and r.writer_rate == "0"
                and r.ok and r.converged}
        for rate in rates:
            mine = [r for r in runs if r.tool == label and r.writer_rate == rate]
            if not mine:
                continue
            ok = [r for r in mine if r.ok]
            # READY is READY even when the run failed later (e.g. no COMPLETED in time).
            conv = [r for r in mine if r.converged and r.ready_s is not None]
            done = [r for r in conv if r.ok and r.detail.get("completed") is not False]
            s: dict = {"runs": len(mine), "converged": len(conv), "failed": len(mine) - len(ok),
                       "not_completed": sum(1 for r in conv
                                            if r.detail.get("completed") is False),
                       "errors": sorted({r.error for r in mine if r.error})}
            if conv:
                rs = [r.ready_s for r in conv]
                s.update(median_ready_s=statistics.median(rs), min_ready_s=min(rs),
                         max_ready_s=max(rs))
            if done:
                s.update(median_total_s=statistics.median(r.wall_s for r in done),
                         min_total_s=min(r.wall_s for r in done),
                         max_total_s=max(r.wall_s for r in done))
            if ok:
                s["median_cpu_s"] = statistics.median(r.cpu_s for r in ok)
            s.update(median_details(ok, (
                ("writer_rate_to_ready", "median_writer_bps"),
                ("writer_rate_whole", "median_writer_bps_whole"),
                ("extra_bytes_copied", "median_extra_bytes_copied"),
                ("chunks_recopied", "median_chunks_recopied"),
                ("copy_mode_switch_s", "median_copy_mode_switch_s"))))
            modes = final_copy_modes(ok)
            if modes:
                s["copy_modes_final"] = modes
            timeouts = [r.detail.get("ready_timeout") for r in mine if not r.converged]
            if timeouts and any(t is not None for t in timeouts):
                s["ready_timeout"] = max(t for t in timeouts if t is not None)
            if rate != "0" and idle:
                base = statistics.median(r.ready_s for r in idle.values())
                if conv and base > 0:
                    s["ready_vs_idle"] = s["median_ready_s"] / base
                paired = [r.ready_s / idle[r.round].ready_s for r in conv
                          if r.round in idle and idle[r.round].ready_s]
                if paired:
                    s["ready_vs_idle_paired"] = statistics.median(paired)
                    s["ready_vs_idle_paired_min"] = min(paired)
                    s["ready_vs_idle_paired_max"] = max(paired)
            per[rate] = s
        out[label] = per
    return out


def _align(rows: list[tuple], head: tuple) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def format_table(summary: dict, skipped: dict, base: str = "fastmirror") -> str:
    head = ("tool", "runs", "median GB/s", "min-max GB/s", "median MiB/s",
            "min-max MiB/s", "CPU s/GiB", "%s/tool" % base.split()[0], "per round")
    rows = [head]
    for tool, s in summary.items():
        if not s.get("runs"):
            rows.append((tool, "0/%d" % s["failed"], "-", "-", "-", "-", "-", "-", "-"))
            continue
        runs = "%d" % s["runs"] if not s["failed"] else "%d (+%d failed)" % (s["runs"], s["failed"])
        ratio = s.get("fastmirror_ratio")
        rows.append((
            "%s (%s)" % (tool, s["buffers"]) if s.get("buffers") else tool,
            runs, "%.3f" % s["median_gbps"],
            "%.3f-%.3f" % (s["min_gbps"], s["max_gbps"]),
            "%.0f" % s["median_mibps"], "%.0f-%.0f" % (s["min_mibps"], s["max_mibps"]),
            "%.3f" % s["median_cpu_s_per_gib"],
            "-" if tool == base or ratio is None else "%.2fx" % ratio,
            "%.2fx" % s["fastmirror_ratio_paired"] if "fastmirror_ratio_paired" in s else "-"))
        if "median_ready_gbps" in s:
            rows.append((
                "  (to READY)", "", "%.3f" % s["median_ready_gbps"],
                "%.3f-%.3f" % (s["min_ready_gbps"], s["max_ready_gbps"]),
                "%.0f" % (s["median_ready_gbps"] * GB / MiB),
                "%.0f-%.0f" % (s["min_ready_gbps"] * GB / MiB, s["max_ready_gbps"] * GB / MiB),
                "", "", ""))
    lines = _align(rows, head)
    width = max(len(r[0]) for r in rows)
    for tool, why in skipped.items():
        lines.append("%-*s  skipped: %s" % (width, tool, why))
    return "\n".join(lines)


def format_writer_table(wsummary: dict, skipped: dict) -> str:
    head = ("mirror", "writer", "READY", "to READY s (min-max)", "vs idle",
            "per round", "total s", "writer MB/s", "copied again", "copy mode")
    rows = [head]
    for label, per in wsummary.items():
        for rate, s in per.items():
            ready = "%d/%d" % (s["converged"], s["runs"])
            if s.get("median_ready_s") is not None:
                t = "%.3f (%.3f-%.3f)" % (s["median_ready_s"], s["min_ready_s"], s["max_ready_s"])
                total = "%.3f" % s["median_total_s"] if "median_total_s" in s else "-"
            else:
                t = "none in %.0f s" % s.get("ready_timeout", 0) if s.get("ready_timeout") \
                    else "-"
                total = "-"
            vs = "%.2fx" % s["ready_vs_idle"] if "ready_vs_idle" in s else "-"
            pr = "%.2fx" % s["ready_vs_idle_paired"] if "ready_vs_idle_paired" in s else "-"
            wb = "%.1f" % (s["median_writer_bps"] / MB) if s.get("median_writer_bps") else "-"
            if rate == "0":
                wb = "-"
            again = "-"
            if s.get("median_extra_bytes_copied") is not None:
                again = human(s["median_extra_bytes_copied"])
                if s.get("median_chunks_recopied") is not None:
                    again += " (%d chunks)" % s["median_chunks_recopied"]
            mode = ",".join(s.get("copy_modes_final", [])) or "-"
            if s.get("median_copy_mode_switch_s") is not None:
                mode += " @%.1fs" % s["median_copy_mode_switch_s"]
            if s.get("not_completed"):
                ready += " (%d not COMPLETED)" % s["not_completed"]
            if s["failed"]:
                ready += " (%d failed)" % s["failed"]
            rows.append((label, rate, ready, t, vs, pr, total, wb, again, mode))
    lines = _align(rows, head)
    for tool, why in skipped.items():
        lines.append("%s  skipped: %s" % (tool, why))
    return "\n".join(lines)


def ceiling_lines(summary: dict, base: str, shape: CopyShape,
                  huge: Optional[HugePages]) -> str:
    """What the fio rows mean, and `base` against the honest ceiling
    (fio-copy) round by round."""
    lines = []
    ordinary = [t for t in FIO_PARTS if t != "fio-copy" and summary.get(t, {}).get("runs")]
    if ordinary:
        lines.append("%s: ceilings with ordinary %s-page buffers, bs=1M: the block layer "
                     "splits their requests at the device's segment limit, so a copy in "
                     "huge pages can beat them" % (", ".join(ordinary),
                                                   short(mmap.PAGESIZE, "iB")))
    s = summary.get("fio-copy", {})
    if s.get("runs"):
        lines.append("fio-copy: the honest ceiling: SRC read and DST written at once, %s "
                     "requests (%s's), %d in flight per job, buffers: %s"
                     % (short(shape.io_size, "iB"), base, shape.depth, s.get("buffers", "?")))
        rounds = s.get("fastmirror_ratio_rounds")
        if rounds:
            lines.append("%s/fio-copy per round: %s; median %.2fx (ratio of medians %.2fx)"
                         % (base, " ".join("r%d %.2fx" % (n, x) for n, x in rounds),
                            s["fastmirror_ratio_paired"], s["fastmirror_ratio"]))
        if huge is not None and huge.dir is None and huge.why:
            lines.append("note: fio-copy is not the honest ceiling here: " + huge.describe())
    return "\n".join(lines)


def writer_line(r: Run) -> str:
    d = r.detail
    parts = []
    if r.converged and d.get("completed") is False:
        parts.append("READY %.3f s, %s" % (r.ready_s or 0, d.get("note") or "not COMPLETED"))
    elif r.converged:
        parts.append("READY %.3f s, total %.3f s" % (r.ready_s or 0, r.wall_s))
    elif r.converged is False:
        parts.append("no READY in %.0f s (cancelled)" % (d.get("ready_timeout") or 0))
    if d.get("writer_rate_to_ready") is not None:
        parts.append("writer %.1f MB/s" % (d["writer_rate_to_ready"] / MB))
    if d.get("extra_bytes_copied") is not None:
        again = "copied again %s" % human(d["extra_bytes_copied"])
        if d.get("chunks_recopied") is not None:
            again += " (%d chunks)" % d["chunks_recopied"]
        parts.append(again)
    if d.get("copy_mode_final"):
        parts.append("mode %s%s" % (d["copy_mode_final"],
                                    " from %.1f s" % d["copy_mode_switch_s"]
                                    if d.get("copy_mode_switch_s") is not None else ""))
    parts.append("CPU %.2f s" % r.cpu_s)
    if not r.ok:
        parts.append("FAILED: %s" % r.error)
    return ", ".join(parts)


def write_json(dest: str, doc: dict) -> None:
    """The --json document: to the file `dest`, or to stdout for '-'."""
    text = json.dumps(doc, indent=2, default=str)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")
