"""The fast path of ``tdvmcall trace`` (``trace_scan``, compiled) agrees with the reference parser
(``parse_chunk_reference``, plain Python) on generated traces: same line counts, same unparsed lines (numbers and
text), same aggregates and the same Parquet rows, whatever mix of well-formed lines, rare quirks
(docs/abi.md §7: reason flags, hex reasons, trailing text, CRLF, padded perf event names, integer
timestamps, record-tgid) and damaged lines (truncated, a byte changed, NUL, non-ASCII) it holds.
The expected values are the reference parser's, which test_trace.py checks against hand counts."""

from __future__ import annotations

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tdvmcall.trace import scan as trace_scan
from tdvmcall.trace.audit import parse_chunk
from tdvmcall.trace.io import Chunk
from tdvmcall.trace.reference import parse_chunk_reference
from tdvmcall.trace.rows import ROW_COLUMNS, ReasonTable, TaskTable, is_tdvmcall_reason

REASONS = [
    "TDCALL",
    "VMCALL",
    "HLT",
    "CPUID",
    "IO_INSTRUCTION",
    "MSR_READ",
    "MSR_WRITE",
    "EPT_MISCONFIG",
    "EPT_VIOLATION",
    "EXTERNAL_INTERRUPT",
    "0x4d",
    "0x7f",
    "BOGUS_REASON",
]
FLAGS = ["", " FAILED_VMENTRY", " 0x4000000", " 0x4000000 FAILED_VMENTRY", " 0xABC"]
MASKS = [0xFFCC, 0xFC00, 0x1C00, 0x0D04, 0x7C00, 0x3F80008, 0x1_0000_FC00, 0xFFFF_FFFF_FFFF_FFFF, 0]
COMMS = ["CPU 0/KVM", "qemu-system-x86", "a-b-c", "<...>", "x", "  spaced  "]


@st.composite
def exit_line(draw, fmt: str) -> str:
    comm = draw(st.sampled_from(COMMS))
    pid = draw(st.integers(1, 99999))
    tgid = draw(st.one_of(st.none(), st.integers(1, 99999)))
    cpu = draw(st.integers(0, 255))
    if draw(st.booleans()):
        ts = f"{draw(st.integers(0, 10**9))}.{draw(st.integers(0, 999999)):06d}"
    else:
        ts = str(draw(st.integers(0, 10**16)))  # counter clocks; over 15 digits goes the slow way
    reason = draw(st.sampled_from(REASONS)) + draw(st.sampled_from(FLAGS))
    info1 = draw(st.sampled_from(MASKS))
    vcpu = draw(st.sampled_from([0, 1, 7, 4095, 123456789, 1234567890, 99999999999]))
    tail = draw(st.sampled_from(["", " requests 0x0000000000000000", " x"]))
    payload = (
        f"vcpu {vcpu} reason {reason} rip 0x{draw(st.integers(0, 2**64 - 1)):x} info1 0x{info1:016x} "
        f"info2 0x{0:016x} intr_info 0x00000000 error_code 0x00000000{tail}"
    )
    if fmt == "perf":
        ids = f"{tgid}/{pid}" if tgid is not None else str(pid)
        pad = draw(st.sampled_from([" ", "     "]))
        return f"{comm:>16} {ids} [{cpu:03d}] {ts}:{pad}kvm:kvm_exit: {payload}"
    task = f"{comm:>16}-{pid:<7}" + (f" ({tgid:>7})" if tgid is not None else "")
    if fmt == "trace-cmd":
        return f"{task} [{cpu:03d}] {ts}: {'kvm_exit:':<22}{payload}"
    return f"{task} [{cpu:03d}] {draw(st.sampled_from(['d..2.', 'dN.1.', '....']))} {ts}: kvm_exit: {payload}"


def damage(draw, line: str) -> str:
    how = draw(st.sampled_from(["cut", "byte", "nul", "utf8", "none"]))
    if how == "none" or not line:
        return line
    at = draw(st.integers(0, len(line) - 1))
    if how == "cut":
        return line[:at]
    if how == "byte":
        return line[:at] + draw(st.sampled_from(["x", " ", "-", ":", "0", "G", "\r"])) + line[at + 1 :]
    if how == "nul":
        return line[:at] + "\x00" + line[at:]
    return line[:at] + "é" + line[at:]


