"""Benchmark ``tdvmcall trace`` against a plain per-line regex loop and ``grep -c kvm_exit``.

    python bench/trace.py                     # 300 MB ftrace text in /tmp, kept for reruns
    python bench/trace.py --size-mb 100 --dir /var/tmp --format perf

The generated trace is realistic in shape (docs/abi.md §7 line formats): several TDs whose guests use
the masks of the shipped guest catalog (Linux 0xFFCC, older Linux and td-shim 0xFC00, COCONUT-SVSM
and OpenVMM per-call masks, Hyper-V hypercalls 0x0D04), their non-TDVMCALL exits (EPT_VIOLATION,
EXTERNAL_INTERRUPT, ...), a legacy VM, and the noise events a ``kvm`` + ``sched`` capture holds
(kvm_entry, kvm_pio, kvm_msr, sched_switch, ...).  It is written once per size and format and is
never committed.

Each contender runs as its own process on the same file, one after the other, in ``--repeat``
rounds (3 by default: this machine's speed varies by 20-30% from minute to minute, so single runs
mislead); medians are shown, with the fastest and slowest wall times.  Wall time, CPU time and peak
RSS come from ``wait4``.  The first run of each reads the file from the page cache like the others
(the generator just wrote it).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import time

# --- the baseline: what a user would write ---------------------------------------------------
BASELINE = r"""
import re, sys, collections
# same fields as tdvmcall trace: comm, pid, tgid, cpu, timestamp, vcpu, reason (+flags), info1
RX = re.compile(r"^\s*(.+?)-(\d+)\s+(?:\(\s*([-\d]+)\)\s+)?\[(\d+)\]\s+(?:\S+\s+)?(\d+\.\d+):\s+kvm_exit:\s+"
                r"vcpu (\d+) reason (\S+(?: \S+)*?) rip 0x[0-9a-f]+ info1 0x([0-9a-f]{16}) "
                r"info2 0x[0-9a-f]{16} intr_info 0x[0-9a-f]{8} error_code 0x[0-9a-f]{8}")
counts = collections.Counter()
with open(sys.argv[1], errors="replace") as f:
    for line in f:
        m = RX.search(line)
        if m:
            comm, pid, tgid, cpu, ts, vcpu, reason, info1 = m.groups()
            counts[(pid, vcpu, reason, int(info1, 16))] += 1
