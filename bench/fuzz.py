"""How fast the fuzz campaign runs, and where one execution's time goes: prints figures, asserts
nothing.

    python bench/fuzz.py              # breakdown per execution, then each mode for 10 s
    python bench/fuzz.py --seconds 30 # each timed run for 30 s

An *execution* is what the campaign counts (``Stats.executions``): one call run under one policy,
with every property checked on it.  The re-runs the checks make (non-interference, the legacy run of
the differential, the module-alone host writes) are part of an execution's cost, not executions.

The machine may be shared: the load average is printed beside the figures, and the breakdown is in
CPU time of this process (``time.process_time``), which other processes disturb less than the
wall-clock rates.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import Counter

from tdvmcall import scenario as S
from tdvmcall.fuzz import campaign as F
from tdvmcall.fuzz import properties as P
from tdvmcall.fuzz.strategies import Draw
from tdvmcall.guest import tdvmcall
from tdvmcall.kvm.tdx import KvmVcpu

PARTS = (
    "run_call",
    "check_noninterference",
    "check_host_writes",
    "check_differential",
    "clone",
    "parse",
    "check_integrity",
    "check_confidentiality_view",
    "check_outputs",
    "check_hardened",
    "check_gate",
    "check_cache",
)


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f} on {F.available_cpus()} CPUs"


def breakdown(n_examples: int = 3000) -> None:
    """CPU time per execution: drawing, running and checking, and the parts of the checking."""
    draw = Draw(random.Random(1))
    t = time.process_time()
    exs = [draw.example() for _ in range(n_examples)]
    gen = time.process_time() - t
    stats = P.Stats()
    t = time.process_time()
    for ex in exs:
        F.run_example(ex, ("legacy", "hardened"), stats)
    run = time.process_time() - t
    n = stats.executions
    scs = [S.parse(F._scenario(ex, c["guest"])) for ex in exs for c in ex["calls"]]
    t = time.process_time()
    for sc in scs:
        for policy in ("legacy", "hardened"):
            tdvmcall(sc.td, sc.guest.copy(), KvmVcpu(policy), sc.platform)
    bare = time.process_time() - t
    print(f"\nper execution, CPU microseconds ({n} executions of {n_examples} examples, both policies; {load()}):")
    print(f"  draw the example (fast mode)      {gen / n * 1e6:7.1f}")
    print(f"  run it and check every property   {run / n * 1e6:7.1f}")
    print(f"  total                             {(gen + run) / n * 1e6:7.1f}  = {n / (gen + run):,.0f} per CPU-second")
    print(f"  (one bare round trip, no checks   {bare / n * 1e6:7.1f})")

    # the parts, each timed around its calls (inclusive; nested parts overlap)
    spent: Counter = Counter()
    saved = {}

    def timed(mod, name):  # type: ignore[no-untyped-def]
        fn = getattr(mod, name)
        saved[(mod, name)] = fn

        def wrapper(*a, **kw):  # type: ignore[no-untyped-def]
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                spent[name] += time.process_time() - t0

        setattr(mod, name, wrapper)

    for name in PARTS:
        for mod in (P, F, S):
            if hasattr(mod, name) and (mod, name) not in saved and not (mod is S and name != "parse"):
                timed(mod, name)
    timed(S, "parse_guest")
    stats = P.Stats()
    for ex in exs:
        F.run_example(ex, ("legacy", "hardened"), stats)
    for (mod, name), fn in saved.items():
        setattr(mod, name, fn)
    print("  the parts (inclusive, with timer overhead; run_call = every round trip, re-runs included):")
    for name, s in spent.most_common():
        print(f"    {name:30s} {s / n * 1e6:7.1f}")


def rates(seconds: float) -> None:
    print(f"\nwall-clock rates, --policy both, {seconds:.0f} s each ({load()}):")
    r = F.campaign(seconds=seconds, seed=1)
    print(f"  hypothesis             {r.stats.executions:9d} executions  {r.executions_per_second:8,.0f}/s")
    for workers in sorted({1, F.available_cpus()}):
        r = F.fast_campaign(seconds=seconds, seed=1, workers=workers)
        print(
            f"  fast, {workers} worker(s)      {r.stats.executions:9d} executions  {r.executions_per_second:8,.0f}/s"
            f"   ({load()})"
        )


def main() -> None:
    seconds = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 10.0
    print(load())
    breakdown()
    rates(seconds)


if __name__ == "__main__":
    main()