@st.composite
def trace_text(draw, fmt: str) -> bytes:
    out = []
    for _ in range(draw(st.integers(1, 40))):
        kind = draw(st.sampled_from(["exit", "exit", "exit", "damaged", "other", "header", "blank"]))
        if kind in ("exit", "damaged"):
            text = draw(exit_line(fmt))
            out.append(damage(draw, text) if kind == "damaged" else text)
        elif kind == "other":
            out.append(
                draw(
                    st.sampled_from(
                        [
                            "  CPU 0/KVM-1001 [000] d..2. 1.000000: kvm_entry: vcpu 0, rip 0x0",
                            "qemu 7/8 [001] 2.5: sched:sched_switch: prev_comm=x kvm_exit",
                            "garbage",
                            "   ",
                        ]
                    )
                )
            )
        elif kind == "header":
            out.append(draw(st.sampled_from(["# tracer: nop", "cpus=2", "version = 6", "#kvm_exit: comment"])))
        else:
            out.append("")
    eols = [draw(st.sampled_from(["\n", "\n", "\r\n"])) for _ in out]
    if draw(st.booleans()):
        eols[-1] = ""  # a truncated last line
    return "".join(t + e for t, e in zip(out, eols)).encode()


def parse_both(data: bytes, fmt: str, rows: bool):
    results = []
    for parse in (parse_chunk, parse_chunk_reference):
        tasks, reasons = TaskTable(), ReasonTable()
        r = parse(Chunk(data, truncated=not data.endswith(b"\n")), fmt, "src", tasks, reasons, keep_bad=1000, rows=rows)
        results.append((r, tasks, reasons))
    return results


def canonical(cols, tasks: TaskTable, reasons: ReasonTable) -> list[tuple]:
    """Rows with the task and reason ids replaced by the task and the reason (text, name, flags)
    (ids are assigned in lookup order), the mask null unless the reason is a TDVMCALL reason (info1
    is the mask of the rows), sorted."""
    rs, who = reasons.reasons, [repr(t) for t in tasks.tasks]
    mask = cols["mask"] if "mask" in cols else cols["info1"]
    rest = [c for c in cols if c not in ("task", "rid", "mask")]
    out = []
    for i, (task, rid) in enumerate(zip(cols["task"].tolist(), cols["rid"].tolist())):
        r = rs[rid]
        td = is_tdvmcall_reason(r)
        named = (r.text, r.name, r.flags, td, int(mask[i]) if td else None, who[task])
        out.append(tuple(cols[c][i].item() for c in rest) + named)
    return sorted(out, key=repr)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_fast_path_agrees_with_the_reference_parser(monkeypatch, data):
    fmt = data.draw(st.sampled_from(["ftrace", "trace-cmd", "perf"]))
    text = data.draw(trace_text(fmt))
    assume(text)  # a reader never yields an empty chunk
    rows = data.draw(st.booleans())
    # half the time, room for one slow line only: the scanner must count the lines and scan again
    if data.draw(st.booleans()):
        monkeypatch.setattr(trace_scan, "SLOW_GUESS", 1 << 40)
        monkeypatch.setattr(trace_scan, "SLOW_MIN", 1)
    else:
        monkeypatch.undo()
    (fast, *f), (ref, *r) = parse_both(text, fmt, rows)
    for result, (_, reasons) in ((fast, f), (ref, r)):  # mask: info1 for a TDVMCALL reason, else 0
        for cols in (result.by_key, result.by_time):
            assert not cols["mask"][~reasons.tdvmcall(cols["rid"])].any()
    assert fast.counts == ref.counts
    assert fast.shift == ref.shift
    assert canonical(fast.by_key, *f) == canonical(ref.by_key, *r)
    assert canonical(fast.by_time, *f) == canonical(ref.by_time, *r)
    if rows:
        assert tuple(fast.rows) == tuple(ref.rows) == ROW_COLUMNS
        assert {c: v.dtype for c, v in fast.rows.items()} == {c: v.dtype for c, v in ref.rows.items()}
        assert canonical(fast.rows, *f) == canonical(ref.rows, *r)
        assert fast.rows["line"].tolist() == sorted(ref.rows["line"].tolist())  # in line order


