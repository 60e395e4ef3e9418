"""``tdvmcall trace`` on fixtures this file writes, in the three formats (docs/abi.md §7).

Every expected number below is worked out by hand from docs/abi.md (§3 module check, §4 leaf table and
reason mapping, §7 line format), not copied from the program's output.  The main fixture, one line
per event, in file order (line numbers count the header lines):

   1  header (ftrace "# tracer: nop" / trace-cmd "version = 6" / perf "# ========")
   2  header ("#" / "cpus=2" / "# captured on ...")
   3  TD 1001  TDCALL          0xFFCC  completes: every TDCALL leaf's minimal mask is within
                                       R10-R15 (GetTdVmCallInfo leaf 0/1: R10-R14, the widest)
   4  TD 1001  TDCALL          0x1C00  depends on the leaf: R10 R11 R12 lacks R13 R14, which
                                       GetTdVmCallInfo leaf 0/1 write, R13 which MapGPA, GetQuote
                                       read and ReportFatalError reads when R12 bit 63 is set;
                                       enough for SetupEventNotify, ReportFatalError without GPA,
                                       GetTdVmCallInfo's bad leaf and the unsupported leaves
   5  TD 1001  CPUID           0x7C00  refused: CPUID writes EDX to R15, not exposed
   6  TD 1001  IO_INSTRUCTION  0x7C00  depends on inputs: IN needs R10-R14 (R11 = data read),
                                       OUT also reads R15 (data), not exposed
   7  TD 1001  HLT + bus-lock flag 0x4000000, 0x1C00  inconsistent on the default tree kvm-x86:
                                       KVM re-labels only a reason equal to TDCALL
                                       (tdx_to_vmx_exit_reason() compares the whole reason), so a
                                       re-labelled HLT never carries bit 26; completes with --tree
                                       v7.3, which re-labels on bits 15:0 and keeps the flag (HLT
                                       reads R12: R10 R11 R12 cover it)
   8  TD 1001  MSR_WRITE       0x0C00  refused: WRMSR reads R12 (index), R13 (value); missing both
   9  TD 1001  VMCALL          0x0D04  depends on the hypercall: RDX R8 R10 R11 covers
                                       VAPIC_POLL_IRQ (R10) and SCHED_YIELD (R10 R11), not
                                       KICK_CPU (R12), CLOCK_PAIRING (R11 R12), SEND_IPI (R11-R14),
                                       MAP_GPA_RANGE (R11-R13): missing R12 R13 R14
  10  TD 1001  EPT_MISCONFIG   0x1800  internal error: R11 R12, no R10, so no status can reach the
                                       guest (the reason implies R11 exposed, which it is)
  11  TD 1001  CPUID           0xFFEC  inconsistent: RBP exposed, refused by the module (NO_RBP_MOD)
  12  TD 1001  MSR_READ        0x0400  inconsistent: KVM labels MSR_READ only when it read
                                       R11 = 31, so R11 must be exposed; the mask has R10 only
  13  TD 1001  TDCALL FAILED_VMENTRY  0xFFCC  not a TDVMCALL (a failed VM entry): other TD exit
  14  TD 1001  EPT_VIOLATION   0x181   not a TDVMCALL reason: other TD exit
  15  TD 1001  TDCALL          0xFC00  + " requests 0x..." suffix: completes (as line 3)
  16  VM 2001  HLT             0x0     non-TD (task 2001 has no TDCALL exit)
  17  VM 2001  IO_INSTRUCTION  0x3F80008  non-TD
  18  VM 2001  EPT_VIOLATION   0x181   non-TD
  19  kvm_entry                        other event
  20  sched_switch                     other event
  21  kvm_exit in the pre-5.x format ("reason HLT rip 0x0 info 0 0")  unparsed
  22  blank line                       header/blank
  23  TD 1001  IO_INSTRUCTION  0xFC00  ends in CRLF: completes (IN and OUT both covered)
  24  TD 1001  HLT, cut inside info2, no final newline: truncated last line, unparsed

So: 24 lines, 3 header/blank (1, 2, 22), 2 other events (19, 20), 19 kvm_exit-looking lines
(3-18, 21, 23, 24) of which 17 parse.  Task 1001 is a TD (TDCALL on line 3): 14 exits, 12 of
them TDVMCALLs (3-12, 15, 23) and 2 other (13, 14); 2001 has 3 non-TD exits.  Verdicts: completes
3 (3, 15, 23), depends 3 (4, 6, 9), refused 2 (5, 8), internal-error 1 (10), inconsistent 3
(7, 11, 12); refused share (refused + internal-error) 3/12 = 0.25, depends share 3/12 = 0.25.
With --tree v7.3 line 7 completes: completes 4, inconsistent 2, the rest the same.
"""

from __future__ import annotations

import gzip
import json
import os

import pyarrow.parquet as pq
import pytest
import zstandard
from typer.testing import CliRunner

from tdvmcall.cli import app
from tdvmcall.trace.rows import detect_format
from tdvmcall.trace.verdict import verdict_for

runner = CliRunner()

ZERO16 = "0" * 16


def payload(vcpu: int, reason: str, info1: int, tail: str = "") -> str:
    return (
        f"vcpu {vcpu} reason {reason} rip 0x0 info1 0x{info1:016x} info2 0x{ZERO16} "
        f"intr_info 0x00000000 error_code 0x00000000{tail}"
    )


def line(fmt: str, comm: str, pid: int, ts: float, event: str, body: str, tgid: int | None = None) -> str:
    """One event line in the shape of docs/abi.md §7 (trace-cmd pads the event name)."""
    if fmt == "perf":
        system = "sched" if event.startswith("sched") else "kvm"
        ids = f"{tgid}/{pid}" if tgid is not None else f"{pid}"
        return f"{comm:>16} {ids} [000] {ts:.6f}: {system}:{event}: {body}"
    task = f"{comm:>16}-{pid:<7}" + (f" ({tgid:>7})" if tgid is not None else "")
    if fmt == "trace-cmd":
        return f"{task} [000] {ts:.6f}: {event + ':':<22}{body}"
    return f"{task} [000] d..2. {ts:.6f}: {event}: {body}"


HEADERS = {
    "ftrace": ["# tracer: nop", "#"],
    "trace-cmd": ["version = 6", "cpus=2"],
    "perf": ["# ========", "# captured on    : Thu Nov 26 10:00:00 2026"],
}
TD, VM = ("CPU 0/KVM", 1001), ("CPU 0/KVM", 2001)