print(sum(counts.values()))
"""
PERF_BASELINE = (
    BASELINE.replace(r"(.+?)-(\d+)\s+(?:\(\s*([-\d]+)\)\s+)?", r"(.+?)\s+(?:(\d+)/)?(\d+)\s+")
    .replace(r"(?:\S+\s+)?(\d+\.\d+):\s+kvm_exit:", r"(\d+\.\d+):\s+kvm:kvm_exit:")
    .replace("comm, pid, tgid, cpu", "comm, tgid, pid, cpu")
)

# --- the generator ---------------------------------------------------------------------------
#: (name, tgid, vCPUs, {reason: [(mask, weight)]}) per TD, after the guest catalog
GUESTS = [
    (
        "linux-6.8",
        4100,
        8,
        {
            r: [(0xFFCC, 1)]
            for r in ("HLT", "MSR_WRITE", "MSR_READ", "CPUID", "EPT_MISCONFIG", "IO_INSTRUCTION", "TDCALL", "VMCALL")
        },
    ),
    (
        "linux-6.1",
        4300,
        4,
        {
            r: [(0xFC00, 1)]
            for r in ("HLT", "MSR_WRITE", "MSR_READ", "CPUID", "EPT_MISCONFIG", "IO_INSTRUCTION", "TDCALL")
        },
    ),
    (
        "coconut-svsm",
        4500,
        2,
        {
            "TDCALL": [(0x3C00, 1)],
            "CPUID": [(0xFC00, 1)],
            "MSR_READ": [(0x1C00, 1)],
            "MSR_WRITE": [(0x3C00, 1)],
            "HLT": [(0x1C00, 1)],
            "IO_INSTRUCTION": [(0xFC00, 1)],
            "VMCALL": [(0x0D04, 1)],
        },
    ),
    (
        "openvmm",
        4700,
        2,
        {
            "MSR_READ": [(0x1C00, 1)],
            "MSR_WRITE": [(0x3C00, 1)],
            "TDCALL": [(0x3C00, 1)],
            "IO_INSTRUCTION": [(0xFF00, 1)],
            "VMCALL": [(0x0D04, 1)],
            "HLT": [(0x1C00, 1)],
            "CPUID": [(0x7C00, 1)],
        },
    ),
]
#: how often each reason occurs among a TD's TDVMCALL exits
REASON_WEIGHTS = {
    "HLT": 30,
    "MSR_WRITE": 25,
    "EPT_MISCONFIG": 10,
    "IO_INSTRUCTION": 10,
    "CPUID": 8,
    "MSR_READ": 8,
    "TDCALL": 6,
    "VMCALL": 3,
}
TD_OTHER = ["EPT_VIOLATION", "EXTERNAL_INTERRUPT", "EXCEPTION_NMI", "TRIPLE_FAULT"]
VM_REASONS = [
    ("EPT_VIOLATION", None),
    ("EXTERNAL_INTERRUPT", 0),
    ("HLT", 0),
    ("MSR_WRITE", 0),
    ("IO_INSTRUCTION", None),
    ("CPUID", 0),
    ("EPT_MISCONFIG", 0),
    ("PAUSE_INSTRUCTION", 0),
]
IO_QUALS = [0x3F80008, 0x3F80000, 0x3FD0008, 0x700008, 0x710000, 0xCF80018, 0xCFC0008, 0x600008]
NOISE = [
    "kvm_entry: vcpu {v}, rip 0x{r:x}",
    "kvm_userspace_exit: reason KVM_EXIT_IO (2)",
    "kvm_pio: pio_write at 0x3f8 size 1 count 1 val 0x41",
    "kvm_msr: msr_write 808 = 0x10",
    "kvm_hypercall: nr 0xb a0 0x1 a1 0x0 a2 0x0 a3 0x0",
    "kvm_fpu: load",
    "sched_switch: prev_comm={c} prev_pid={p} prev_prio=120 prev_state=S ==> next_comm=swapper/1 "
    "next_pid=0 next_prio=120",
    "kvm_apic_accept_irq: apicid 1 vec 236 (Fixed|edge)",
]


def _payload(v: int, reason: str, rip: int, info1: int, info2: int = 0, intr: int = 0) -> str:
    return (
        f"vcpu {v} reason {reason} rip 0x{rip:x} info1 0x{info1:016x} info2 0x{info2:016x} "
        f"intr_info 0x{intr:08x} error_code 0x00000000"
    )


def _line(fmt: str, comm: str, pid: int, tgid: int, cpu: int, ts: float, event: str, body: str) -> str:
    if fmt == "perf":
        return (
            f"{comm:>16} {tgid}/{pid} [{cpu:03d}] {ts:.6f}: kvm:{event}: {body}\n"
            if event.startswith("kvm")
            else f"{comm:>16} {tgid}/{pid} [{cpu:03d}] {ts:.6f}: sched:{event}: {body}\n"
        )
    flags = "" if fmt == "trace-cmd" else "d..2. "
    return f"{comm:>16}-{pid:<7} [{cpu:03d}] {flags}{ts:.6f}: {event}: {body}\n"


#: quirks that send a kvm_exit line to the reference parser (docs/abi.md §7; docs/trace.md): a non-ASCII
#: task name, or a counter clock's timestamp of 16 digits (``trace_clock=x86-tsc`` after some uptime)
QUIRKS = ("comm", "tsc")
_STAMP = re.compile(r" (\d+)\.(\d{6}): ")


def quirky(line: str, quirk: str) -> str:
    """The line with the quirk that takes it off the fast path."""
    if quirk == "comm":
        return line.replace("CPU ", "CPÜ ", 1)
    return _STAMP.sub(lambda m: f" {10**15 + int(m[1]) * 10**6 + int(m[2])}: ", line, count=1)


def generate(
    path: str,
    size_mb: int,
    fmt: str = "ftrace",
    seed: int = 1,
    slow_share: float = 0.0,
    quirk: str = "comm",
    noise: bool = True,
) -> int:
    """Write a trace of about ``size_mb`` MB; returns its number of lines.  ``slow_share`` of the
    kvm_exit lines (0 to 1) carry ``quirk`` (:data:`QUIRKS`), so that they take the slow path.
    Without ``noise``, every line is a ``kvm_exit`` (after the header): the worst case for the parser
    and the best for ``grep -c``."""
    rnd = random.Random(seed)
    odd = random.Random(seed + 1)  # its own stream: the trace is the same whatever the share
    tds = []
    for _guest, tgid, ncpu, masks in GUESTS:
        reasons = [r for r in REASON_WEIGHTS if r in masks]
        weights = [REASON_WEIGHTS[r] for r in reasons]
        tds += [(f"CPU {i}/KVM", tgid + 1 + i, tgid, i, masks, reasons, weights) for i in range(ncpu)]
    vms = [(f"CPU {i}/KVM", 5201 + i, 5200, i) for i in range(4)]
    target, written, lines, ts = size_mb * 1_000_000, 0, 0, 1000.0
    with open(path, "w") as f:
        if fmt == "ftrace":
            f.write("# tracer: nop\n#\n# entries-in-buffer/entries-written: 0/0   #P:2\n#\n")
            lines += 4
        elif fmt == "trace-cmd":
            f.write("cpus=2\n")
            lines += 1
        while written < target:
            buf = []
            for _ in range(2000):
                ts += rnd.random() * 0.0001
                cpu = rnd.randrange(2)
                r = rnd.random() * (1.0 if noise else 0.55)
                if r < 0.40:  # a TDVMCALL exit of a TD
                    comm, pid, tgid, v, masks, reasons, weights = rnd.choice(tds)
                    reason = rnd.choices(reasons, weights)[0]
                    mask = masks[reason][0][0]
                    buf.append(_line(fmt, comm, pid, tgid, cpu, ts, "kvm_exit", _payload(v, reason, 0, mask)))
                elif r < 0.45:  # another exit of a TD
                    comm, pid, tgid, v, *_ = rnd.choice(tds)
                    buf.append(
                        _line(
                            fmt,
                            comm,
                            pid,
                            tgid,
                            cpu,
                            ts,
                            "kvm_exit",
                            _payload(v, rnd.choice(TD_OTHER), 0, rnd.getrandbits(12) << 3, rnd.getrandbits(30) << 12),
                        )
                    )
                elif r < 0.55:  # a legacy VM
                    comm, pid, tgid, v = rnd.choice(vms)
                    reason, qual = rnd.choice(VM_REASONS)
                    if qual is None:
                        qual = rnd.choice(IO_QUALS) if reason == "IO_INSTRUCTION" else rnd.getrandbits(10)
                    buf.append(
                        _line(
                            fmt,
                            comm,
                            pid,
                            tgid,
                            cpu,
                            ts,
                            "kvm_exit",
                            _payload(v, reason, 0xFFFFFFFF81000000 + rnd.getrandbits(20), qual),
                        )
                    )
                else:  # noise
                    comm, pid, tgid, v = rnd.choice(vms + [t[:4] for t in tds])
                    ev = rnd.choice(NOISE)
                    name, _, body = ev.partition(": ")
                    buf.append(
                        _line(
                            fmt, comm, pid, tgid, cpu, ts, name, body.format(v=v, r=rnd.getrandbits(40), c=comm, p=pid)
                        )
                    )
            if slow_share:
                buf = [quirky(x, quirk) if "kvm_exit:" in x and odd.random() < slow_share else x for x in buf]
            text = "".join(buf)
            f.write(text)
            written += len(text)
            lines += len(buf)
    return lines


# --- measuring -------------------------------------------------------------------------------
def measure(cmd: list[str]) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds (user + system), peak RSS (MB) and exit status of one command.
    Its output goes to a pipe that is read and dropped (GNU grep stops at the first match when
    its output is /dev/null)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while proc.stdout.read(1 << 16):
        pass
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--format", choices=("ftrace", "trace-cmd", "perf"), default="ftrace")
    ap.add_argument("--exits-only", action="store_true", help="every line a kvm_exit (issue 19's worst case for us)")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--slow-share", type=float, default=0.0, help="share of kvm_exit lines with --quirk (0 to 1)")
    ap.add_argument("--quirk", choices=QUIRKS, default="comm", help="what takes those lines off the fast path")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (each runs every contender once); medians are shown")
    ap.add_argument("--no-regex", action="store_true", help="leave the regex loop out (it takes 10 s a round)")
    ap.add_argument("--small-lines", type=int, default=100, help="lines of the small trace timed too (0: none)")
    args = ap.parse_args()

    odd = f"-{args.quirk}{args.slow_share:g}" if args.slow_share else ""
    only = "-exits" if args.exits_only else ""
    path = os.path.join(args.dir, f"tdvmcall-bench-{args.format}-{args.size_mb}MB{odd}{only}.trace")
    if args.regenerate or not os.path.exists(path):
        t = time.perf_counter()
        nlines = generate(
            path,
            args.size_mb,
            args.format,
            slow_share=args.slow_share,
            quirk=args.quirk,
            noise=not args.exits_only,
        )
        print(f"generated {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    else:
        with open(path, "rb") as f:
            nlines = sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
    size = os.path.getsize(path)
    ours = [sys.executable, "-c", "from tdvmcall.cli import main; main()", "trace"]
    runs = {"tdvmcall trace": ours + [path, "--json", "--no-progress"]}
    if not args.no_regex:
        runs["regex loop"] = [sys.executable, "-c", PERF_BASELINE if args.format == "perf" else BASELINE, path]
    runs["grep -c kvm_exit"] = ["grep", "-c", "kvm_exit", path]
    if args.small_lines:
        small = path + f".head{args.small_lines}"
        with open(path, "rb") as f, open(small, "wb") as out:
            out.writelines(line for _, line in zip(range(args.small_lines), f))
        runs[f"tdvmcall, {args.small_lines} lines"] = ours + [small, "--json"]
    print(
        f"input: {size / 1e6:.0f} MB, {nlines:,} lines, {args.format}"
        f"{', every line kvm_exit' if args.exits_only else ''}; {os.cpu_count()} CPUs; "
        f"{args.repeat} round(s), each contender once per round in turn, medians below"
    )
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in runs}
    for _ in range(args.repeat):
        for name, cmd in runs.items():
            secs, cpu, rss, rc = measure(cmd)
            if rc != 0:
                sys.exit(f"{name} failed with status {rc}")
            samples[name].append((secs, cpu, rss))
    med = {}
    for name, runs_ in samples.items():
        secs, cpu = statistics.median(r[0] for r in runs_), statistics.median(r[1] for r in runs_)
        med[name] = (secs, cpu)
        spread = f" (min {min(r[0] for r in runs_):.2f}, max {max(r[0] for r in runs_):.2f})" if len(runs_) > 1 else ""
        cpus = f" (min {min(r[1] for r in runs_):.3f})" if len(runs_) > 1 else ""
        rate = "" if "lines" in name else f"  {size / secs / 1e6:8.1f} MB/s  {nlines / secs / 1e6:6.2f} M lines/s"
        print(
            f"{name:22s} {secs:7.3f} s wall{spread} {cpu:7.3f} s CPU{cpus}{rate}"
            f"  peak RSS {max(r[2] for r in runs_):5.0f} MB"
        )
    (ours_wall, ours_cpu), (grep_wall, grep_cpu) = med["tdvmcall trace"], med["grep -c kvm_exit"]
    cores = ours_cpu / ours_wall
    print(
        f"tdvmcall trace vs grep -c: {ours_cpu / grep_cpu:.2f}x its CPU time (goal: at most 4), "
        f"{ours_wall / grep_wall:.2f}x its wall time on {cores:.2f} cores used, "
        f"{ours_wall / grep_wall / max(cores, 1):.2f}x per core used (goal: at most 1.5)"
    )
    print(f"per line: {ours_cpu / nlines * 1e9:.0f} ns of CPU, start-up included")
    if "regex loop" in med:
        base_wall, base_cpu = med["regex loop"]
        print(
            f"tdvmcall trace: {base_wall / ours_wall:.1f}x the regex loop's throughput (wall), "
            f"{base_cpu / ours_cpu:.1f}x per CPU second"
        )
    if args.small_lines:
        print(
            f"{args.small_lines}-line trace: {med[f'tdvmcall, {args.small_lines} lines'][1]:.3f} s CPU (goal: at most 0.25)"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
