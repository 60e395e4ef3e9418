"""Benchmark ``tdvmcall scan`` on a firmware image and a kernel.

    python bench/scan.py                                   # synthetic inputs built here (GNU as, ld)
    python bench/scan.py --firmware OVMF.inteltdx.ms.fd --vmlinux vmlinux-6.12   # real ones

Without paths it builds, in a temporary directory, inputs of the sizes the issue names: a 4 MiB
flash image holding one firmware volume whose LZMA section decompresses to about 14 MB of PE32
drivers (90 drivers, each ``tests/data/scan/sites.s`` plus generated filler code that calls the
TDVMCALL wrapper, as EDK2's drivers call ``TdVmCall``), and a 60 MB ELF ``vmlinux`` (16 MB of
code, the rest data).  ``$TDVMCALL_REAL_FIRMWARE`` is used for the firmware when set.

Each input is scanned by ``tdvmcall scan PATH --json`` as its own process (the wall time includes
Python's start and the imports, about 1.3 s here), ``--repeat`` times; the median, fastest and
slowest are shown, with the peak RSS, the sites found, and the in-process split between opening the
containers (decompression included) and the analysis.

Recall of real guests (docs/scan.md says how to build them):

    python bench/scan.py --guest tdshim-calls --expect tdshim.csv --guest vmlinuz-6.12 --no-synthetic

``--guest PATH`` (repeatable) scans a guest and reports its TDVMCALL and TDCALL calls, how many are
resolved (the call and, for a TDVMCALL, the mask known), the CPU time (user + sys of the scan
process, less noisy than the wall time on a busy machine) and the wall time, and the calls the fast
path alone resolves (the deep engine off, in process).  ``--expect FILE.csv`` (one per ``--guest``,
in order) gives what the guest's source says: rows ``function,call,mask`` (``function`` names,
``|``-separated, one of which occurs in the call's caller chain or site, ``call`` the leaf-table or TDCALL leaf name, ``mask``
hex or empty); each row counts as resolved right when some call of that function has that call
(and mask), wrong when one has a different known value.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASM = ROOT / "tests" / "data" / "scan" / "sites.s"
FFS2 = uuid.UUID("8C8CE578-8A3D-4F1C-9935-896185C32DD3")
LZMA_GUID = uuid.UUID("EE4E5898-3914-4259-9D6E-DC7BD79403CF")


def filler(n: int, seed: int) -> str:
    """``n`` small functions that load argument registers and call the wrapper (direct calls the
    scanner must index), with varied immediates so the code is not a single repeated block."""
    out = []
    for i in range(n):
        k = (i * 2654435761 + seed) & 0xFFFF
        callee = "wrapper" if i % 400 == 0 else f"f{seed}_{max(i - 1 - k % 7, 0)}"
        out.append(
            f"f{seed}_{i}:\n  push rbx\n  mov edi, {0x1E if k & 1 else 0xC}\n  mov r12d, {k}\n  lea rbx, [rsp+{k & 0x7F}]\n"
            f"  mov r13d, {k & 1}\n  add rbx, {k}\n  call {callee}\n  pop rbx\n  ret\n"
        )
    return "\n".join(out)


def build(asm: str, d: Path, name: str, pe: bool) -> Path:
    src, obj, out = d / f"{name}.s", d / f"{name}.o", d / (f"{name}.efi" if pe else name)
    src.write_text(ASM.read_text() + "\n.text\n" + asm + "\n")
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    cmd = ["ld", "-m", "i386pep", "-e", "_start", "--subsystem", "11"] if pe else ["ld"]
    subprocess.run([*cmd, "-o", str(out), str(obj)], check=True)
    return out


def section(typ: int, body: bytes) -> bytes:
    if len(body) + 4 >= 0xFFFFFF:  # EFI_COMMON_SECTION_HEADER2: the size in the next 4 bytes
        raw = struct.pack("<II", 0xFFFFFF | typ << 24, len(body) + 8) + body
        return raw + b"\0" * (-len(raw) % 4)
    raw = struct.pack("<I", (len(body) + 4) | typ << 24) + body
    return raw + b"\0" * (-len(raw) % 4)


def synthetic_firmware(d: Path) -> Path:
    files = b""
    for n in range(90):
        pe = build(filler(2800, n), d, f"drv{n}", pe=True).read_bytes()
        ui = section(0x15, f"Driver{n}\0".encode("utf-16-le"))
        body = section(0x10, pe) + ui
        name = uuid.UUID(int=n + 1).bytes_le
        f = name + struct.pack("<HBB", 0, 0x07, 0) + (24 + len(body)).to_bytes(3, "little") + b"\xf8" + body
        files += f + b"\xff" * (-len(f) % 8)
    inner = _volume(files)
    payload = (
        LZMA_GUID.bytes_le + struct.pack("<HH", 24, 1) + lzma.compress(section(0x17, inner), format=lzma.FORMAT_ALONE)
    )
    outer_body = section(0x02, payload)
    outer_file = uuid.UUID(int=999).bytes_le + struct.pack("<HBB", 0, 0x0B, 0)
    outer_file += (24 + len(outer_body)).to_bytes(3, "little") + b"\xf8" + outer_body
    fv = _volume(outer_file)
    assert len(fv) <= 4 << 20, f"the volume ({len(fv)} bytes) does not fit 4 MiB"
    flash = fv + b"\xff" * ((4 << 20) - len(fv))
    path = d / "synthetic.fd"
    path.write_bytes(flash[: 4 << 20])
    print(
        f"synthetic firmware: {len(fv) >> 10} KiB volume in a 4 MiB flash, {len(files) / 1e6:.1f} MB of drivers inside LZMA"
    )
    return path


def _volume(files: bytes) -> bytes:
    length = 72 + len(files)
    length += -length % 8
    head = bytes(16) + FFS2.bytes_le + struct.pack("<Q4sIHHHBB", length, b"_FVH", 0, 72, 0, 0, 0, 2)
    head += struct.pack("<IIII", 1, length, 0, 0)
    return (head + files).ljust(length, b"\xff")


def synthetic_vmlinux(d: Path) -> Path:
    asm = filler(400_000, 7) + "\n.data\n.fill 44000000, 1, 0x5a\n"
    path = build(asm, d, "vmlinux", pe=False)
    print(f"synthetic vmlinux: {path.stat().st_size / 1e6:.0f} MB")
    return path


def run(path: Path, repeat: int) -> None:
    walls, rss = [], 0
    doc: dict = {}
    for _ in range(repeat):
        t = time.perf_counter()
        p = subprocess.run(
            [sys.executable, "-c", "from tdvmcall.cli import main; main()", "scan", str(path), "--json"],
            capture_output=True,
        )
        walls.append(time.perf_counter() - t)
        rss = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
        doc = json.loads(p.stdout)
    # the split, in process
    sys.path.insert(0, str(ROOT / "src"))
    from tdvmcall.judge import Host
    from tdvmcall.scan.analyze import analyze
    from tdvmcall.scan.containers import open_input

    t0 = time.perf_counter()
    found = [f for _, f in open_input(path)]
    t1 = time.perf_counter()
    for f in found:
        analyze(str(path), f, Host(), {})
    t2 = time.perf_counter()
    code = sum(len(c.data) for f in found for c in f.codes)
    s = doc["summary"]
    print(
        f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, {code / 1e6:.1f} MB of code; "
        f"wall median {statistics.median(walls):.2f} s (min {min(walls):.2f}, max {max(walls):.2f}, n={repeat}); "
        f"peak RSS {rss / 1024:.0f} MB; open {t1 - t0:.2f} s + analyze {t2 - t1:.2f} s in process; "
        f"{s['tdcall_sites']} TDCALL sites, {s['tdvmcall_sites']} TDVMCALL sites, {s['resolved_calls']} calls"
    )


def guest(path: Path, expect: Path | None) -> None:
    """Recall and time of the scan on one real guest (see the module's docstring)."""
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(
        [sys.executable, "-c", "from tdvmcall.cli import main; main()", "scan", str(path), "--json"],
        capture_output=True,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    doc = json.loads(p.stdout)
    calls = doc["sites"]

    def resolved(s: dict) -> bool:
        return s["call"] not in ("unresolved", None) and (s["rax"] != "0x0" or s["mask"] is not None)

    sys.path.insert(0, str(ROOT / "src"))
    from tdvmcall.judge import Host
    from tdvmcall.scan.analyze import analyze
    from tdvmcall.scan.containers import open_input

    fast = 0
    for _, f in open_input(path):
        img = analyze(str(path), f, Host(), {}, deep=False)
        fast += sum(1 for s in img.sites if s.rax is not None and (s.rax != 0 or (s.mask is not None and s.leaf)))
    line = (
        f"{path.name}: {len(calls)} calls, {sum(map(resolved, calls))} resolved ({fast} by the fast path alone); "
        f"CPU {cpu:.2f} s, wall {wall:.2f} s"
    )
    if expect is not None:
        right = wrong = 0
        rows = [r.split(",") for r in expect.read_text().splitlines() if r.strip() and not r.startswith("#")]
        for fn, call, mask in rows:
            alts = fn.split("|")
            mine = [s for s in calls if any(x in (s["via"] or "") or x in s["symbol"] for x in alts)]
            ok = [s for s in mine if s["call"] == call and (not mask or s["mask"] == mask.lower())]
            bad = [s for s in mine if resolved(s) and s not in ok]
            right += bool(ok)
            wrong += bool(bad and not ok)
        line += f"; source: {len(rows)} calls, {right} resolved right, {wrong} wrong"
    print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--firmware", type=Path, default=os.environ.get("TDVMCALL_REAL_FIRMWARE"))
    ap.add_argument("--vmlinux", type=Path)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--guest", type=Path, action="append", default=[], help="a real guest: recall and time")
    ap.add_argument("--expect", type=Path, action="append", default=[], help="FILE.csv per --guest")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --guest inputs")
    a = ap.parse_args()
    for i, g in enumerate(a.guest):
        guest(g, a.expect[i] if i < len(a.expect) else None)
    if a.no_synthetic:
        return
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        fw = a.firmware if a.firmware and Path(a.firmware).is_file() else synthetic_firmware(d)
        run(Path(fw), a.repeat)
        vm = a.vmlinux if a.vmlinux else synthetic_vmlinux(d)
        run(Path(vm), a.repeat)


if __name__ == "__main__":
    main()
