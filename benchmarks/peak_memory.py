"""Peak memory of a command and every process under it: `python -m benchmarks.peak_memory OUT.json CMD ...`.

Samples, every 0.5 s, the resident set size (RSS) summed over the command's process tree: the driver, and the
local Ray it starts (GCS, raylet, every worker and actor) are all its descendants. Summed RSS counts a shared page
(the Ray object store's shared memory, shared libraries) once per process that maps it, so it overstates the
machine's use; the proportional set size (PSS, shared pages split among their users) is sampled every 5 s beside it.
The result also names the processes at the RSS peak (Ray's process title, e.g. `ray::IDLE`, `ray::Feed`, and RSS),
largest first, so a regression points at its process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def breakdown(procs: list[psutil.Process]) -> list[dict]:
    """[{"name", "rss_mib"}] of each process, largest first; `name` is the title Ray sets (`ray::Role.method`)
    or the command's first two words."""
    rows = []
    for p in procs:
        try:
            words = p.cmdline() or [p.name()]
            rows.append({"name": " ".join(words[:2])[:80], "rss_mib": round(p.memory_info().rss / 2**20)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return sorted(rows, key=lambda r: -r["rss_mib"])


def pss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def main(out: str, *cmd: str) -> None:
    start = time.time()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    peak = {"rss": 0, "pss": 0, "processes": 0, "rss_at": 0.0}
    at_peak: list[dict] = []
    tail: list[str] = []
    last_pss = 0.0
    import threading

    def read() -> None:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip())
            del tail[:-20]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        procs = tree(proc.pid)
        r = rss(procs)
        if r > peak["rss"]:
            peak.update(rss=r, rss_at=time.time() - start, processes=len(procs))
            at_peak = breakdown(procs)
        if time.time() - last_pss >= 5:
            peak["pss"] = max(peak["pss"], pss(procs))
            last_pss = time.time()
        time.sleep(0.5)
    reader.join(timeout=10)
    result = {
        "command": " ".join(cmd),
        "returncode": proc.returncode,
        "wall_s": time.time() - start,
        "peak_rss_bytes": peak["rss"],
        "peak_rss_at_s": peak["rss_at"],
        "processes_at_peak": peak["processes"],
        "peak_pss_bytes": peak["pss"],
        "processes_at_peak_rss": at_peak,
        "output_tail": tail,
    }
    Path(out).write_text(json.dumps(result, indent=1))
    print(
        f"peak memory: {peak['rss'] / 2**30:.2f} GiB RSS summed ({peak['pss'] / 2**30:.2f} GiB PSS), "
        f"exit {proc.returncode}, {result['wall_s']:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
