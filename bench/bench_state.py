"""The cost of a state file: 4 KiB tracked writes with and without one.

A MirrorJob with sync="none" mirrors a sparse source of FASTMIRROR_BENCH_SIZE
bytes (at least 1 GiB here) to a new sparse target, so that the copy has only
what the writes dirty; one thread writes 4 KiB blocks at random 4 KiB-aligned
offsets through job.source and times each write.  Four configurations,
interleaved round by round (the machine's load moves a lot):

  plain-inside    no state file, offsets within the first 64 MiB
  state-inside    state=PATH, the same offsets: 16 extents, all in the
                  activity log (64 slots of 4 MiB) after the first writes
  plain-outside   no state file, offsets anywhere in the disk
  state-outside   state=PATH, anywhere: most writes need an extent that is
                  not in the log, so a record is written and fdatasync'd
                  first, and extents leave the log only once a state file
                  covers them

The figures: p50 and p99 of one write (median over the rounds) and writes/s,
and the ratio of each state run to the plain run of the same round.  The
target of the issue: inside the log, at most 5 % on p50.

    python bench/bench_state.py [--rounds 7] [--seconds 1.5] [--out FILE]
    pytest bench/bench_state.py --benchmark-disable      # a smoke run
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from fastmirror import MirrorJob

BLOCK = 4096
INSIDE = 64 << 20
MIN_SIZE = 1 << 30
CONFIGS = ("plain-inside", "state-inside", "plain-outside", "state-outside")


def _percentile(values: list[int], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] / 1e3


def one_round(folder: str, size: int, config: str, seconds: float, seed: int) -> dict:
    """One window of writes in `config`: p50/p99 in µs, writes/s, and, with
    a state file, what its activity log did."""
    src = os.path.join(folder, "src.img")
    dst = os.path.join(folder, "dst-%s.img" % config)
    st = os.path.join(folder, "state-%s" % config)
    for p in (dst, st, st + ".al"):
        if os.path.exists(p):
            os.unlink(p)
    job = MirrorJob(src, dst, sync="none", state=st if config.startswith("state") else None)
    job.start()
    span = INSIDE if config.endswith("inside") else size
    rng = random.Random(seed)
    data = rng.randbytes(BLOCK)
    pwrite = job.source.pwrite
    clock = time.perf_counter_ns
    blocks = span // BLOCK
    try:
        # Warm up: the page cache, and the log's extents for "inside".
        end = clock() + int(0.2 * 1e9)
        while clock() < end:
            pwrite(data, rng.randrange(blocks) * BLOCK)
        lat = []
        t0 = clock()
        end = t0 + int(seconds * 1e9)
        while True:
            a = clock()
            if a >= end:
                break
            pwrite(data, rng.randrange(blocks) * BLOCK)
            lat.append(clock() - a)
        elapsed = (clock() - t0) / 1e9
        al = job._al
        extra = {"records": al.records, "snapshot_waits": al.snapshot_waits} if al else {}
    finally:
        job.cancel(force=True)
        job.wait(60)
        job.close()
        job.source.close()
    lat.sort()
    return {"p50_us": _percentile(lat, 0.5), "p99_us": _percentile(lat, 0.99),
            "writes_per_s": len(lat) / elapsed, **extra}


def run(rounds: int, seconds: float, size: int) -> tuple[dict, str]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("FASTMIRROR_BENCH_DIR")) as folder:
        with open(os.path.join(folder, "src.img"), "wb") as f:
            f.truncate(size)
        results: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        for r in range(rounds):
            order = list(CONFIGS) if r % 2 == 0 else list(reversed(CONFIGS))
            for c in order:
                results[c].append(one_round(folder, size, c, seconds, seed=r))
    lines = ["config          p50 us   p99 us   writes/s   p50 ratio  p99 ratio  "
             "(medians of %d rounds of %.1f s)" % (rounds, seconds)]
    for c in CONFIGS:
        rs = results[c]
        base = results["plain-" + c.split("-")[1]]
        r50 = [a["p50_us"] / b["p50_us"] for a, b in zip(rs, base)]
        r99 = [a["p99_us"] / b["p99_us"] for a, b in zip(rs, base)]
        lines.append("%-14s %7.1f  %7.1f  %9.0f   %8.3f  %9.3f" % (
            c, statistics.median(x["p50_us"] for x in rs),
            statistics.median(x["p99_us"] for x in rs),
            statistics.median(x["writes_per_s"] for x in rs),
            statistics.median(r50), statistics.median(r99)))
    for c in ("state-inside", "state-outside"):
        lines.append("%s: p50 ratio per round %s; log records per round %s, waits for a "
                     "state file %s" % (
                         c, [round(a["p50_us"] / b["p50_us"], 3) for a, b in
                             zip(results[c], results["plain-" + c.split("-")[1]])],
                         [x["records"] for x in results[c]],
                         [x["snapshot_waits"] for x in results[c]]))
    return results, "\n".join(lines)


def test_state_cost_smoke(tmp_path, monkeypatch):
    """A smoke run: every configuration writes and the table is made."""
    monkeypatch.setenv("FASTMIRROR_BENCH_DIR", str(tmp_path))
    results, table = run(1, 0.1, MIN_SIZE)
    assert all(results[c][0]["writes_per_s"] > 0 for c in CONFIGS)
    assert "state-inside" in table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--size", type=int, default=MIN_SIZE)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    _, table = run(args.rounds, args.seconds, max(args.size, MIN_SIZE))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
