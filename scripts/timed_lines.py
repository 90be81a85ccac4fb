"""Run a command and time its console: each line of its stdout and stderr is echoed with the seconds since start,
and the end prints the wall time, the line count and the longest silence between two lines (issue 19: `make run`
prints at most 150 lines, none more than 45 s after the one before).

    .venv/bin/python scripts/timed_lines.py [--max-gap S] [--max-lines N] -- make run

Exit status: the command's, or 1 when it succeeded but a limit given was exceeded.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-gap", type=float, default=None, help="fail when two lines are further apart (s)")
    parser.add_argument("--max-lines", type=int, default=None, help="fail when the console has more lines")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    start = time.perf_counter()
    last, lines, gap, gap_after = start, 0, 0.0, ""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    previous = "(start)"
    for line in proc.stdout:
        now = time.perf_counter()
        if now - last > gap:
            gap, gap_after = now - last, previous
        last, lines, previous = now, lines + 1, line.rstrip("\n")
        print(f"[{now - start:7.1f}s] {previous}", flush=True)
    code = proc.wait()
    wall = time.perf_counter() - start
    print(
        f"timed_lines: exit {code}, {wall:.0f} s ({wall / 60:.1f} min), {lines} lines, longest silence "
        f"{gap:.1f} s after: {gap_after[:100]}"
    )
    over = []
    if args.max_gap is not None and gap > args.max_gap:
        over.append(f"silence {gap:.1f} s > {args.max_gap} s")
    if args.max_lines is not None and lines > args.max_lines:
        over.append(f"{lines} lines > {args.max_lines}")
    if over:
        print(f"timed_lines: over the limits: {'; '.join(over)}")
    return code or (1 if over else 0)


if __name__ == "__main__":
    sys.exit(main())
