"""The PNG of `fastmirror bench --chart` (and of `python -m
fastmirror.bench.harness chart`): bulk throughput per tool, time to READY
per writer rate; drawn with matplotlib when it is installed."""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from fastmirror.units import human

__all__ = ["draw_chart", "chart_from_json"]


def draw_chart(path: str, summary: Optional[dict], wsummary: Optional[dict],
               title: str = "") -> Optional[str]:
    """A PNG: bulk throughput per tool (median, min-max whiskers) and time to
    READY per writer rate.  Returns None when drawn, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:   # ImportError, or a broken install
        return "matplotlib is not available (%s: %s); pip install matplotlib" % (
            type(e).__name__, e)
    panels = []
    if summary and any(s.get("runs") for s in summary.values()):
        panels.append("bulk")
    if wsummary and any(per for per in wsummary.values()):
        panels.append("writer")
    if not panels:
        return "nothing to draw"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), dpi=100,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "bulk":
            items = [(t, s) for t, s in summary.items() if s.get("runs")]
            names = [t for t, _ in items][::-1]
            med = [s["median_gbps"] for _, s in items][::-1]
            lo = [s["median_gbps"] - s["min_gbps"] for _, s in items][::-1]
            hi = [s["max_gbps"] - s["median_gbps"] for _, s in items][::-1]
            colors = ["#d62728" if n.startswith("fastmirror") else
                      "#1f77b4" if n.startswith("qemu-mirror") else
                      "#7f7f7f" if n.startswith("fio") else "#2ca02c" for n in names]
            ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
            for y, (v, h) in enumerate(zip(med, hi)):
                ax.text(v + h, y, "  %.2f" % v, va="center", ha="left", fontsize=8)
            ax.set_xlabel("GB/s (median of rounds; whiskers min-max)")
            ax.set_title("Bulk mirror / copy throughput")
            ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.18)
        else:
            labels = [lab for lab, per in wsummary.items() if per]
            rates: list[str] = []
            for lab in labels:
                for r in wsummary[lab]:
                    if r not in rates:
                        rates.append(r)
            reds = ["#d62728", "#ff7f0e", "#8c564b", "#e377c2"]
            blues = ["#1f77b4", "#17becf", "#9467bd", "#7f7f7f"]
            palette = {}
            for lab in labels:
                pool = reds if lab.startswith("fastmirror") else blues
                palette[lab] = pool[sum(1 for x in palette if (x.startswith("fastmirror")
                                                               == lab.startswith("fastmirror")))
                                    % len(pool)]
            width = 0.8 / max(1, len(labels))
            top = max([s.get("max_ready_s", 0) for lab in labels
                       for s in wsummary[lab].values()] + [0.001])
            for i, lab in enumerate(labels):
                xs, ys, lo, hi, miss = [], [], [], [], []
                for j, r in enumerate(rates):
                    s = wsummary[lab].get(r)
                    if not s:
                        continue
                    x = j + (i - (len(labels) - 1) / 2) * width
                    if s.get("median_ready_s") is not None:
                        xs.append(x)
                        ys.append(s["median_ready_s"])
                        lo.append(s["median_ready_s"] - s["min_ready_s"])
                        hi.append(s["max_ready_s"] - s["median_ready_s"])
                        if s["converged"] < s["runs"]:     # some never got READY
                            ax.text(x, s["max_ready_s"] + top * 0.02, "%d/%d\nREADY"
                                    % (s["converged"], s["runs"]), ha="center",
                                    va="bottom", fontsize=6)
                    else:
                        miss.append(x)
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=lab,
                       color=palette[lab])
                for x in miss:
                    ax.bar([x], [top * 1.1], width, color="none", hatch="//",
                           edgecolor=palette[lab])
                    ax.text(x, top * 1.12, "no\nREADY", ha="center", va="bottom", fontsize=6)
            ax.set_xticks(range(len(rates)))
            ax.set_xticklabels(["writer %s%s" % (r, "" if r in ("0", "max") else "/s")
                                for r in rates])
            ax.set_ylabel("seconds to READY (median; whiskers min-max)")
            ax.set_title("Time to READY under a random 4-64 KiB writer")
            ax.set_ylim(0, top * 1.35)
            ax.legend(fontsize=7, loc="upper left", ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def chart_from_json(png: str, json_paths: Sequence[str]) -> Optional[str]:
    """Draw the chart of earlier runs from their --json files: the bulk
    table of the first that has one, the writer table of the first that has
    one.  Returns None when drawn, else why not."""
    summary = wsummary = None
    sizes, fs, dates = set(), set(), set()
    for path in json_paths:
        with open(path) as f:
            doc = json.load(f)
        if summary is None and any(s.get("runs") for s in (doc.get("summary") or {}).values()):
            summary = doc["summary"]
        w = doc.get("writer") or {}
        if wsummary is None and w.get("summary"):
            wsummary = w["summary"]
        sizes.add(human(doc["size"]))
        m = doc.get("machine", {})
        fs.add("%s -> %s" % (m.get("fs_source") or "?", m.get("fs_target") or "?"))
        dates.add(time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(path))))
    return draw_chart(png, summary, wsummary, title="fastmirror bench: %s, %s, %s" % (
        ", ".join(sorted(sizes)), ", ".join(sorted(fs)), ", ".join(sorted(dates))))
