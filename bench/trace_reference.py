"""Benchmark the reference parser of ``tdvmcall trace`` on the lines it is given: those that miss
the compiled fast path (docs/trace.md, "The reference parser").

    python bench/trace_reference.py                       # 40 MB traces, 1%, 10%, 100% slow
    python bench/trace_reference.py --alt mymod:parse     # and another parser of the same contract

For each share of ``kvm_exit`` lines that carry a quirk (``bench/trace.py``'s generator: a non-ASCII
task name, or a 16-digit counter-clock timestamp) it reads the trace in the command's 4 MiB chunks
and times, on one thread, per chunk: the whole ``parse_chunk`` (fast path and reference parser),
and the reference parser alone on the bytes ``parse_chunk`` hands it (the slow lines).  Medians
of ``--repeat`` passes, in milliseconds per 4 MiB chunk and in slow lines per second.  ``--alt``
times another function of ``parse_chunk_reference``'s signature on the same bytes (e.g. a former
polars version) and checks that it gives the same counts and aggregates.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from trace import QUIRKS, generate

from tdvmcall.trace import audit
from tdvmcall.trace import scan as trace_scan
from tdvmcall.trace.io import Chunk, Source, chunks
from tdvmcall.trace.reference import parse_chunk_reference
from tdvmcall.trace.rows import ReasonTable, TaskTable


def slow_bytes(chunk: Chunk) -> bytes:
    """What ``parse_chunk`` hands the reference parser for this chunk."""
    sc = trace_scan.Scanned(chunk.data, False)
    return b"\n".join(chunk.data[s:e] for _, s, e in sc.slow.tolist()) + b"\n" if len(sc.slow) else b""


def timed(fn, chunks_: list, repeat: int) -> float:
    """Median seconds of one pass of ``fn`` over every chunk."""
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for c in chunks_:
            fn(c)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=40)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--shares", default="0.01,0.1,1")
    ap.add_argument("--quirk", choices=QUIRKS, default="comm")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--alt", help="module:function, another parser of the same contract to time alongside")
    args = ap.parse_args()
    alt = None
    if args.alt:
        mod, _, fn = args.alt.partition(":")
        alt = getattr(importlib.import_module(mod), fn)
    gc.freeze()  # as the command does: the imports' objects are not walked by every collection
    for share in (float(x) for x in args.shares.split(",")):
        path = os.path.join(args.dir, f"tdvmcall-bench-ref-{args.size_mb}MB-{args.quirk}{share:g}.trace")
        if not os.path.exists(path):
            generate(path, args.size_mb, "ftrace", slow_share=share, quirk=args.quirk)
        with Source(path) as src:  # copies: the chunks of a mapped file are views of the mapping
            data = [Chunk(bytes(c.data), c.truncated) for c in chunks(src)]
        slow = [Chunk(s) for s in (slow_bytes(c) for c in data) if s]
        nslow = sum(bytes(c.data).count(b"\n") for c in slow)

        def whole(c: Chunk) -> None:
            audit.parse_chunk(c, "ftrace", "x", TaskTable(), ReasonTable())

        def ref(c: Chunk, parse=parse_chunk_reference) -> None:
            parse(c, "ftrace", "x", TaskTable(), ReasonTable())

        t_whole = timed(whole, data, args.repeat)
        t_ref = timed(ref, slow, args.repeat)
        per = 1e3 / len(data)
        print(
            f"{args.quirk} {share:>5.0%} of kvm_exit lines slow ({nslow:,} lines, {len(data)} chunks): "
            f"parse_chunk {t_whole * per:6.1f} ms/chunk; reference parser alone {t_ref * per:6.1f} ms/chunk, "
            f"{nslow / t_ref / 1e6:5.2f} M lines/s"
        )
        if alt is not None:
            t_alt = timed(lambda c: ref(c, alt), slow, args.repeat)
            for c in slow[:3]:
                a = parse_chunk_reference(c, "ftrace", "x", TaskTable(), ReasonTable())
                b = alt(c, "ftrace", "x", TaskTable(), ReasonTable())
                assert a.counts == b.counts and len(a.by_key["n"]) == len(b.by_key["n"]), "--alt disagrees"
            print(f"{'':>8}{args.alt}: {t_alt * per:6.1f} ms/chunk, {nslow / t_alt / 1e6:5.2f} M lines/s")


if __name__ == "__main__":
    main()