#: lines 3..23 of the main fixture (see the module docstring); None = a blank line
EVENTS = [
    (TD, "kvm_exit", payload(0, "TDCALL", 0xFFCC)),
    (TD, "kvm_exit", payload(0, "TDCALL", 0x1C00)),
    (TD, "kvm_exit", payload(0, "CPUID", 0x7C00)),
    (TD, "kvm_exit", payload(0, "IO_INSTRUCTION", 0x7C00)),
    (TD, "kvm_exit", payload(0, "HLT 0x4000000", 0x1C00)),
    (TD, "kvm_exit", payload(0, "MSR_WRITE", 0x0C00)),
    (TD, "kvm_exit", payload(0, "VMCALL", 0x0D04)),
    (TD, "kvm_exit", payload(0, "EPT_MISCONFIG", 0x1800)),
    (TD, "kvm_exit", payload(0, "CPUID", 0xFFEC)),
    (TD, "kvm_exit", payload(0, "MSR_READ", 0x0400)),
    (TD, "kvm_exit", payload(0, "TDCALL FAILED_VMENTRY", 0xFFCC)),
    (TD, "kvm_exit", payload(0, "EPT_VIOLATION", 0x181)),
    (TD, "kvm_exit", payload(0, "TDCALL", 0xFC00, tail=" requests 0x0000000000000000")),
    (VM, "kvm_exit", payload(0, "HLT", 0)),
    (VM, "kvm_exit", payload(0, "IO_INSTRUCTION", 0x3F80008)),
    (VM, "kvm_exit", payload(0, "EPT_VIOLATION", 0x181)),
    (TD, "kvm_entry", "vcpu 0, rip 0x0"),
    (
        TD,
        "sched_switch",
        "prev_comm=CPU 0/KVM prev_pid=1001 prev_prio=120 prev_state=S ==> next_comm=swapper/0 next_pid=0 next_prio=120",
    ),
    (TD, "kvm_exit", "reason HLT rip 0x0 info 0 0"),
    None,
    (TD, "kvm_exit", payload(0, "IO_INSTRUCTION", 0xFC00)),
]
TRUNCATED = (TD, "kvm_exit", f"vcpu 0 reason HLT rip 0x0 info1 0x{0x1C00:016x} info2 0x00000000000")


def fixture(fmt: str, crlf_line: int = 23, all_crlf: bool = False) -> bytes:
    out = list(HEADERS[fmt])
    for i, ev in enumerate(EVENTS + [TRUNCATED]):
        out.append("" if ev is None else line(fmt, ev[0][0], ev[0][1], 100.0 + i / 1000, ev[1], ev[2]))
    eol = ["\r\n" if all_crlf or n == crlf_line else "\n" for n in range(1, len(out) + 1)]
    eol[-1] = ""  # the truncated last line
    return "".join(text + e for text, e in zip(out, eol)).encode()


def audit(*args: str, input=None) -> dict:
    r = runner.invoke(app, ["trace", *args, "--json"], input=input)
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture
def write(tmp_path):
    def _write(name: str, data: bytes) -> str:
        p = tmp_path / name
        p.write_bytes(data)
        return str(p)

    return _write


def check_main_fixture(rep: dict, fmt: str) -> None:
    (inp,) = rep["inputs"]
    assert inp["format"] == fmt
    assert (
        inp["lines"],
        inp["comments"],
        inp["other_events"],
        inp["kvm_exit_lines"],
        inp["parsed"],
        inp["unparsed"],
    ) == (24, 3, 2, 19, 17, 2)
    assert inp["truncated_last_line"] is True
    assert [b["line"] for b in rep["unparsed_examples"]] == [21, 24]
    assert "info 0 0" in rep["unparsed_examples"][0]["text"]
    assert rep["td"]["mode"] == "inferred"
    assert [t.split(":")[-1] for t in rep["td"]["tasks"]] == ["CPU 0/KVM-1001"]
    t = rep["totals"]
    assert (t["exits"], t["tdvmcall_exits"], t["td-other_exits"], t["non-td_exits"]) == (17, 12, 2, 3)
    assert t["verdicts"] == {"completes": 3, "depends": 3, "refused": 2, "internal-error": 1, "inconsistent": 3}
    assert t["refused_share"] == 0.25 and t["depends_share"] == 0.25
    pairs = {(p["reason"], p["mask"]): p for p in rep["pairs"]}
    assert {k: p["verdict"] for k, p in pairs.items()} == {
        ("TDCALL", "0xffcc"): "completes",
        ("TDCALL", "0x1c00"): "depends",
        ("CPUID", "0x7c00"): "refused",
        ("IO_INSTRUCTION", "0x7c00"): "depends",
        ("HLT", "0x1c00"): "inconsistent",
        ("MSR_WRITE", "0x0c00"): "refused",
        ("VMCALL", "0x0d04"): "depends",
        ("EPT_MISCONFIG", "0x1800"): "internal-error",
        ("CPUID", "0xffec"): "inconsistent",
        ("MSR_READ", "0x0400"): "inconsistent",
        ("TDCALL", "0xfc00"): "completes",
        ("IO_INSTRUCTION", "0xfc00"): "completes",
    }
    assert pairs[("CPUID", "0x7c00")]["missing"] == "r15"
    assert pairs[("MSR_WRITE", "0x0c00")]["missing"] == "r12 r13"
    assert pairs[("IO_INSTRUCTION", "0x7c00")]["refused_for"] == "Instruction.IO[out]"
    assert (
        pairs[("TDCALL", "0x1c00")]["refused_for"]
        == "GetTdVmCallInfo[leaf0,leaf1], MapGPA, GetQuote, ReportFatalError[with-gpa]"
    )
    assert pairs[("TDCALL", "0x1c00")]["missing"] == "r13 r14"
    assert pairs[("VMCALL", "0x0d04")]["refused_for"] == (
        "KVMHypercall.KICK_CPU, KVMHypercall.CLOCK_PAIRING, KVMHypercall.SEND_IPI, KVMHypercall.MAP_GPA_RANGE"
    )
    assert pairs[("VMCALL", "0x0d04")]["missing"] == "r12 r13 r14"
    # the refusals first (refused and internal error), then the input/leaf-dependent ones
    top = [(p["reason"], p["mask"]) for p in rep["top_offending"]]
    assert set(top[:3]) == {("CPUID", "0x7c00"), ("MSR_WRITE", "0x0c00"), ("EPT_MISCONFIG", "0x1800")}
    assert set(top[3:]) == {("TDCALL", "0x1c00"), ("IO_INSTRUCTION", "0x7c00"), ("VMCALL", "0x0d04")}
    procs = {p["process"]: p for p in rep["per_process"]}
    assert (procs[1001]["exits"], procs[1001]["tdvmcall"], procs[1001]["td"]) == (14, 12, True)
    assert (procs[2001]["exits"], procs[2001]["tdvmcall"], procs[2001]["td"]) == (3, 0, False)
    reasons = {r["reason_name"]: r["tdvmcall"] for r in rep["per_reason"]}
    # TDVMCALL exits of the TD only: TDCALL 3, 4, 15; IO 6, 23; CPUID 5, 11
    assert reasons == {
        "TDCALL": 3,
        "CPUID": 2,
        "IO_INSTRUCTION": 2,
        "HLT": 1,
        "MSR_WRITE": 1,
        "VMCALL": 1,
        "EPT_MISCONFIG": 1,
        "MSR_READ": 1,
    }
    masks = {m["mask"]: (m["tdvmcall"], m["refused"]) for m in rep["per_mask"]}
    assert masks["0x7c00"] == (2, 1) and masks["0xfc00"] == (2, 0) and masks["0x1c00"] == (2, 0)