def test_well_formed_lines_take_the_fast_path_and_quirks_the_slow_one():
    from tdvmcall.trace.scan import Scanned

    def line(body: str, ts: str = "1.000000") -> bytes:
        return f"  CPU 0/KVM-1001    [000] d..2. {ts}: kvm_exit: vcpu 0 reason {body}".encode()

    good = b" rip 0x0 info1 0x000000000000fc00 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000"
    text = (
        b"\n".join(
            [
                line("TDCALL") + good,  # 1 fast
                line("HLT 0x4000000 FAILED_VMENTRY")
                + good
                + b" requests 0x0000000000000000\r",  # 2 fast: flags, suffix, CRLF
                line("TDCALL", ts="123456789012") + good,  # 3 fast: integer timestamp
                line("TDCALL", ts="1234567890123456") + good,  # 4 slow: 16 digits
                line("HLT rip 0x0 info 0 0"),  # 5 slow: old payload (the reference parser counts it unparsed)
                line("TDCALL") + good.replace(b"0x0000000000000000", b"0x00000000000000"),  # 6 slow: short info2
                b"# header",
                b"",
                b"  CPU 0/KVM-1001    [000] d..2. 1.0: kvm_entry: vcpu 0",  # 7, 8 header/blank; 9 other
            ]
        )
        + b"\n"
    )
    s = Scanned(text, perf=False)
    assert (s.lines, s.headers, s.others) == (9, 2, 1)
    assert s.line_of.tolist() == [1, 2, 3]
    assert s.slow[:, 0].tolist() == [4, 5, 6]
    assert s.ts.tolist() == [1.0, 1.0, 123456789012.0]
    assert [s.reasons[i] for i in s.reason] == [b"TDCALL", b"HLT 0x4000000 FAILED_VMENTRY", b"TDCALL"]
    assert s.prefixes == [b"  CPU 0/KVM-1001    [000] d..2. "] and s.info1.tolist() == [0xFC00] * 3


def test_chunks_of_short_slow_lines_are_counted_again():
    # the scanner first guesses one slow line per 48 bytes (and 64 more); 300 short lines that look
    # like kvm_exit exceed the guess, and the kernel must then be called again with the lines counted
    from tdvmcall.trace.scan import Scanned

    exit_ = (
        b"  CPU 0/KVM-1001    [000] d..2. 1.000000: kvm_exit: vcpu 0 reason TDCALL rip 0x0 info1 "
        b"0x000000000000fc00 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000\n"
    )
    text = b"\n" * 300 + b"x kvm_exit: ?\n" * 300 + exit_ * 3 + b"#\n" * 100
    assert len(text) // 48 + 64 < 300  # the guess is short
    s = Scanned(text, perf=False)
    assert (s.lines, s.headers, s.others) == (703, 400, 0)
    assert s.slow[:, 0].tolist() == list(range(301, 601))
    assert s.line_of.tolist() == [601, 602, 603]
    assert s.info1.tolist() == [0xFC00] * 3


def test_memory_does_not_grow_with_the_number_of_inputs(tmp_path):
    # each input is parsed by fresh threads; the scanner's intern tables (about 1 MB each) are pooled,
    # not kept per thread: 60 inputs more must not cost 60 x 2 threads x their tables
    import subprocess
    import sys

    path = tmp_path / "t.txt"
    exit_ = (
        b"  CPU 0/KVM-1001    [000] d..2. 1.000000: kvm_exit: vcpu 0 reason TDCALL rip 0x0 info1 "
        b"0x000000000000fc00 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000\n"
    )
    path.write_bytes(b"# tracer: nop\n" + exit_ * 1000)
    script = (
        "import resource, sys\n"
        "from tdvmcall.trace import audit\n"
        "a = audit.Audit(times=False)\n"
        "def peak():\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "for _ in range(10):\n"
        "    audit.audit_input(a, sys.argv[1])\n"
        "before = peak()\n"
        "for _ in range(60):\n"
        "    audit.audit_input(a, sys.argv[1])\n"
        "print(before, peak())\n"
    )
    r = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before, after = map(float, r.stdout.split())
    assert after - before < 16, (before, after)  # MB
