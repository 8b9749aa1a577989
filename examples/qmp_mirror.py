#!/usr/bin/env python3
"""Move a served disk to a new place while it is in use, over QMP.

    python3 examples/qmp_mirror.py QMP_SOCKET TARGET [--device NAME] [--speed BYTES/S]
                                   [--copy-mode background|write-blocking]

QMP_SOCKET is the control socket of `fastmirror serve ... --qmp QMP_SOCKET`;
the script starts a mirror of the served disk (drive-mirror) onto TARGET (a
file or a block device, written raw), waits until it is READY, shows the job
(query-block-jobs), completes it (block-job-complete) and waits for
BLOCK_JOB_COMPLETED: from then on the export serves TARGET, and its clients
(a VM) never noticed.  Exit 0 after the pivot, 1 if the job failed or was
cancelled.

It uses only QEMU's commands and events, through QEMU's own Python client
(pip install qemu.qmp), so it drives a QEMU or qemu-storage-daemon just
the same (--device is then the drive's name or node name).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from qemu.qmp import QMPClient


async def mirror(qmp_socket: str, target: str, device: str = "", speed: int = 0,
                 copy_mode: str = "background") -> bool:
    qmp = QMPClient("qmp-mirror")
    await qmp.connect(qmp_socket)       # the greeting and qmp_capabilities
    try:
        # qmp.events buffers every event from the connection on: a READY that
        # comes before drive-mirror returns is not missed.
        await qmp.execute("drive-mirror", {"device": device, "target": target,
                                           "sync": "full", "format": "raw",
                                           "speed": speed, "copy-mode": copy_mode})
        async for event in qmp.events:
            name, data = event["event"], event.get("data", {})
            if name == "BLOCK_JOB_READY":
                for job in await qmp.execute("query-block-jobs"):
                    print("ready: %(device)s %(offset)d/%(len)d bytes, %(status)s" % job,
                          flush=True)
                # The limit was for the bulk copy: the last of it goes at
                # full speed, while the disk's writers wait for the pivot.
                await qmp.execute("block-job-set-speed",
                                  {"device": data["device"], "speed": 0})
                await qmp.execute("block-job-complete", {"device": data["device"]})
            elif name == "BLOCK_JOB_ERROR":
                print("I/O error on the %s (%s)" % (data["operation"], data["action"]),
                      file=sys.stderr, flush=True)
            elif name == "BLOCK_JOB_COMPLETED":
                if "error" in data:
                    print("failed: %s" % data["error"], file=sys.stderr)
                    return False
                print("completed: the disk is now served from %s" % target, flush=True)
                return True
            elif name == "BLOCK_JOB_CANCELLED":
                print("cancelled", file=sys.stderr)
                return False
        return False
    finally:
        await qmp.disconnect()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("qmp_socket", metavar="QMP_SOCKET")
    p.add_argument("target", metavar="TARGET")
    p.add_argument("--device", default="", help='the export\'s name (default "")')
    p.add_argument("--speed", type=int, default=0,
                   help="bytes per second for the bulk copy (default 0: no limit)")
    p.add_argument("--copy-mode", default="background", choices=["background", "write-blocking"],
                   help="write-blocking: the disk's writes reach the target too before "
                        "they complete, so that the job gets READY even when they come "
                        "faster than --speed copies")
    args = p.parse_args()
    return 0 if asyncio.run(mirror(args.qmp_socket, args.target, args.device,
                                   args.speed, args.copy_mode)) else 1


if __name__ == "__main__":
    sys.exit(main())