@pytest.mark.parametrize("fmt", ["ftrace", "trace-cmd", "perf"])
def test_each_format_gives_the_hand_counted_report(write, fmt):
    path = write(f"t.{fmt}", fixture(fmt))
    check_main_fixture(audit(path), fmt)
    check_main_fixture(audit(path, "--format", fmt), fmt)


def test_the_main_fixture_on_v73(write):
    """Line 7 (HLT 0x4000000, R10 R11 R12) is a HLT on 7.3 (re-labelled on bits 15:0, flag kept)."""
    rep = audit(write("t", fixture("ftrace")), "--tree", "v7.3")
    assert rep["tree"] == "v7.3"
    t = rep["totals"]
    assert t["verdicts"] == {"completes": 4, "depends": 3, "refused": 2, "internal-error": 1, "inconsistent": 2}
    hlt = [p for p in rep["pairs"] if p["reason"] == "HLT"]
    assert [(p["mask"], p["verdict"], p["exits"]) for p in hlt] == [("0x1c00", "completes", 1)]


@pytest.mark.parametrize(
    "compress,suffix", [(gzip.compress, ".gz"), (lambda b: zstandard.ZstdCompressor().compress(b), ".zst")]
)
def test_compressed_input_is_detected_by_magic(write, compress, suffix):
    path = write("trace" + suffix, compress(fixture("ftrace")))
    rep = audit(path)
    check_main_fixture(rep, "ftrace")
    assert rep["inputs"][0]["compression"] == {".gz": "gzip", ".zst": "zstd"}[suffix]


def test_crlf_everywhere_and_standard_input():
    rep = audit("-", input=fixture("perf", all_crlf=True))
    check_main_fixture(rep, "perf")
    assert rep["inputs"][0]["name"] == "<stdin>"


def test_detect_format_by_header_or_line_shape():
    assert detect_format("# tracer: nop\n") == "ftrace"
    assert detect_format("cpus=4\n") == "trace-cmd"
    assert detect_format(line("ftrace", "qemu", 7, 1.5, "kvm_entry", "x")) == "ftrace"
    assert detect_format(line("trace-cmd", "qemu", 7, 1.5, "kvm_entry", "x")) == "trace-cmd"
    assert detect_format(line("perf", "qemu", 7, 1.5, "kvm_entry", "x")) == "perf"
    assert detect_format("hello\nworld\n") is None


# --- TD inference: a task with a TDCALL exit, and its process when tgids are shown ----------------
# 1001 and 1002 are vCPU threads of process 1000 (a TD); only 1001 has a TDCALL exit.  2001 is a VM.
#   1001 TDCALL 0xFFCC -> completes;  1002 HLT 0x1C00 -> completes (HLT reads R12);
#   2001 HLT 0x0 -> if it were a TD: inconsistent (HLT implies R11 exposed).
THREE = [
    ("CPU 0/KVM", 1001, 1000, payload(0, "TDCALL", 0xFFCC)),
    ("CPU 1/KVM", 1002, 1000, payload(1, "HLT", 0x1C00)),
    ("CPU 0/KVM", 2001, 2000, payload(0, "HLT", 0)),
]


def three(fmt: str, tgids: bool) -> bytes:
    return "".join(
        line(fmt, c, pid, 1.0 + i, "kvm_exit", body, tgid if tgids else None) + "\n"
        for i, (c, pid, tgid, body) in enumerate(THREE)
    ).encode()


@pytest.mark.parametrize("fmt", ["ftrace", "perf"])
def test_tgid_extends_inference_to_every_thread_of_the_td(write, fmt):
    rep = audit(write("a", three(fmt, tgids=True)))
    assert sorted(t.split(":")[-1] for t in rep["td"]["tasks"]) == ["CPU 0/KVM-1001", "CPU 1/KVM-1002"]
    t = rep["totals"]
    assert (t["tdvmcall_exits"], t["non-td_exits"], t["verdicts"]["completes"]) == (2, 1, 2)
    assert {p["process"] for p in rep["per_process"]} == {1000, 2000}


def test_without_tgids_only_the_task_with_tdcall_is_inferred(write):
    rep = audit(write("a", three("ftrace", tgids=False)))
    assert [t.split(":")[-1] for t in rep["td"]["tasks"]] == ["CPU 0/KVM-1001"]
    assert (rep["totals"]["tdvmcall_exits"], rep["totals"]["non-td_exits"]) == (1, 2)


def test_td_given_on_the_command_line(write):
    path = write("a", three("ftrace", tgids=False))
    rep = audit(path, "--td", "2001")
    assert rep["td"]["mode"] == "given" and rep["td"]["given"] == [2001]
    assert rep["totals"]["tdvmcall_exits"] == 1
    assert rep["totals"]["verdicts"]["inconsistent"] == 1
    rep = audit(write("b", three("ftrace", tgids=True)), "--td", "1000")  # a tgid names the whole process
    assert rep["totals"]["tdvmcall_exits"] == 2
    # a number of --td is written as every number of the command line: decimal or 0x hex (docs/cli.md)
    rep = audit(path, "--td", " 0x7D1")
    assert rep["td"]["mode"] == "given" and rep["td"]["given"] == [0x7D1] == [2001]
    assert rep["totals"]["tdvmcall_exits"] == 1


# --- verdicts straight from the leaf table (ABI §4) ------------------------------------------------
@pytest.mark.parametrize(
    "reason,mask,verdict",
    [
        (30, 0x7C00, "depends"),  # IO: in completes, out needs R15
        (30, 0xFC00, "completes"),
        (10, 0xFC00, "completes"),  # CPUID: R10-R15
        (10, 0xDC00, "refused"),  # CPUID without R13 (sub-leaf in, EBX out)
        (12, 0x0C00, "refused"),  # HLT needs R12
        (77, 0x0C00, "depends"),  # TDCALL R10 R11: enough only for the unsupported leaves
        (77, 0x0400, "refused"),  # TDCALL without R11: KVM saw leaf 0, whose selector R11 is missing
        (77, 0x0800, "internal-error"),  # no R10
        (18, 0x0400, "depends"),  # VMCALL R10: VAPIC_POLL_IRQ only
        (77, 0x1_0000_FC00, "completes"),  # VM index 1 (bits 33:32) is allowed by the module
        (77, 0x4_0000_FC00, "inconsistent"),  # bit 34: reserved
        (77, 0xFC01, "inconsistent"),  # RAX
    ],
)
def test_verdict_for(reason, mask, verdict):
    assert verdict_for(reason, mask).verdict == verdict


