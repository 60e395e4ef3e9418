"""How fast the generated C check is, beside the model's Python: prints figures, asserts nothing.

    python bench/kvm_c.py            # build the C (the system compiler, -O2), time it, time the model

One workload for every contender: every call and case of the leaf table, each under six masks
(Linux's 0xFFCC, the case's minimal mask, the minimal mask without R10, without its highest
register, and two random masks), as the TDX module hands the registers to the VMM.  Contenders:

- the C function, called in a C loop over the workload (the cost KVM would pay per TDVMCALL exit);
- the same C function called from Python through ctypes, one call per vector (mostly ctypes);
- the model's hardened check alone, as ``kvm/tdx.py`` ``handle_tdvmcall()`` makes it before
  dispatch: the bus-lock test of the exit reason, ``leaves.lookup()``, ``required_inputs()``,
  ``possible_outputs()``, the verdict;
- the model's whole ``handle_tdvmcall()`` under ``hardened`` (cache load, check, handler, write-back).

The machine may be shared: the load average is printed beside the figures; each figure is the best
of five runs.
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from tdvmcall.abi.codes import EXIT_REASON_TDCALL
from tdvmcall.abi.regs import GPR_NAMES, NR_GPRS, RAX, RCX
from tdvmcall.export_c.generate import SOURCE, generate
from tdvmcall.kvm import leaves as L
from tdvmcall.kvm.platform import Platform
from tdvmcall.kvm.tdx import KvmVcpu, handle_tdvmcall
from tdvmcall.module import VcpuState, VmcallExit

LOOP = r"""
#include "tdvmcall_regs.h"

/* call the check on n vectors of 16 GPRs, rounds times over; return a sum of the answers so that
 * nothing can be optimised away */
u64 bench_loop(const u64 *vectors, unsigned long n, unsigned long rounds)
{
	u64 sum = 0, missing, unexposed;
	unsigned long r, i;

	for (r = 0; r < rounds; r++)
		for (i = 0; i < n; i++)
			sum += (u64)tdvmcall_check_regs(&vectors[16 * i], &missing, &unexposed) + missing + unexposed;
	return sum;
}
"""


def workload() -> list[list[int]]:
    rng = random.Random(7)
    out = []
    for leaf in L.LEAVES + (L.UNKNOWN_HYPERCALL,):
        for case in leaf.cases:
            regs = {name: 0x5A5A5A5A00000000 | i for i, name in enumerate(GPR_NAMES)}
            regs |= leaf.selector_values() | dict(case.regs)
            minimal = L.minimal_mask(leaf, case.regs)
            top = 1 << (minimal.bit_length() - 1)
            for mask in (
                0xFFCC,
                minimal,
                minimal & ~(1 << 10),
                minimal & ~top,
                rng.randrange(1 << 16),
                rng.randrange(1 << 16),
            ):
                vmm = [regs[GPR_NAMES[i]] if mask >> i & 1 else 0 for i in range(NR_GPRS)]
                vmm[RAX], vmm[RCX] = EXIT_REASON_TDCALL, mask
                out.append(vmm)
    return out


def best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def model_check(vmm: list[int]) -> tuple[str, list[str], list[str]]:
    """The hardened check of ``handle_tdvmcall()``, nothing else (the same model calls)."""
    exposed = {GPR_NAMES[i] for i in range(NR_GPRS) if vmm[RCX] >> i & 1}
    vals = {GPR_NAMES[i]: vmm[i] for i in range(NR_GPRS)}
    reason = vmm[RAX] & 0xFFFFFFFF
    bus_lock = reason != EXIT_REASON_TDCALL and reason & 0xFFFF == EXIT_REASON_TDCALL
    leaf = L.lookup(vmm[10], vmm[11], bus_lock)
    missing = [r for r in L.required_inputs(leaf, vals) if r not in exposed]
    unexposed = [r for r in L.possible_outputs(leaf, vals) if r not in exposed]
    verdict = "internal_error" if "r10" not in exposed else "refused" if missing or unexposed else "dispatch"
    return verdict, missing, unexposed


def main() -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("no C compiler: set $CC or install cc/gcc")
    vectors = workload()
    n = len(vectors)
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs; workload: {n} vectors")

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for name, text in generate().items():
            (d / name).write_text(text)
        (d / "loop.c").write_text(LOOP)
        flags = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared"]
        subprocess.run([cc, *flags, "-o", "lib.so", SOURCE, "loop.c"], cwd=d, check=True)
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        lib = ctypes.CDLL(str(d / "lib.so"))

        arr = np.ascontiguousarray(np.array(vectors, dtype=np.uint64))
        lib.bench_loop.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
        lib.bench_loop.restype = ctypes.c_uint64
        rounds = 20000
        sec = best(lambda: lib.bench_loop(arr.ctypes.data, n, rounds))
        c_ns = sec / (n * rounds) * 1e9

        lib.tdvmcall_check_regs.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        lib.tdvmcall_check_regs.restype = ctypes.c_int
        rows = [arr[i].ctypes.data for i in range(n)]
        m, u = ctypes.c_uint64(), ctypes.c_uint64()
        pm, pu = ctypes.addressof(m), ctypes.addressof(u)
        sec = best(lambda: [lib.tdvmcall_check_regs(p, pm, pu) for p in rows for _ in range(20)])
        ctypes_ns = sec / (n * 20) * 1e9

    sec = best(lambda: [model_check(v) for v in vectors for _ in range(5)])
    check_ns = sec / (n * 5) * 1e9

    def full() -> None:
        for v in vectors:
            mask = v[RCX]
            handle_tdvmcall(KvmVcpu("hardened"), VmcallExit(mask, list(v), [0] * 16, VcpuState()), Platform())

    sec = best(full, repeat=3)
    full_ns = sec / n * 1e9

    print(f"compiler: {version}")
    print(f"{'contender':<52} {'ns/call':>12} {'calls/s':>14} {'vs C':>10}")
    for name, ns in (
        ("C tdvmcall_check_regs(), C loop (-O2)", c_ns),
        ("C tdvmcall_check_regs() through ctypes", ctypes_ns),
        ("model: hardened check (lookup, required, possible)", check_ns),
        ("model: handle_tdvmcall(), hardened, whole exit", full_ns),
    ):
        print(f"{name:<52} {ns:>12,.1f} {1e9 / ns:>14,.0f} {ns / c_ns:>9,.0f}x")


if __name__ == "__main__":
    main()
