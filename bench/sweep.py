"""How long the mask sweep takes, and why: prints figures, asserts nothing.

    python bench/sweep.py            # the module gate, one round trip, the whole sweep (1 and 2 workers),
                                     # and the exhaustive route measured on one call, extrapolated
    python bench/sweep.py --full     # also run the exhaustive route over everything (minutes)

The machine may be shared: the load average is printed beside the figures.
"""

from __future__ import annotations

import os
import sys
import time

from tdvmcall.kvm.tdx import POLICIES
from tdvmcall.sweep import sweep as S


def timed(fn, *args, **kw):
    start = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - start


def main() -> None:
    full = "--full" in sys.argv[1:]
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")

    # the module layer: the real check_control over every mask, per TD setting
    S.module_accepts.cache_clear()
    _, gate = timed(lambda: [S.module_accepts(td.module, td.no_rbp_mod) for td in S.TD_SETTINGS])
    print(f"module gate: check_control on {S.NR_MASKS:,} masks x {len(S.TD_SETTINGS)} TD settings: {gate:.2f} s")

    # one round trip of the real model (fresh KVM vCPU and platform each time)
    t = next(x for x in S.targets() if x.call == "Instruction.IO" and x.case.name == "out")
    td = S.TD_SETTINGS[0]
    n = 2000
    for policy in POLICIES:
        _, sec = timed(lambda: [S.observe(td, policy, t, 0xFFCC) for _ in range(n)])
        print(f"one round trip ({t.call} {t.case.name}, {policy}): {sec / n * 1e6:.0f} us")

    # the whole sweep, footprint route
    for jobs in (1, 2):
        res, sec = timed(S.run_sweep, jobs=jobs)
        print(
            f"sweep, footprint route, {jobs} worker(s): {sec:.2f} s, {res['round_trips']:,} round trips, "
            f"{len(res['rows'])} calls x cases, agree={res['agree']}"
        )

    # the exhaustive route: every accepted mask, every call, case, TD and policy
    masks_total = sum(len(S.module_accepts(td.module, td.no_rbp_mod)) for td in S.TD_SETTINGS)
    runs = masks_total * len(POLICIES) * len(S.targets())
    _, sec = timed(lambda: [S.simulate(t, td, p, exhaustive=True) for td in S.TD_SETTINGS for p in POLICIES])
    per_run = sec / (masks_total * len(POLICIES))
    print(
        f"exhaustive route, one call and case ({t.call} {t.case.name}): {sec:.2f} s for "
        f"{masks_total * len(POLICIES):,} round trips; all {len(S.targets())}: {runs:,} round trips, "
        f"about {runs * per_run:.0f} s on one worker"
    )
    if full:
        res, sec = timed(S.run_sweep, exhaustive=True, jobs=os.cpu_count() or 1)
        print(
            f"sweep, exhaustive route, {os.cpu_count()} workers: {sec:.1f} s, {res['round_trips']:,} round trips, "
            f"agree={res['agree']}"
        )


if __name__ == "__main__":
    main()