# --- outputs ---------------------------------------------------------------------------------------
def test_parquet_rows_and_plot(write, tmp_path):
    path = write("t", fixture("ftrace"))
    pq_path, png = str(tmp_path / "exits.parquet"), str(tmp_path / "exits.png")
    r = runner.invoke(app, ["trace", path, "--to-parquet", pq_path, "--plot", png])
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(pq_path)
    assert table.num_rows == 17
    assert table.column_names == [
        "source",
        "line",
        "ts",
        "cpu",
        "comm",
        "pid",
        "tgid",
        "vcpu",
        "reason",
        "reason_flags",
        "info1",
        "mask",
        "td",
        "kind",
        "verdict",
        "missing",
    ]
    rows = table.to_pylist()
    verdicts = [row["verdict"] for row in rows if row["kind"] == "tdvmcall"]
    assert sorted(verdicts).count("refused") == 2 and len(verdicts) == 12
    by_line = {row["line"]: row for row in rows}
    assert by_line[5]["reason"] == "CPUID" and by_line[5]["mask"] == 0x7C00 and by_line[5]["missing"] == "r15"
    assert by_line[7]["reason_flags"] == "0x4000000"
    assert by_line[13]["kind"] == "td-other" and by_line[13]["reason_flags"] == "FAILED_VMENTRY"
    assert by_line[17]["kind"] == "non-td" and by_line[17]["verdict"] is None and by_line[17]["mask"] == 0x3F80008
    assert not [n for n in os.listdir(os.path.dirname(pq_path)) if n.startswith(".") or "partial" in n]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_plot_counts_each_verdict_once_per_exit(write):
    # the plot's series are the TDVMCALL exits of the TD, by verdict: the hand counts of the fixture
    from tdvmcall.trace import audit as trace
    from tdvmcall.trace import plot as trace_plot
    from tdvmcall.trace import report as trace_report
    from tdvmcall.trace.verdict import VERDICTS

    a = trace.Audit()
    trace.audit_input(a, write("t", fixture("ftrace")))
    buckets, counts, width = trace_plot.by_time(a, trace_report.td_tasks(a))
    assert dict(zip(VERDICTS, counts.sum(axis=0).tolist())) == {
        "completes": 3,
        "depends": 3,
        "refused": 2,
        "internal-error": 1,
        "inconsistent": 3,
    }
    assert width == 1 / 1024 and len(buckets) == counts.shape[0] and (buckets[1:] - buckets[:-1] == 1).all()


def test_table_output_names_the_verdicts(write):
    r = runner.invoke(app, ["trace", write("t", fixture("ftrace"))])
    assert r.exit_code == 0
    assert "refused share 25.0%" in r.stdout
    assert "top offending" in r.stdout and "CPUID" in r.stdout


# --- bad input: one line on stderr, exit 2 ----------------------------------------------------------
@pytest.mark.parametrize(
    "kind,needle",
    [
        ("binary", "binary data"),
        ("empty", "empty input"),
        ("directory", "is a directory"),
        ("missing", "no such file"),
        ("not-a-trace", "not trace text"),
        ("gzip-binary", "gzip-compressed binary"),
        ("bad-gzip", "cannot decompress"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, kind, needle):
    p = tmp_path / "input"
    if kind == "binary":
        p.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)) * 4)
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "directory":
        p.mkdir()
    elif kind == "not-a-trace":
        p.write_text("hello world\nthis is not a trace\n")
    elif kind == "gzip-binary":
        p.write_bytes(gzip.compress(b"\x00" * 1000))
    elif kind == "bad-gzip":
        p.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 10)
    r = runner.invoke(app, ["trace", str(p)])
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert r.stderr.startswith("tdvmcall: error: ")  # as every command says it


def test_bad_td_list_is_one_line_and_exit_2(write):
    r = runner.invoke(app, ["trace", write("t", fixture("ftrace")), "--td", "12,abc"])
    assert r.exit_code == 2 and "--td" in r.stderr and r.stderr.count("\n") == 1


def test_a_line_whose_task_prefix_has_the_wrong_shape_is_unparsed(write):
    # line 3 has a valid payload and timestamp, but no "<comm>-<pid> [<cpu>]" before them
    text = (
        "\n".join(
            [
                "# tracer: nop",
                line("ftrace", *TD, 1.0, "kvm_exit", payload(0, "TDCALL", 0xFFCC)),
                "garbage 2.000000: kvm_exit: " + payload(0, "HLT", 0x1C00),
            ]
        )
        + "\n"
    )
    rep = audit(write("t", text.encode()))
    inp = rep["inputs"][0]
    assert (inp["lines"], inp["kvm_exit_lines"], inp["parsed"], inp["unparsed"]) == (3, 2, 1, 1)
    assert [b["line"] for b in rep["unparsed_examples"]] == [3]
    assert rep["totals"]["verdicts"]["completes"] == 1


def test_several_inputs_add_up_and_keep_their_tasks_apart(write):
    # the same trace from two hosts: every count doubles; pid 1001 of each host is its own task
    a, b = write("host1.txt", fixture("ftrace")), write("host2.txt.gz", gzip.compress(fixture("perf")))
    rep = audit(a, b)
    assert [i["format"] for i in rep["inputs"]] == ["ftrace", "perf"]
    assert (rep["totals"]["exits"], rep["totals"]["tdvmcall_exits"]) == (34, 24)
    assert len(rep["td"]["tasks"]) == 2 and len(rep["td"]["non_td_tasks"]) == 2
    assert [b["line"] for b in rep["unparsed_examples"]] == [21, 24, 21, 24]


def test_perf_right_aligned_event_names(write):
    # perf script pads event names to the longest one recorded: "1.000000:     kvm:kvm_exit: ..."
    lines_ = [
        line("perf", *TD, 1.0 + i, "kvm_exit", payload(0, "TDCALL", 0xFFCC)).replace(": kvm:", ":     kvm:")
        for i in range(2)
    ]
    lines_.append(line("perf", *TD, 3.0, "kvm_entry", "vcpu 0, rip 0x0").replace(": kvm:", ":    kvm:"))
    rep = audit(write("p", ("\n".join(lines_) + "\n").encode()))
    inp = rep["inputs"][0]
    assert (inp["format"], inp["kvm_exit_lines"], inp["parsed"], inp["other_events"]) == ("perf", 2, 2, 1)


def test_integer_timestamps_of_counter_clocks(write):
    # trace_clock=x86-tsc or counter prints an integer where seconds.microseconds would be
    text = (
        "# tracer: nop\n"
        + line("ftrace", *TD, 1.0, "kvm_exit", payload(0, "CPUID", 0xFC00)).replace("1.000000:", "123456789012:")
        + "\n"
    )
    rep = audit(write("t", text.encode()))
    assert (rep["inputs"][0]["parsed"], rep["totals"]["verdicts"]["completes"]) == (1, 0)  # no TDCALL: not a TD
    rep = audit(write("t", text.encode()), "--td", "1001")
    assert rep["totals"]["verdicts"]["completes"] == 1  # CPUID with R10-R15 completes


