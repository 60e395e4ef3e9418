"""How ``tdvmcall check`` scales with the size of a catalog: prints figures, asserts nothing.

    python bench/check.py                  # 10,000 and 100,000 rows, each output format
    python bench/check.py --rows 100000    # one size
    python bench/check.py --src OTHER/src  # the same workload on another checkout (before/after)
    python bench/check.py --format=--json  # one format (written with "=": it starts with a dash)

The catalog is the shipped one (``data/guest-masks.csv``, 41 sites of 8 guests) repeated until it
has the number of rows asked, each row keeping its guest, mask and calls and getting a function
name of its own, so that every row is a site of its own (the shape of a catalog generated from many
firmware images: few distinct masks and calls, many sites).  Each format (the terminal report,
``--json``, ``--markdown``) is one process, ``python -m tdvmcall check --catalog FILE``, its output
into /dev/null.

Figures per process: CPU time (user + system, of the process alone: ``os.wait4``), its peak
resident memory, and wall time.  The machine may be shared: the load average is printed beside
the figures; CPU time is disturbed less by other processes than wall time.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORMATS = {"terminal": [], "--json": ["--json"], "--markdown": ["--markdown"]}


def make_catalog(path: Path, rows: int) -> None:
    shipped = (REPO / "src" / "tdvmcall" / "data" / "guest-masks.csv").read_text()
    header, *body = list(csv.reader(io.StringIO(shipped)))
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        for i in range(rows):
            row = list(body[i * len(body) // rows])  # the guests in blocks, as a generated catalog has them
            row[header.index("function")] += f"_{i}"
            w.writerow(row)


def run(src: Path, catalog: Path, extra: list[str]) -> tuple[float, int, float, int]:
    """CPU seconds (user + sys), peak RSS in MiB, wall seconds and the exit status of one check."""
    env = {**os.environ, "PYTHONPATH": str(src), "COLUMNS": "120"}
    start = time.monotonic()
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tdvmcall", "check", "--catalog", str(catalog), *extra],
            stdout=null,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stderr is not None
        proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, wall, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, action="append", help="catalog size (repeatable; default 10000 and 100000)")
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the src/ folder whose tdvmcall runs")
    ap.add_argument("--format", action="append", choices=list(FORMATS), help="output format(s) (default: all)")
    args = ap.parse_args()
    print(f"tdvmcall from {args.src}; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'rows':>8}  {'format':<10} {'CPU s':>8} {'peak MiB':>9} {'wall s':>8}  exit")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows or [10_000, 100_000]:
            catalog = Path(tmp) / f"catalog-{rows}.csv"
            make_catalog(catalog, rows)
            for name in args.format or list(FORMATS):
                cpu, rss, wall, status = run(args.src, catalog, FORMATS[name])
                print(f"{rows:>8}  {name:<10} {cpu:>8.1f} {rss:>9} {wall:>8.1f}  {status}", flush=True)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