# the smallest shift s at which t / 2**(s - 10) < 2**52 for the larger stamp (the span, 5 units, fits
# 512 buckets from s = 0): 1.23e14 * 2**10 / 2**52 = 28.1 -> 5; 9.007e15 * 2**10 / 2**52 = 2048.0 -> 12;
# 9.88e19 * 2**10 / 2**52 = 2.25e7 -> 25
@pytest.mark.parametrize(
    "stamp, shift", [("123456789012345", 5), ("9007199254740992", 12), ("98765432109876543210", 25)]
)
def test_large_counter_timestamps_and_the_plot(write, tmp_path, stamp, shift):
    # an x86-tsc clock passes 10**16 after a few weeks of uptime: 15 digits take the fast path, more
    # the reference parser; both must keep the time buckets exact (2**63 / 1024 is about 9.0e15)
    from tdvmcall.trace import audit as trace

    text = "# tracer: nop\n" + "".join(
        line("ftrace", *TD, 1.0, "kvm_exit", payload(0, "TDCALL", 0xFC00)).replace("1.000000:", f"{stamp[:-1]}{d}:")
        + "\n"
        for d in "05"
    )
    path, png = write("t", text.encode()), str(tmp_path / "t.png")
    rep = audit(path, "--plot", png)
    assert (rep["inputs"][0]["parsed"], rep["totals"]["verdicts"]["completes"]) == (2, 2)
    assert os.path.getsize(png) > 0
    a = trace.Audit()
    trace.audit_input(a, path)
    assert a.shift == shift
    width = 2.0 ** (shift - 10)
    buckets = sorted(a.time_columns()["bucket"].tolist())
    assert int(stamp) / width < 2**52 and buckets[-1] < 2**52
    assert buckets == sorted({int(int(stamp[:-1] + d) // width) for d in "05"})  # exact, with one bucket or two


def test_a_timestamp_beyond_float_range_is_unparsed(write):
    text = (
        "# tracer: nop\n"
        + line("ftrace", *TD, 1.0, "kvm_exit", payload(0, "TDCALL", 0xFC00)).replace("1.000000:", "9" * 400 + ":")
        + "\n"
    )
    rep = audit(write("t", text.encode()))
    assert (rep["inputs"][0]["parsed"], rep["inputs"][0]["unparsed"]) == (0, 1)


def test_inputs_with_far_apart_clocks_widen_the_buckets(write):
    # one input in seconds, the next from a 40-digit counter: the buckets of the first are made
    # coarser by more than 63 shifts (they all become bucket 0), nothing overflows
    one = "# tracer: nop\n" + line("ftrace", *TD, 1.0, "kvm_exit", payload(0, "TDCALL", 0xFC00)) + "\n"
    far = one.replace("1.000000:", "4" * 40 + ":")
    rep = audit(write("a", one.encode()), write("b", far.encode()))
    assert [i["parsed"] for i in rep["inputs"]] == [1, 1]
    assert rep["totals"]["verdicts"]["completes"] == 2


@pytest.mark.parametrize("compress", [None, gzip.compress])
def test_chunk_boundaries_do_not_change_the_audit(write, tmp_path, monkeypatch, compress):
    # inputs are read in newline-aligned chunks parsed in parallel: any chunk size gives the same
    # report, time buckets and Parquet rows, line numbers included (97 bytes: shorter than most
    # lines, so lines straddle chunks; the fixture's events spread over 2.3 s, so later chunks
    # widen the buckets of earlier ones)
    import pyarrow.parquet as pq

    from tdvmcall.trace import audit as trace
    from tdvmcall.trace import io as traceio

    data = fixture("ftrace").replace(b" 100.0", b" 10").replace(b" 100.", b" 10.")
    path = write("t.ftrace", compress(data) if compress else data)

    def run(tag: str) -> tuple:
        a = trace.Audit()
        trace.audit_input(a, path)
        out = str(tmp_path / f"{tag}.parquet")
        rep = audit(path, "--to-parquet", out)
        t = a.time_columns()  # ids are given in the order chunks meet them: compare names
        buckets = sorted(
            (a.tasks.tasks[task].label, a.reasons.reasons[rid].text, mask, bucket, n)
            for task, rid, mask, bucket, n in zip(*(t[c].tolist() for c in ("task", "rid", "mask", "bucket", "n")))
        )
        return rep, a.shift, buckets, pq.read_table(out).to_pylist()

    whole = run("whole")
    monkeypatch.setattr(trace, "chunks", lambda src: traceio.chunks(src, 97))
    assert run("small") == whole
    assert whole[1] > 0  # the buckets were widened


def test_a_mapped_file_and_the_same_bytes_on_standard_input_give_one_report(write):
    # a plain file is mapped (its chunks are views of the page cache), standard input is read into
    # buffers: the same cuts, the same report (CRLF, a truncated last line, TD and non-TD exits)
    data = wide_trace() + fixture("ftrace", all_crlf=True)
    mapped = audit(write("t", data))
    read = audit("-", input=data)
    assert mapped["inputs"][0].pop("name") != read["inputs"][0].pop("name")
    for rep in (mapped, read):
        rep["td"]["tasks"] = [t.split(":", 1)[1] for t in rep["td"]["tasks"]]
        rep["td"]["non_td_tasks"] = [t.split(":", 1)[1] for t in rep["td"]["non_td_tasks"]]
        for row in rep["per_process"] + rep["per_vcpu"]:
            row.pop("source")
        for ex in rep["unparsed_examples"]:
            ex.pop("input")
    assert mapped == read
    assert mapped["inputs"][0]["truncated_last_line"] and mapped["totals"]["exits"] > 15_345


def test_a_line_longer_than_max_line_or_a_file_without_newline(write):
    from tdvmcall.trace.io import MAX_LINE

    for text in (b"x" * (MAX_LINE + 10), b"# tracer: nop\n" + b"x" * (MAX_LINE + 10)):  # no newline to end it
        r = runner.invoke(app, ["trace", write("long", text)])
        assert r.exit_code == 2 and "longer than 1 MiB" in r.stderr
    one = line("ftrace", *TD, 1.0, "kvm_exit", payload(0, "TDCALL", 0xFC00))
    rep = audit(write("one", one.encode()))  # no newline at all: one truncated line, still parsed
    assert (rep["inputs"][0]["lines"], rep["inputs"][0]["parsed"], rep["inputs"][0]["truncated_last_line"]) == (
        1,
        1,
        True,
    )


def test_task_lists_are_in_a_stable_order(write, monkeypatch):
    # task ids follow the order in which the parsing threads meet them; the report lists tasks by
    # input, process and pid, whatever that order was (small chunks: many of them, in parallel)
    from tdvmcall.trace import audit as trace
    from tdvmcall.trace import io as traceio

    events = [
        line("ftrace", "CPU 0/KVM", pid, 1.0 + pid / 1000, "kvm_exit", payload(0, "TDCALL", 0xFC00))
        for pid in (1009, 1003, 1007, 1001, 1005)
    ]
    path = write("t", ("# tracer: nop\n" + "\n".join(events) + "\n").encode())
    monkeypatch.setattr(trace, "chunks", lambda src: traceio.chunks(src, 97))
    rep = audit(path)
    assert [t.split("-")[-1] for t in rep["td"]["tasks"]] == ["1001", "1003", "1005", "1007", "1009"]


# --- issue 13: outputs checked before the work, truncated streams, counts, widths, errors ----------
def no_audit(monkeypatch):
    """Make reading any input fail the test: an output path must be refused before the work."""
    from tdvmcall.trace import audit as trace

    def refuse(*args, **kwargs):
        raise AssertionError("the audit ran before the output paths were checked")

    monkeypatch.setattr(trace, "audit_input", refuse)


def one_error_line(r, *needles: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    assert r.stderr.startswith("tdvmcall: error: ") and r.stderr.count("\n") == 1, r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


@pytest.mark.parametrize(
    "option, name, needles",
    [
        ("--plot", "x.txt", ("x.txt", "txt", "png")),  # matplotlib writes no .txt
        ("--plot", "adir", ("adir", "directory")),
        ("--to-parquet", "adir", ("adir", "directory")),
        ("--plot", "nodir/x.png", ("nodir", "no such directory")),
        ("--to-parquet", "nodir/x.parquet", ("nodir", "no such directory")),
        ("--to-parquet", "", ("--to-parquet", "empty")),
        ("--plot", "-", ("--plot", "file named '-'")),  # '-' is a stream elsewhere, never a file here
        ("--to-parquet", "-", ("--to-parquet", "file named '-'")),
    ],
)
def test_bad_output_paths_are_refused_before_the_audit(write, tmp_path, monkeypatch, option, name, needles):
    path = write("t", fixture("ftrace"))
    (tmp_path / "adir").mkdir()
    monkeypatch.chdir(tmp_path)
    no_audit(monkeypatch)
    one_error_line(runner.invoke(app, ["trace", path, option, name]), *needles)
    assert not (tmp_path / "adir.png").exists() and not (tmp_path / "-").exists()


@pytest.mark.parametrize("option", ["--to-parquet", "--plot"])
def test_an_output_that_is_an_input_is_refused(write, monkeypatch, option):
    data = fixture("ftrace")
    path = write("t.png", data)  # a plot name, so that only the clash can be the reason
    no_audit(monkeypatch)
    one_error_line(runner.invoke(app, ["trace", path, option, path]), path, "input")
    with open(path, "rb") as f:
        assert f.read() == data  # the trace is untouched


def test_plot_and_parquet_to_the_same_file_are_refused(write, tmp_path, monkeypatch):
    out = str(tmp_path / "out.png")
    no_audit(monkeypatch)
    r = runner.invoke(app, ["trace", write("t", fixture("ftrace")), "--plot", out, "--to-parquet", out])
    one_error_line(r, "same file")


def test_a_plot_name_without_extension_is_written_as_png_under_that_name(write, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["trace", write("t", fixture("ftrace")), "--plot", "noext"])
    assert r.exit_code == 0, r.stderr
    assert "wrote plot noext" in r.stderr and not (tmp_path / "noext.png").exists()
    with open(tmp_path / "noext", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_a_plot_in_svg_is_svg(write, tmp_path):
    out = tmp_path / "p.svg"
    r = runner.invoke(app, ["trace", write("t", fixture("ftrace")), "--plot", str(out)])
    assert r.exit_code == 0, r.stderr
    assert b"<svg" in out.read_bytes()[:1000]


@pytest.mark.parametrize("cut", [1, 7, "frame2"])
def test_a_truncated_zstd_stream_is_an_error(write, cut):
    # the same as a truncated gzip stream: the data that would follow is lost, so exit 2
    data = fixture("ftrace") + b"\n"
    z = zstandard.ZstdCompressor()
    if cut == "frame2":  # two frames (zstd -c a b > ab.zst, or a stream flushed): the second one cut
        blob = z.compress(data[:500]) + z.compress(data[500:])[:-5]
    else:
        blob = z.compress(data)[:-cut]
    one_error_line(runner.invoke(app, ["trace", write("t.zst", blob)]), "t.zst", "zstd", "truncated")


def test_a_zstd_stream_of_several_frames_is_read_whole(write):
    data = fixture("ftrace")
    z = zstandard.ZstdCompressor()
    check_main_fixture(audit(write("t.zst", z.compress(data[:700]) + z.compress(data[700:]))), "ftrace")


def test_a_truncated_gzip_stream_is_an_error(write):
    one_error_line(runner.invoke(app, ["trace", write("t.gz", gzip.compress(fixture("ftrace"))[:-9])]), "t.gz")


def test_negative_top_is_an_error_and_zero_lists_none(write):
    path = write("t", fixture("ftrace"))
    one_error_line(runner.invoke(app, ["trace", path, "--top", "-1"]), "--top", "-1")
    assert audit(path, "--top", "0")["top_offending"] == []
    assert len(audit(path, "--top", "2")["top_offending"]) == 2


@pytest.mark.parametrize("td", ["-1", "1,,2", "1001,-5", ",", "0x", "0x0", "1_001", "+1001", "1e3", "\u0663"])
def test_bad_td_lists_are_refused(write, td):
    one_error_line(runner.invoke(app, ["trace", write("t", fixture("ftrace")), "--td", td]), "--td")


def test_td_naming_no_task_is_an_error_and_a_partial_miss_a_warning(write):
    path = write("t", fixture("ftrace"))
    one_error_line(runner.invoke(app, ["trace", path, "--td", "999,998"]), "998", "999", "no task")
    r = runner.invoke(app, ["trace", path, "--td", "1001,999", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["td"]["tasks"] == [f"{path}:CPU 0/KVM-1001"]
    assert r.stderr.count("\n") == 1 and "tdvmcall: warning:" in r.stderr and "999" in r.stderr


def test_closed_standard_input_is_one_line_and_exit_2():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", "from tdvmcall.cli import main; main()", "trace", "-"],
        preexec_fn=lambda: os.close(0),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith("tdvmcall: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert "standard input" in r.stderr


def test_a_missing_compiled_scanner_is_one_line_and_exit_2(write):
    # a source tree used without `pip install`: the C extension is not there; the command says so
    import subprocess
    import sys

    blocked = (
        "import sys\n"
        "class NoScanner:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tdvmcall.trace._scan':\n"
        "            raise ImportError('No module named tdvmcall.trace._scan')\n"
        "sys.meta_path.insert(0, NoScanner())\n"
        "from tdvmcall.cli import main; main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", blocked, "trace", write("t", fixture("ftrace")), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith("tdvmcall: error: ") and r.stderr.count("\n") == 1 and "pip install" in r.stderr


def wide_trace() -> bytes:
    """3,000 TDCALL exits with mask 0x1c00 (depends, a long detail), 12,345 HLT 0x1c00 (completes)
    of TD 1001 and 1,000,000-wide counts nowhere else: every table has four- and five-digit counts."""
    out = ["# tracer: nop"]
    for i in range(3000):
        out.append(line("ftrace", *TD, 1.0 + i / 1e4, "kvm_exit", payload(0, "TDCALL", 0x1C00)))
    for i in range(12345):
        out.append(line("ftrace", *TD, 2.0 + i / 1e5, "kvm_exit", payload(0, "HLT", 0x1C00)))
    return ("\n".join(out) + "\n").encode()


def test_an_audit_without_time_buckets_gives_the_same_report(write):
    # the report never reads the time buckets (only --plot does): without --plot they are not kept
    from tdvmcall.trace import audit as trace
    from tdvmcall.trace import report as trace_report

    path = write("wide", wide_trace() + fixture("ftrace"))
    reports = []
    for times in (True, False):
        a = trace.Audit(times=times)
        trace.audit_input(a, path)
        reports.append(trace_report.finish(a, trace_report.td_tasks(a)))
        assert a.key_columns()["n"].sum() == 15_345 + 17
    assert reports[0] == reports[1]
    with pytest.raises(ValueError, match="no time buckets"):
        a.time_columns()


def test_the_table_report_cuts_no_value_when_not_a_terminal(write):
    # CliRunner's stdout is not a terminal (rich would take 80 columns)
    path = write("wide", wide_trace())
    rep = audit(path)
    r = runner.invoke(app, ["trace", path])
    assert r.exit_code == 0
    assert "…" not in r.stdout
    lines_ = r.stdout.splitlines()
    # the per-mask row: mask, registers, then the counts, all whole, on one line
    assert any("0x1c00" in s and "r10 r11 r12" in s and "15,345" in s and "3,000" in s for s in lines_), r.stdout
    for p in rep["top_offending"]:
        assert any(p["reason"] in s and p["mask"] in s and f"{p['exits']:,}" in s for s in lines_), p
    assert any(rep["top_offending"][0]["detail"] in s for s in lines_)  # the detail, whole, on one line


@pytest.mark.parametrize("width", [80, 60, 40])
def test_a_narrow_terminal_never_cuts_a_value(write, width):
    # issue 18.17: at 80 columns rich folded "15,345" into "15,3" / "45" and "0x1c00" into "0x1c0" / "0"
    from rich.console import Console

    from tdvmcall.trace import audit as trace
    from tdvmcall.trace import report as trace_report
    from tdvmcall.trace.cli import show

    a = trace.Audit()
    trace.audit_input(a, write("wide", wide_trace()))
    rep = trace_report.finish(a, trace_report.td_tasks(a))
    console = Console(width=width, force_terminal=True, record=True, color_system=None)
    with console.capture() as cap:
        show(rep, console)
    text = cap.get()
    assert "…" not in text
    tables = text[text.index("per process") :].splitlines()  # the summary lines above hold counts too
    assert all(len(s) <= width for s in tables), text

    def whole(value: str) -> int:
        return sum(s.count(value) for s in tables)

    # how often each value stands in the tables (3,000 TDCALL 0x1c00 exits, 12,345 HLT 0x1c00, one task):
    # exits and TDVMCALL per process, per vCPU, per mask; HLT's exits, TDVMCALL, completes per reason ...
    assert whole("15,345") == 6, text
    assert whole("12,345") == 6, text
    assert whole("3,000") == 7, text
    assert whole("0x1c00") == 2, text
    assert whole("CPU 0/KVM-1001") == 1, text
    for word in rep["top_offending"][0]["detail"].split():  # a long text folds at its spaces only
        assert whole(word) >= 1, (word, text)


# --- the plot: bins a reader can see -------------------------------------------------------------
def td_trace(stamps: list[float], reason: str = "TDCALL", mask: int = 0xFFCC) -> bytes:
    lines_ = [line("ftrace", *TD, t, "kvm_exit", payload(0, reason, mask)) for t in stamps]
    return ("# tracer: nop\n" + "\n".join(lines_) + "\n").encode()


def plotted(path: str):
    from tdvmcall.trace import audit as trace
    from tdvmcall.trace import plot as trace_plot
    from tdvmcall.trace import report as trace_report

    a = trace.Audit()
    trace.audit_input(a, path)
    return trace_plot.bins(a, trace_report.td_tasks(a))


def test_three_exits_make_three_bars_at_the_right_times(write):
    # exits at 100.0, 100.5 and 102.9 s (TDCALL 0xFFCC: completes).  The audit keeps buckets of
    # 2**s / 1024 s with the span, 2.9 s, under 511 of them: s = 3, 1/128 s.  The plot merges
    # buckets in powers of two until at most 64 bins cover the span from the first bucket:
    # 1/128 s -> 372 buckets (12800 to 13171), 1/64 -> 186, 1/32 -> 93, 1/16 s -> 47 bins
    # (1600 to 1646).  So: 47 bins of 0.0625 s from t = 100.0 s, one exit in bins 0, 8 and 46
    # (100.5 / 0.0625 = 1608; 102.9 / 0.0625 = 1646.4)
    from tdvmcall.trace.verdict import VERDICTS

    b = plotted(write("t", td_trace([100.0, 100.5, 102.9])))
    assert b.width == 0.0625 and b.start == 100.0
    assert b.counts.shape == (47, len(VERDICTS))
    done = b.counts[:, VERDICTS.index("completes")]
    assert done.nonzero()[0].tolist() == [0, 8, 46] and done.sum() == 3
    assert b.counts.sum() == 3


def test_the_plot_draws_every_bin_inside_the_axes(write, tmp_path):
    # the bars drawn: one per non-empty bin and verdict, left edge at the bin's start, height in
    # exits per second (1 exit / 0.0625 s = 16), all inside the x range, the first not at its edge
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.patches import Rectangle

    from tdvmcall.trace import plot as trace_plot

    path = write("t", td_trace([100.0, 100.5, 102.9]))
    fig = trace_plot.figure(plotted(path))
    ax = fig.axes[0]
    bars = sorted(
        (round(p.get_x(), 6), p.get_width(), p.get_height())
        for p in ax.patches
        if isinstance(p, Rectangle) and p.get_height() > 0
    )
    assert bars == [(0.0, 0.0625, 16.0), (0.5, 0.0625, 16.0), (2.875, 0.0625, 16.0)]
    lo, hi = ax.get_xlim()
    assert lo < 0.0 and hi >= 2.9375  # the first bar clear of the axis, the last one drawn whole
    assert "62.5 ms" in ax.get_xlabel() and "100" in ax.get_xlabel()
    legend = fig.legends[0] if fig.legends else ax.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == ["completes"]
    fig.savefig(tmp_path / "three.png")


def test_a_long_trace_gets_tens_of_bins(write):
    # one exit a second for an hour: the audit's buckets are 8 s wide (3600 s / 2**s * 1024 < 511
    # from s = 13), 450 of them; the plot doubles them to 16, 32, 64 s: 57 bins (0 to 3584 s)
    b = plotted(write("t", td_trace([float(t) for t in range(3600)])))
    assert b.width == 64.0 and b.start == 0.0 and b.counts.shape[0] == 57
    assert b.counts.sum() == 3600 and b.counts[:-1].sum(axis=1).tolist() == [64] * 56


# --- interrupts, failing reads and writes (issue 18) ----------------------------------------------
def _trace_process(*args: str, cwd: str | None = None):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-c", "from tdvmcall.cli import main; main()", "trace", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )


def _exits_block() -> bytes:
    """About 1 MiB of well-formed TDVMCALL exits of TD 1001."""
    one = line("ftrace", *TD, 1.0, "kvm_exit", payload(0, "TDCALL", 0x1C00)) + "\n"
    return ("# tracer: nop\n" + one * ((1 << 20) // len(one) + 1)).encode()[: 1 << 20].rsplit(b"\n", 1)[0] + b"\n"


def _feed(proc, megabytes: int, header: bool = True) -> int:
    """Write this much trace into the process's standard input: a write returns once the process
    has read all but a pipe's worth, so the process is then parsing chunks (compiled, on threads).
    The number of kvm_exit lines written."""
    block = _exits_block()
    first, block = (block, block.split(b"\n", 1)[1]) if header else (block.split(b"\n", 1)[1],) * 2
    exits = 0
    for data in [first] + [block] * (megabytes - 1):
        proc.stdin.write(data)
        exits += data.count(b" kvm_exit: ")
    proc.stdin.flush()
    return exits


def _ended(proc, timeout: float = 60) -> tuple[int, str, str]:
    """End of input (communicate closes it), then the process's status and output."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def _signalled_mid_parse(proc, signum: int) -> tuple[int, str, str]:
    """Feed 24 MiB of exits (the process is then parsing), send the signal, and return how the
    process ended; it is killed whatever happens, so a hang fails the test instead of outliving it."""
    try:
        _feed(proc, 24)
        proc.send_signal(signum)
        return _ended(proc)
    finally:
        proc.kill()


@pytest.mark.parametrize("signum, status, said", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_an_interrupted_trace_is_one_line_and_128_plus_the_signal(signum, status, said):
    # issue 18.3: Ctrl-C during the compiled parsing ended in "SystemError: CPUDispatcher(<function group>)
    # returned a result with an exception set", exit 1
    rc, out, err = _signalled_mid_parse(_trace_process("-", "--json"), signum)
    assert (rc, out, err) == (status, "", f"tdvmcall: {said}\n")


@pytest.mark.parametrize("signum", [2, 15])
def test_an_interrupted_parquet_run_leaves_nothing_partial_and_the_old_file_whole(tmp_path, signum):
    # issue 18.1: Ctrl-C left a truncated Parquet file under the final name, or FILE.partial behind
    out_path = tmp_path / "exits.parquet"
    proc = _trace_process(str(tmp_path / "first.txt"), "--to-parquet", str(out_path), "--json")
    _ended(proc)  # the first run fails (no such input) and writes nothing
    assert os.listdir(tmp_path) == []
    (tmp_path / "small.txt").write_bytes(fixture("ftrace"))
    r = runner.invoke(app, ["trace", str(tmp_path / "small.txt"), "--to-parquet", str(out_path)])
    assert r.exit_code == 0, r.stderr
    before = out_path.read_bytes()
    rc, _, err = _signalled_mid_parse(_trace_process("-", "--to-parquet", str(out_path), "--json"), signum)
    assert rc == 128 + signum and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["exits.parquet", "small.txt"]  # nothing partial, named or hidden
    assert out_path.read_bytes() == before  # the complete file of the earlier run, untouched


def test_two_runs_writing_one_parquet_file_share_no_temporary_file(tmp_path):
    # issue 18.9: both runs wrote FILE.partial; one reported success with 0 rows
    out_path = tmp_path / "exits.parquet"
    procs = [_trace_process("-", "--to-parquet", str(out_path), "--json") for _ in range(2)]
    try:
        # both in the middle of their audit at once, rows of 4 MiB chunks written (three are in flight)
        rows = [_feed(p, 20) for p in procs]
        assert os.listdir(tmp_path) == []  # the rows wait in anonymous files: no name to share (or leave)
        rows = [n + _feed(p, more, header=False) for n, p, more in zip(rows, procs, (4, 8))]  # different files
        results = [_ended(p) for p in procs]  # the first ends, then the second
    finally:
        for p in procs:
            p.kill()
    assert 100_000 < rows[0] < rows[1]
    for (rc, out, err), n in zip(results, rows):
        assert rc == 0, err
        assert json.loads(out)["totals"]["exits"] == n
    table = pq.read_table(out_path)  # the complete file of the run that ended last
    assert table.num_rows == rows[1] and table["line"].to_pylist() == list(range(2, rows[1] + 2))
    assert os.listdir(tmp_path) == ["exits.parquet"]


def test_an_input_that_fails_on_read_is_one_line_and_exit_2():
    # issue 18.8: /proc/self/mem opens but cannot be read at offset 0 (EIO): an OSError traceback;
    # from standard input it was called "empty input"
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from tdvmcall.cli import main; main()", "trace"]
    r = subprocess.run([*cmd, "/proc/self/mem"], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith("tdvmcall: error: /proc/self/mem: cannot read") and r.stderr.count("\n") == 1
    with open("/proc/self/mem", "rb") as mem:
        r = subprocess.run([*cmd, "-"], stdin=mem, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith("tdvmcall: error: <stdin>: cannot read") and r.stderr.count("\n") == 1
    assert "empty" not in r.stderr


def test_standard_input_named_twice_is_refused(write):
    # issue 18.16: `trace - -` read standard input, then found it empty: "empty input"
    one_error_line(runner.invoke(app, ["trace", "-", "-"], input=fixture("ftrace")), "'-'", "2 times", "once")
    path = write("t", fixture("ftrace"))
    one_error_line(runner.invoke(app, ["trace", "-", path, "-"], input=fixture("ftrace")), "only once")


@pytest.mark.parametrize("as_json", [True, False])
def test_a_full_standard_output_is_one_line_and_exit_2(write, as_json):
    # issue 18.7: `tdvmcall trace ... > /dev/full` was an OSError traceback, exit 1 (a finding, to CI)
    import subprocess
    import sys

    path = write("wide", wide_trace())
    cmd = [sys.executable, "-c", "from tdvmcall.cli import main; main()", "trace", path]
    with open("/dev/full", "w") as full:
        r = subprocess.run(cmd + (["--json"] if as_json else []), stdout=full, stderr=subprocess.PIPE, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("tdvmcall: error: cannot write standard output (No space left on device)"), err
