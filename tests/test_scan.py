"""``tdvmcall scan`` on fixtures the suite builds itself from ``tests/data/scan/sites.s`` (GNU as and
ld): an ELF with symbols, the same stripped, a PE32+ EFI application, a TE image made from it, and a
UEFI firmware volume whose driver sits in an LZMA GUID-defined section.  Every expected value is
read from the assembly by hand (the comments there), the verdicts from the leaf table's minimal
masks and the module's control rules (docs/abi.md §2, §4), never from the scanner's output."""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import shutil
import struct
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from interrupted_write import interrupted
from tdvmcall.cli import app

HERE = Path(__file__).parent
ASM = HERE / "data" / "scan" / "sites.s"
runner = CliRunner()

pytestmark = pytest.mark.skipif(
    not (shutil.which("as") and shutil.which("ld") and shutil.which("strip")),
    reason="GNU as, ld and strip are needed to build the scan fixtures",
)

# --- building the fixtures ---------------------------------------------------------------------------
FFS2 = uuid.UUID("8C8CE578-8A3D-4F1C-9935-896185C32DD3")
LZMA_GUID = uuid.UUID("EE4E5898-3914-4259-9D6E-DC7BD79403CF")
FILE_GUID = uuid.UUID("11111111-2222-3333-4444-555555555555")


def section(typ: int, body: bytes) -> bytes:
    """A common section header (PI vol. 3): 24-bit size, type; padded to 4 bytes."""
    raw = struct.pack("<I", (len(body) + 4) | typ << 24) + body
    return raw + b"\0" * (-len(raw) % 4)


def guided_lzma(inner: bytes) -> bytes:
    """A GUID-defined section (header 4 + GUID 16 + DataOffset 2 + Attributes 2 = 24 bytes) holding
    an LZMA "alone" stream, processing required (attribute bit 0)."""
    payload = lzma.compress(inner, format=lzma.FORMAT_ALONE)
    body = LZMA_GUID.bytes_le + struct.pack("<HH", 24, 0x01) + payload
    return section(0x02, body)


def ffs_file(sections: bytes, ftype: int = 0x07, name: uuid.UUID = FILE_GUID) -> bytes:
    """An FFS file header (name, checksum, type DRIVER, attributes, 24-bit size, state)."""
    size = 24 + len(sections)
    return name.bytes_le + struct.pack("<HBB", 0, ftype, 0) + size.to_bytes(3, "little") + b"\xf8" + sections


def volume(files: bytes) -> bytes:
    """A firmware volume: zero vector, FFS2 GUID, length, ``_FVH``, attributes, header length 72
    (56 + one block-map entry + terminator), checksum, no extended header, revision 2."""
    hlen = 72
    length = hlen + len(files)
    length += -length % 8
    head = bytes(16) + FFS2.bytes_le + struct.pack("<Q4sIHHHBB", length, b"_FVH", 0, hlen, 0, 0, 0, 2)
    head += struct.pack("<IIII", 1, length, 0, 0)
    body = head + files
    return body + b"\xff" * (length - len(body))


def te_from_pe(pe: bytes) -> bytes:
    """A TE image (PI vol. 1): the PE headers up to the section table replaced by a 40-byte TE header;
    StrippedSize = the bytes removed, so a section's file offset = raw pointer - StrippedSize + 40."""
    (pe_at,) = struct.unpack_from("<I", pe, 0x3C)
    machine, nsec = struct.unpack_from("<HH", pe, pe_at + 4)
    (opt,) = struct.unpack_from("<H", pe, pe_at + 20)
    entry, base_of_code = struct.unpack_from("<II", pe, pe_at + 24 + 16)
    (image_base,) = struct.unpack_from("<Q", pe, pe_at + 24 + 24)
    table = pe_at + 24 + opt
    head = struct.pack("<2sHBBHIIQ", b"VZ", machine, nsec, 10, table, entry, base_of_code, image_base)
    head += bytes(40 - len(head))
    return head + pe[table:]


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("scan")
    obj = d / "sites.o"
    subprocess.run(["as", "--64", "-o", str(obj), str(ASM)], check=True)
    subprocess.run(["ld", "-o", str(d / "sites.elf"), str(obj)], check=True)
    subprocess.run(["strip", "-o", str(d / "sites.stripped"), str(d / "sites.elf")], check=True)
    subprocess.run(
        ["ld", "-m", "i386pep", "-e", "_start", "--subsystem", "10", "-o", str(d / "sites.efi"), str(obj)], check=True
    )
    pe = (d / "sites.efi").read_bytes()
    (d / "sites.te").write_bytes(te_from_pe(pe))
    ui = section(0x15, "SitesDxe\0".encode("utf-16-le"))
    fv = volume(ffs_file(guided_lzma(section(0x10, pe) + ui)))
    (d / "sites.fv").write_bytes(fv)
    # the same driver linked into two modules (as EDK2 links BaseLib's TdVmCall stub into each)
    first = ffs_file(guided_lzma(section(0x10, pe) + ui))
    first += b"\xff" * (-len(first) % 8)  # FFS files are 8-byte aligned
    other = section(0x15, "OtherDxe\0".encode("utf-16-le"))
    second = ffs_file(guided_lzma(section(0x10, pe) + other), name=uuid.UUID(int=FILE_GUID.int + 1))
    (d / "two-modules.fv").write_bytes(volume(first + second))
    (d / "flash.fd").write_bytes(b"\xff" * 0x1000 + fv + b"\xff" * 0x1000)
    (d / "truncated.fv").write_bytes(fv[: len(fv) // 2])
    bad = bytearray(fv)
    start = fv.find(LZMA_GUID.bytes_le) + 20 + 13  # after the section's GUID, offsets and LZMA header
    bad[start + 40 : start + 240] = b"\xa5" * 200
    (d / "corrupt-lzma.fv").write_bytes(bytes(bad))
    return {p.name: p for p in d.iterdir()}


def scan_json(*args: str | Path) -> tuple[int, dict]:
    res = runner.invoke(app, ["scan", *map(str, args), "--json"])
    assert res.exit_code in (0, 1, 2), res.output
    return res.exit_code, json.loads(res.stdout)


def by_symbol(doc: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in doc["sites"]:
        out.setdefault(s["symbol"].split("+")[0], []).append(s)
    return out


# --- the sites, with symbols -------------------------------------------------------------------------
def test_elf_with_symbols_every_case(built):
    code, doc = scan_json(built["sites.elf"])
    sites = by_symbol(doc)
    # 1. immediate mask 0x1C00 (R10 R11 R12), RDMSR: its minimal mask exactly -> ok under both
    [s] = sites["imm_mask"]
    assert s["symbol"] == "imm_mask+0x16"  # 2 + 5 + 3 + 6 + 6 bytes before the TDCALL
    assert (s["rax"], s["mask"], s["r10"], s["r11"], s["call"]) == ("0x0", "0x1c00", "0x0", "0x1f", "Instruction.RDMSR")
    assert s["how"]["rcx"] == "immediate" and s["how"]["r10"] == "zeroing idiom"
    assert s["inputs"] == {"r12": "0x1b"}
    assert s["verdict"] == {"legacy": "ok", "hardened": "ok"} and s["module"]["accepted"]
    # 2. a copy of r8: 0xFFEC exposes RBP -> the module fails it under NO_RBP_MOD
    [s] = sites["copy_mask"]
    assert s["mask"] == "0xffec" and s["how"]["rcx"] == "copy of r8"
    assert s["verdict"] == {"legacy": "module-rejects", "hardened": "module-rejects"}
    assert s["module"] == {"accepted": False, "status": "0xc000010000000001"}  # TDX_OPERAND_INVALID, RCX
    # 3. xor ecx, ecx: nothing exposed; CPUID needs R10..R15 -> refused by hardened, silent in legacy
    [s] = sites["zero_mask"]
    assert s["mask"] == "0x0" and s["how"]["rcx"] == "zeroing idiom" and s["call"] == "Instruction.CPUID"
    assert s["verdict"] == {"legacy": "legacy-silent", "hardened": "hardened-refuses"}
    # 4. widths: a 32-bit write zeroes the top half; a 64-bit move sign-extends; an 8-bit one merges
    assert sites["mov32"][0]["mask"] == "0xfc00"
    assert sites["mov64"][0]["mask"] == "0xfffffffffffffc00"
    assert sites["mov64"][0]["verdict"]["hardened"] == "module-rejects"  # reserved bits 63:32
    assert sites["mov8"][0]["mask"] == "0xffcc"
    # 5. the wrapper: one resolved call per caller, the leaf and the IO direction from each
    ws = sorted(sites["wrapper"], key=lambda s: s["r11"])
    assert [(s["r11"], s["call"], s["via"]) for s in ws] == [
        ("0x1e", "Instruction.IO", "caller_io+0x14"),
        ("0xc", "Instruction.HLT", "caller_hlt+0x5"),
    ]
    assert ws[0]["inputs"] == {"r13": "0x0"} and "caller at" in ws[0]["how"]["r11"]
    assert all(s["mask"] == "0xfc00" and s["verdict"]["hardened"] == "ok" for s in ws)
    # 6. loaded from memory: said, not guessed; judged by what the call needs
    [s] = sites["mem_mask"]
    assert s["mask"] is None and "loaded from memory" in s["how"]["rcx"]
    assert s["verdict"] == {"legacy": "unresolved", "hardened": "unresolved"}
    assert any("needs at least 0x1c00" in d for d in s["details"])
    # 7. other TDCALL leaves are listed, not judged as TDVMCALLs
    assert sites["vp_info"][0]["tdcall_leaf"] == "TDG.VP.INFO" and sites["vp_info"][0]["mask"] is None
    assert sites["page_accept"][0]["call"] == "TDG.MEM.PAGE.ACCEPT"
    assert sites["page_accept"][0]["verdict"]["hardened"] == "not-tdvmcall"
    # 8. the bytes inside `mov eax, 0xCC010F66` are not a site; those in .data are not code at all
    assert "not_code" not in sites
    # 9. a stack slot: the mask stored then loaded; MMIO with direction 1 pinned
    [s] = sites["stack_mask"]
    assert s["mask"] == "0xfc00" and "[rsp-0x10]" in s["how"]["rcx"] and s["inputs"] == {"r13": "0x1"}
    # 10. through memory, two caller levels: the mask stored by `hypercall`, R10/R11/R13 by its callers
    ts = sorted(by_symbol(doc)["tdcall_stub"], key=lambda s: s["r11"])
    assert [(s["call"], s["via"], s["inputs"]) for s in ts] == [
        ("Instruction.IO", "hypercall+0xd ← do_io_out+0x27", {"r13": "0x1"}),
        ("Instruction.HLT", "hypercall+0xd ← do_halt+0x1d", {}),
    ]
    assert all(s["rax"] == "0x0" and s["mask"] == "0xffcc" and s["r10"] == "0x0" for s in ts)
    assert "stored to [rsi+0x0]" in ts[0]["how"]["rcx"] and "as the caller passed it" in ts[0]["how"]["rcx"]
    summary = doc["inputs"][0]["summary"]
    assert (summary["tdcall_sites"], summary["tdvmcall_sites"], summary["not_code"]) == (12, 10, 1)
    assert summary["module_rejects"] == 2 and summary["hardened_refuses"] == 1 and summary["unresolved"] == 1
    assert code == 1  # some calls fail the hardened policy


def test_rbp_mod_lets_the_module_accept_rbp(built):
    _, doc = scan_json(built["sites.elf"], "--rbp-mod")
    [s] = by_symbol(doc)["copy_mask"]
    assert s["module"]["accepted"] and s["verdict"]["hardened"] == "ok"  # HLT needs only R10 R11 (+R12)


def test_module_1_0_has_no_no_rbp_mod(built):
    # docs/abi.md §3: a 1.0 module has no NO_RBP_MOD attribute and never checks RBP (gpr_select bit 5)
    _, doc = scan_json(built["sites.elf"], "--module", "1.0")
    assert doc["host"] == {"module": "1.0", "no_rbp_mod": False, "tree": "kvm-x86"}
    [s] = by_symbol(doc)["copy_mask"]
    assert s["module"]["accepted"]
    _, doc = scan_json(built["sites.elf"])
    assert doc["host"]["no_rbp_mod"] is True and not by_symbol(doc)["copy_mask"][0]["module"]["accepted"]
    screen = runner.invoke(app, ["scan", str(built["sites.elf"]), "--module", "1.0"]).stdout
    assert "has no NO_RBP_MOD" in screen and "(NO_RBP_MOD)" not in screen


@pytest.mark.parametrize("name", ["sites.stripped", "sites.efi", "sites.te"])
def test_stripped_elf_pe_and_te_find_the_same_calls(built, name):
    _, doc = scan_json(built[name])
    summary = doc["inputs"][0]["summary"]
    assert (summary["tdcall_sites"], summary["tdvmcall_sites"], summary["not_code"]) == (12, 10, 1)
    masks = {s["mask"] for s in doc["sites"] if s["mask"]}
    assert masks == {"0x0", "0x1c00", "0xfc00", "0xfffffffffffffc00", "0xffcc", "0xffec"}
    # the wrapper's callers are found without symbols: its start is the target of two calls
    calls = sorted(s["r11"] for s in doc["sites"] if s["mask"] == "0xfc00" and s["inputs"] != {"r13": "0x1"})
    assert "0x1e" in calls and "0xc" in calls
    # and the struct-passing stub's calls, two caller levels up
    assert sorted(s["call"] for s in doc["sites"] if s["mask"] == "0xffcc" and s["via"] and "←" in s["via"]) == [
        "Instruction.HLT",
        "Instruction.IO",
    ]


def test_firmware_volume_with_an_lzma_section(built):
    for name in ("sites.fv", "flash.fd"):
        code, doc = scan_json(built[name])
        assert doc["inputs"][0]["errors"] == []
        s = doc["sites"][0]
        assert "lzma" in s["container"] and "SitesDxe" in s["container"]  # named by its UI section
        assert doc["inputs"][0]["summary"]["tdvmcall_sites"] == 10
        assert code == 1


def test_broken_inputs_one_line_each_exit_2_and_the_others_scanned(built):
    res = runner.invoke(
        app, ["scan", str(built["truncated.fv"]), str(built["sites.elf"]), str(built["corrupt-lzma.fv"]), "--json"]
    )
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("tdvmcall: error: ") for line in lines)
    assert "truncated.fv" in lines[0] and "truncated" in lines[0]
    assert "corrupt-lzma.fv" in lines[1] and "LZMA" in lines[1]
    doc = json.loads(res.stdout)
    assert [len(i["errors"]) for i in doc["inputs"]] == [1, 0, 1]
    assert doc["inputs"][1]["summary"]["tdcall_sites"] == 12


def nested(leaf: bytes, levels: int, crc: bool) -> bytes:
    """``leaf`` inside ``levels`` sections each wrapping the next: compression sections of type 0
    (not compressed: 4-byte uncompressed length, 1-byte type, then the sections), or CRC32
    GUID-defined sections (GUID, DataOffset 24, attributes 0: not processing-required)."""
    crc32 = uuid.UUID("FC1BCDB0-7D31-49AA-936A-A4600D9DD083")
    body = leaf
    for _ in range(levels):
        if crc:
            body = section(0x02, crc32.bytes_le + struct.pack("<HH", 24, 0) + body)
        else:
            body = section(0x01, struct.pack("<IB", len(body), 0) + body)
    return body


def test_nested_sections_are_one_error_and_the_others_are_scanned(built, tmp_path):
    """3,000 nested sections (a 36 KB file) once raised RecursionError out of the command; now the
    nesting limit makes it that input's one-line error; a shallow nesting is still walked."""
    pe = built["sites.efi"].read_bytes()
    (tmp_path / "a.fv").write_bytes(volume(ffs_file(nested(section(0x10, pe), 3, crc=False))))
    (tmp_path / "b.fv").write_bytes(volume(ffs_file(nested(b"", 3000, crc=False))))
    (tmp_path / "c.fv").write_bytes(volume(ffs_file(nested(b"", 3000, crc=True))))
    res = runner.invoke(app, ["scan", str(tmp_path), "--json"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and all("nested deeper" in line for line in lines)
    assert "b.fv" in lines[0] and "c.fv" in lines[1]
    a, b, c = json.loads(res.stdout)["inputs"]
    assert a["summary"]["tdcall_sites"] == 12 and a["errors"] == []
    assert len(b["errors"]) == len(c["errors"]) == 1


def test_a_recursion_or_memory_error_in_one_input_is_its_one_line(built, tmp_path, monkeypatch):
    """Whatever the walk of one input runs out of (stack, memory), that input gets one problem line
    and the next input is still opened."""
    from tdvmcall.scan import containers

    real = containers.explore
    errors = iter([RecursionError("deep"), MemoryError()])

    def explode(data, chain, found, budget, depth=0):
        if chain[0].endswith(".bad"):
            raise next(errors)
        return real(data, chain, found, budget, depth)

    monkeypatch.setattr(containers, "explore", explode)
    for name in ("1.bad", "2.bad"):
        (tmp_path / name).write_bytes(b"x")
    shutil.copy(built["sites.elf"], tmp_path / "3.elf")
    got = list(containers.open_input(tmp_path))
    assert [len(f.problems) for _, f in got] == [1, 1, 0]
    assert "nested too deeply" in got[0][1].problems[0] and "too large" in got[1][1].problems[0]
    assert len(got[2][1].codes) == 1


def test_truncated_streams_are_errors(built, tmp_path):
    """A bzip2, zstd, legacy-lz4 or LZMA-alone stream that ends early is an error naming the stream
    (as gzip's already was), not scanned silently as far as it goes."""
    import bz2

    import lz4.block
    import zstandard

    elf = built["sites.elf"].read_bytes()
    cut = {
        "a.bz2": bz2.compress(elf),
        "b.zst": zstandard.ZstdCompressor().compress(elf),
        "c.lz4": b"\x02\x21\x4c\x18" + struct.pack("<I", len(blk := lz4.block.compress(elf, store_size=False))) + blk,
    }
    for name, blob in cut.items():
        (tmp_path / name).write_bytes(blob[: len(blob) * 2 // 3])
    payload = lzma.compress(section(0x10, built["sites.efi"].read_bytes()), format=lzma.FORMAT_ALONE)
    assert payload[5:13] == b"\xff" * 8  # the size is unknown: only the end marker says it ended
    short = LZMA_GUID.bytes_le + struct.pack("<HH", 24, 0x01) + payload[: len(payload) * 2 // 3]
    (tmp_path / "d.fv").write_bytes(volume(ffs_file(section(0x02, short))))
    res = runner.invoke(app, ["scan", str(tmp_path), "--json"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    kinds = ["bzip2", "zstd", "lz4", "LZMA"]
    assert len(lines) == 4 and all(f"truncated {k} stream" in ln for k, ln in zip(kinds, lines, strict=True))
    # whole, they are scanned
    for name, blob in cut.items():
        (tmp_path / name).write_bytes(blob)
    (tmp_path / "d.fv").unlink()
    code, doc = scan_json(tmp_path)
    assert [i["summary"]["tdcall_sites"] for i in doc["inputs"]] == [12, 12, 12] and code == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_devices_fifos_and_oversized_files_are_refused_not_read(built, tmp_path, monkeypatch):
    """A FIFO would block the read and /dev/zero never ends: neither is read, each is one line, and
    the input after them is scanned; a file over the read cap is refused before it is read."""
    from tdvmcall.scan import containers

    os.mkfifo(tmp_path / "pipe")
    args = [str(tmp_path / "pipe"), "/dev/zero", str(built["sites.elf"])]
    res = runner.invoke(app, ["scan", *args, "--json"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2 and all("not a regular file" in line for line in lines)
    assert json.loads(res.stdout)["inputs"][2]["summary"]["tdcall_sites"] == 12
    # inside a directory too
    shutil.copy(built["sites.elf"], tmp_path / "x.elf")
    got = {Path(n).name: f.problems for n, f in containers.open_input(tmp_path)}
    assert got["x.elf"] == [] and len(got["pipe"]) == 1
    size = built["sites.elf"].stat().st_size
    monkeypatch.setattr(containers, "READ_CAP", size - 1)
    [(_, found)] = list(containers.open_input(built["sites.elf"]))
    assert len(found.problems) == 1 and "read cap" in found.problems[0] and found.codes == []


def elf_from(asm: str, d: Path) -> Path:
    """An ELF with symbols linked from Intel-syntax assembly (GNU as, ld)."""
    (d / "t.s").write_text(".intel_syntax noprefix\n.text\n.globl _start\n_start:\n    ret\n" + asm)
    subprocess.run(["as", "--64", "-o", str(d / "t.o"), str(d / "t.s")], check=True)
    subprocess.run(["ld", "-o", str(d / "t.elf"), str(d / "t.o")], check=True)
    return d / "t.elf"


#: the end of every function below: RAX 0 (TDG.VP.VMCALL), R10 0, R11 0x1F (RDMSR), tdcall
CALL = "    xor eax, eax\n    xor r10d, r10d\n    mov r11d, 0x1f\n    .byte 0x66, 0x0f, 0x01, 0xcc\n    ret\n"


def test_memory_widths_and_paths_are_never_guessed(tmp_path):
    """Values through memory, narrow registers and branches (Intel SDM: MOV, LEA, Jcc), each read by
    hand from the instructions: a slot changed after its store is unknown; a load reads the low
    bytes of what was stored, and a store narrower than the load leaves it unknown; ``lea ecx``
    keeps 32 bits; a write that a jump can go past holds on one path only."""
    asm = {
        "or_after_store": "mov qword ptr [rsp-16], 0x1C00\n or qword ptr [rsp-16], 0x200\n mov rcx, [rsp-16]",
        "byte_after_store": "mov qword ptr [rsp-16], 0x1C00\n mov byte ptr [rsp-15], 0xFF\n mov rcx, [rsp-16]",
        "other_slot_after": "mov qword ptr [rsp-16], 0x1C00\n mov qword ptr [rsp-8], 0\n mov rcx, [rsp-16]",
        "narrow_load": "mov rdx, 0xffffffff00001c00\n mov [rsp-16], rdx\n mov ecx, dword ptr [rsp-16]",
        "short_store": "mov edx, 0x1c00\n mov dword ptr [rsp-16], edx\n mov rcx, qword ptr [rsp-16]",
        "lea32": "mov rdx, 0xffffffff00001000\n lea ecx, [rdx+0xC00]",
        "one_path": "mov ecx, 0xFFEC\n test edi, edi\n jz 1f\n mov ecx, 0x1C00\n1:",
        "one_path_mem": "mov qword ptr [rsp-16], 0xFFEC\n test edi, edi\n jz 1f\n"
        " mov qword ptr [rsp-16], 0x1C00\n1: mov rcx, [rsp-16]",
        "both_paths": "mov ecx, 0x1C00\n test edi, edi\n jz 1f\n nop\n1:",
    }
    text = "".join(f".type {name}, @function\n{name}:\n {body}\n{CALL}" for name, body in asm.items())
    _, doc = scan_json(elf_from(text, tmp_path))
    got = {k: v[0] for k, v in by_symbol(doc).items()}
    want = {
        # the fast path leaves these (never the stored 0x1C00); the deep engine runs them: 0x1C00 | 0x200,
        # and 0x1C00 with its byte 1 made 0xFF
        "or_after_store": "0x1e00",
        "byte_after_store": "0xff00",
        "other_slot_after": "0x1c00",
        "narrow_load": "0x1c00",  # the low 4 bytes of 0xffffffff00001c00
        "short_store": None,  # bytes 4..7 of the slot were never stored
        "lea32": "0x1c00",  # 0xffffffff00001000 + 0xC00, cut to 32 bits
        "one_path": None,  # 0xFFEC when edi == 0, 0x1C00 otherwise
        "one_path_mem": None,
        "both_paths": "0x1c00",  # the jump starts after the write: both paths have it
    }
    assert {k: got[k]["mask"] for k in want} == want
    assert "changed after the store" in got["or_after_store"]["how"]["rcx"]
    assert "changed after the store" in got["byte_after_store"]["how"]["rcx"]
    assert "stored only in part" in got["short_store"]["how"]["rcx"]
    assert "set on one path only" in got["one_path"]["how"]["rcx"]
    assert "set on one path only" in got["one_path_mem"]["how"]["rcx"]
    for k in ("one_path", "short_store"):
        assert got[k]["verdict"] == {"legacy": "unresolved", "hardened": "unresolved"}, k
    assert got["narrow_load"]["verdict"] == got["lea32"]["verdict"] == {"legacy": "ok", "hardened": "ok"}


def test_compressed_inputs_and_directories(built, tmp_path):
    import gzip

    import zstandard

    elf = built["sites.elf"].read_bytes()
    (tmp_path / "a.gz").write_bytes(gzip.compress(elf))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.xz").write_bytes(lzma.compress(elf))
    (tmp_path / "sub" / "c.zst").write_bytes(zstandard.ZstdCompressor().compress(elf))
    _, doc = scan_json(tmp_path)
    assert [Path(i["path"]).name for i in doc["inputs"]] == ["a.gz", "b.xz", "c.zst"]
    assert all(i["summary"]["tdcall_sites"] == 12 for i in doc["inputs"])
    assert doc["sites"][0]["container"][1] == "gzip"


def test_bad_input_is_one_line(tmp_path):
    res = runner.invoke(app, ["scan", str(tmp_path / "missing.bin")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "no such file" in res.stderr
    res = runner.invoke(app, ["scan", str(tmp_path), "--policy", "strict"])
    assert res.exit_code == 2 and "--policy" in res.stderr


def scan_text(*args: str | Path, width: int = 120):
    """``tdvmcall scan`` as a terminal of ``width`` columns shows it (the console's width is set when
    it is made, so it is set here, not through COLUMNS)."""
    from tdvmcall.console import out

    old = out.width
    out.width = width
    try:
        return runner.invoke(app, ["scan", *map(str, args)])
    finally:
        out.width = old


def _first_screen(text: str) -> tuple[str, list[str]]:
    """The findings (from their title to the table's header) and the compact table's rows (the lines
    after its header rule that start a row, not a wrapped one)."""
    lines = text.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("─"))
    start = next(i for i, line in enumerate(lines) if line.startswith("Findings ("))
    return "\n".join(lines[start : rule - 1]), [line for line in lines[rule + 1 :] if line[:1] not in ("", " ")]


def test_first_screen_the_answer_then_findings_then_the_table(built):
    """The default output leads with the answer: the verdict (3 of the 12 calls fail under hardened:
    copy_mask's RBP, mov64's reserved bits, zero_mask's empty mask), the image's summary, one line
    per finding, worst first (the unresolved mask last: not judged), and only then the table, where
    the passing sites appear; how each register was found is left to --verbose."""
    res = scan_text(built["sites.elf"])
    assert res.exit_code == 1
    text = res.stdout
    assert text.splitlines()[1].startswith("FAIL under --policy hardened: 3 of 12 calls do not pass")
    found, rows = _first_screen(text)
    assert found.startswith("Findings (4)") and found.count("module-rejects") == 2
    assert found.index("module-rejects") < found.index("hardened-refuses") < found.index("unresolved")
    assert found.index("copy_mask") < found.index("mov64") < found.index("zero_mask") < found.index("mem_mask")
    assert "imm_mask" not in found and any(row.startswith("imm_mask+0x16 ") for row in rows)
    assert len(rows) == 12  # one per TDCALL: nothing here is the same code twice
    assert all(len(line) <= 120 for line in text.splitlines())
    # why, in a line each (a wide terminal: nothing wrapped)
    wide, _ = _first_screen(scan_text(built["sites.elf"], width=400).stdout)
    lines = {line.split()[1]: line for line in wide.splitlines()[2:] if line[:1] not in ("", " ")}
    assert "exposes rbp" in lines["copy_mask+0x14"] and "reserved bits 63:32" in lines["mov64+0x12"]
    assert "inputs r10 r11 r12 r13 and outputs r12 r13 r14 r15 not exposed" in lines["zero_mask+0xd"]
    assert "mask not recovered" in lines["mem_mask+0x12"] and "needs at least 0x1c00" in lines["mem_mask+0x12"]


def test_how_each_register_was_found_only_with_verbose(built):
    plain = scan_text(built["sites.elf"], width=400).stdout
    verbose = scan_text(built["sites.elf"], "--verbose", width=400).stdout
    # the wrapper takes R11 from its callers (sites.s), mov8 builds RCX from two immediates
    for how in ("r11: copy of rdi ← caller", "rcx: immediate over immediate", "r10: zeroing idiom"):
        assert how not in plain and how in verbose
    assert "Findings (4)" in verbose  # the answer first there too


def test_identical_sites_collapse_with_a_module_count(built):
    """The same driver in two FFS files (SitesDxe, OtherDxe): each of its 12 TDCALLs is one row of
    the table, carried by 2 modules; --verbose and --json keep one row, one object, per site."""
    res = scan_text(built["two-modules.fv"])
    assert res.exit_code == 1
    text = res.stdout
    assert "24 TDCALL sites in 2 modules" in text
    _, rows = _first_screen(text)
    assert len(rows) == 12 and all(row.startswith("2 modules") for row in rows)
    assert "SitesDxe" not in text and "OtherDxe" not in text
    verbose = scan_text(built["two-modules.fv"], "-v").stdout
    assert verbose.count("SitesDxe") == 12 and verbose.count("OtherDxe") == 12
    _, doc = scan_json(built["two-modules.fv"])
    assert doc["inputs"][0]["summary"]["tdcall_sites"] == 24 and len({s["container"][1] for s in doc["sites"]}) == 2


def test_register_runs_are_shortened():
    from tdvmcall.scan.report import regs_text

    xmms = [f"xmm{i}" for i in range(16)]
    assert regs_text(["rdx", "rbx", "r8", "r9", "r13", "r14", "r15", *xmms]) == "rdx rbx r8 r9 r13-r15 xmm0-15"
    assert regs_text(["r10", "r12"]) == "r10 r12"


class MatrixCells(HTMLParser):
    """The matrix of the HTML page: per row (its site label), the cells' column, verdicts, id, and
    the verdict classes of their two halves; the findings' items; the page's JSON data."""

    def __init__(self):
        super().__init__()
        self.rows: dict[str, dict[str, dict]] = {}
        self.row: str | None = None
        self.cell: dict | None = None
        self.stack: list[str] = []
        self.findings: list[str] = []
        self.data = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in ("br", "meta"):  # void elements: no end tag
            self.stack.append(a.get("class") or a.get("id") or tag)
        if tag == "td" and a.get("class") == "cell":
            self.cell = {"legacy": a["data-legacy"], "hardened": a["data-hardened"], "id": a["data-id"], "halves": []}
            self.rows[self.row][a["data-call"]] = self.cell
        elif tag == "span" and self.cell is not None:
            self.cell["halves"].append(a["class"])
        elif tag == "li" and "findings" in self.stack:
            self.findings.append("")

    def handle_endtag(self, tag):
        if tag == "td":
            self.cell = None
        if tag not in ("br", "meta"):
            self.stack.pop()

    def handle_data(self, data):
        if self.stack[-1:] == ["code"] and "site" in self.stack:
            self.row = data
            self.rows[data] = {}
        elif "findings" in self.stack and self.findings:
            self.findings[-1] += data
        elif self.stack[-1:] == ["check-data"]:
            self.data += data


def test_html_page_is_the_matrix_of_sites_by_calls(built, tmp_path):
    """The page ``check --html`` writes (html_matrix.py), here sites x calls: each cell's legacy and
    hardened verdict as read from sites.s by hand (docs/abi.md §2, §4: a mask with RBP or reserved
    bits fails the module; a call passes when its mask covers what the leaf reads and writes)."""
    out = tmp_path / "scan.html"
    res = runner.invoke(app, ["scan", str(built["sites.elf"]), "--html", str(out)])
    assert res.exit_code == 1
    page = out.read_text()
    assert "<script src" not in page and "<link" not in page and "http" not in page.split("<script")[0]  # offline
    p = MatrixCells()
    p.feed(page)
    rejects = ("module-rejects", "module-rejects")
    ok = ("ok", "ok")
    expected = {
        "imm_mask+0x16": {"Instruction.RDMSR": ok},  # 0x1C00 = R10 R11 R12: RDMSR reads R12, writes R11
        "copy_mask+0x14": {"Instruction.HLT": rejects},  # 0xFFEC has RBP (bit 5): NO_RBP_MOD
        "zero_mask+0xd": {"Instruction.CPUID": ("legacy-silent", "hardened-refuses")},  # nothing exposed
        "mov32+0x1a": {"Instruction.RDMSR": ok},  # 0xFC00 = R10..R15
        "mov64+0x12": {"Instruction.RDMSR": rejects},  # reserved bits 63:32 set
        "mov8+0x12": {"Instruction.HLT": ok},  # 0xFFCC: every GPR but RAX RCX RSP RBP
        "wrapper+0xd": {"Instruction.HLT": ok, "Instruction.IO": ok},  # one row, a cell per caller's call
        "mem_mask+0x12": {"Instruction.RDMSR": ("unresolved", "unresolved")},  # mask from memory
        "stack_mask+0x1f": {"#VE.RequestMMIO": ok},  # MMIO write: R12..R15 within 0xFC00
        "tdcall_stub+0x12": {"Instruction.HLT": ok, "Instruction.IO": ok},  # 0xFFCC, two callers' calls
        "vp_info+0x5": {"TDG.VP.INFO": ("not-tdvmcall", "not-tdvmcall")},
        "page_accept+0x8": {"TDG.MEM.PAGE.ACCEPT": ("not-tdvmcall", "not-tdvmcall")},
    }
    got = {row: {call: (c["legacy"], c["hardened"]) for call, c in cells.items()} for row, cells in p.rows.items()}
    assert got == expected
    for cells in p.rows.values():  # each half coloured by its own policy's verdict
        for c in cells.values():
            assert c["halves"] == [f"legacy {c['legacy']}", f"hardened {c['hardened']}"]
    # a cell's id is its first call's index in --json's sites: #show=<id> pins the same call
    _, doc = scan_json(built["sites.elf"])
    io = p.rows["wrapper+0xd"]["Instruction.IO"]
    assert doc["sites"][int(io["id"])]["symbol"] == "wrapper+0xd"
    assert doc["sites"][int(io["id"])]["call"] == "Instruction.IO"
    panel = json.loads(p.data)["results"][io["id"]]
    assert panel["call"] == "Instruction.IO" and panel["written"] == "IO in" and panel["gprs"][0] == "r10"
    # the findings below the matrix: the failing and the unresolved rows, the worst first
    assert [f.split(":")[1].split()[0] for f in p.findings] == [
        "copy_mask+0x14",
        "mov64+0x12",
        "zero_mask+0xd",
        "mem_mask+0x12",
    ]
    assert "needs at least 0x1c00" in p.findings[-1]


def test_to_catalog_rows_collapse_and_pin_directions(built, tmp_path):
    import csv

    out = tmp_path / "mine.csv"
    res = runner.invoke(app, ["scan", str(built["sites.elf"]), str(built["sites.stripped"]), "--to-catalog", str(out)])
    assert res.exit_code == 1
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["guest", "snapshot", "file", "function", "mask_hex", "tdvmcalls", "note"]
    mine = {(r["guest"], r["function"]): r for r in rows}
    assert mine[("sites.elf", "wrapper+0xd")]["tdvmcalls"] in ("IO in", "HLT")
    calls = {r["tdvmcalls"] for r in rows if r["guest"] == "sites.elf"}
    assert {"IO in", "HLT", "RDMSR 0x1b", "RDMSR", "CPUID", "MMIO write"} <= calls  # MSR 0x1B pinned
    assert mine[("sites.elf", "copy_mask+0x14")]["mask_hex"] == "0xFFEC"
    assert {"HLT", "IO out"} <= {r["tdvmcalls"] for r in rows if r["function"] == "tdcall_stub+0x12"}
    # the unresolved mask is not written: 11 resolved TDVMCALLs per image (the wrapper and the stub
    # twice each), 2 images
    assert len(rows) == 2 * 11


def test_to_catalog_round_trip_through_check(built, tmp_path):
    """``scan --to-catalog`` then ``check --catalog``: every row is read back (no row error), and the
    exit status says some fail (the RBP and reserved-bit rows).  The pinned directions ('IO in',
    'MMIO write') need check's grammar for them; until it reads them, those rows are dropped here
    and the test says so."""
    import csv

    from tdvmcall.check.catalog import CatalogError, parse_calls

    out = tmp_path / "mine.csv"
    runner.invoke(app, ["scan", str(built["sites.elf"]), "--to-catalog", str(out)])
    rows = list(csv.DictReader(out.open()))
    try:
        parse_calls("IO in")
        pinned = True
    except CatalogError:
        pinned = False
        rows = [r for r in rows if r["tdvmcalls"].split()[0] not in ("IO", "MMIO")]
        with out.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    res = runner.invoke(app, ["check", "--catalog", str(out), "--json"])
    assert res.exit_code == 1, res.stderr  # the RBP and the reserved-bit rows fail; no row is bad
    doc = json.loads(res.stdout)
    assert doc["errors"] == []
    if not pinned:
        pytest.skip("check's grammar does not read 'IO in'/'MMIO write' yet: rows without them round-trip")


def test_to_catalog_on_standard_output_pipes_into_check(built, tmp_path):
    """``scan --to-catalog -`` writes the catalog, and only it, on stdout (no file named '-'), the
    bytes a file would hold; ``check --catalog -`` reads it back with no row error."""
    out = tmp_path / "mine.csv"
    runner.invoke(app, ["scan", str(built["sites.elf"]), "--to-catalog", str(out)])
    res = runner.invoke(app, ["scan", str(built["sites.elf"]), "--to-catalog", "-"])
    assert res.exit_code == 1  # the RBP and reserved-bit rows, as with a file
    assert res.stdout == out.read_text() and res.stdout.startswith("guest,snapshot,file,function,mask_hex")
    assert not (Path.cwd() / "-").exists()
    back = runner.invoke(app, ["check", "--catalog", "-", "--json"], input=res.stdout)
    assert back.exit_code == 1 and json.loads(back.stdout)["errors"] == []
    both = runner.invoke(app, ["scan", str(built["sites.elf"]), "--to-catalog", "-", "--json"])
    assert both.exit_code == 2 and "--json and --to-catalog -" in both.stderr
    # --html is a file only: '-' is refused, not written as ./- (docs/cli.md)
    html = runner.invoke(app, ["scan", str(built["sites.elf"]), "--html", "-"])
    assert html.exit_code == 2 and "'-' would write a file named '-'" in html.stderr


@pytest.mark.parametrize("cut", [1, 2], ids=["html", "catalog"])
def test_an_interrupted_write_leaves_the_old_output_and_nothing_partial(built, tmp_path, cut):
    """Ctrl-C in the middle of writing --html (the first write) or --to-catalog (the second): the
    file under its final name is the old one, whole, and no temporary file stays (issue 18: no
    partial output under a final name).  It was cut in half under the final name."""
    page, catalog = tmp_path / "scan.html", tmp_path / "mine.csv"
    page.write_text("the old page\n")
    catalog.write_text("the old catalog\n")
    args = ["scan", str(built["sites.elf"]), "--html", str(page), "--to-catalog", str(catalog)]
    interrupted(cut, *args)
    assert catalog.read_text() == "the old catalog\n"
    if cut == 1:
        assert page.read_text() == "the old page\n"
    else:  # the page was whole before the catalog was begun
        assert page.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.csv", "scan.html"]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_broken_containers_are_reported_never_raised(built, data):
    """A truncated or corrupted ELF, PE, TE or volume ends in problem lines (or is scanned as far as
    it goes), never in an exception: the command's one-line error for bad input."""
    from tdvmcall.judge import Host
    from tdvmcall.scan.analyze import analyze
    from tdvmcall.scan.containers import Budget, ContainerError, Found, explore

    name = data.draw(st.sampled_from(["sites.elf", "sites.efi", "sites.te", "sites.fv", "flash.fd"]))
    blob = bytearray(built[name].read_bytes())
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 16))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    found = Found()
    with contextlib.suppress(ContainerError, struct.error, IndexError):  # open_input: one problem line
        explore(bytes(blob), [name], found, Budget())
    analyze(name, found, Host(), {})


REAL_FIRMWARE = os.environ.get("TDVMCALL_REAL_FIRMWARE")
TDCALL_BYTES = b"\x66\x0f\x01\xcc"  # TDCALL (Intel TDX module ABI spec: 66 0F 01 CC)


def test_real_tdx_firmware():
    """Debian sid's ovmf-inteltdx (edk2 2026.08): .ci/run downloads it when it can.

    73 TDCALL sites, of which 42 TDVMCALLs, all with the mask 0xFFCC or 0xFFC4 (TdxDxe's inline
    CPUID without RBX), none rejected or refused: these counts are regression pins taken from the
    scanner's first run on that image (docs/scan.md), not values derived independently; a change in
    them means the scanner changed, to be explained.  One value is derived by hand, apart from the
    scanner's data flow: DxeCore's copies of EDK2's TdVmCall stubs (``MdePkg/Library/BaseLib/X64/
    TdVmcall.nasm``, TdVmCall and TdVmCallCpuid: ``mov eax, 0`` for TDG.VP.VMCALL, ``xor rcx, rcx``,
    then ``mov ecx`` with the stub's register mask, then the zeroing of the other registers and
    ``tdcall``) are found by a byte search in the decompressed module; their ``mov ecx, imm32`` (B9 id) bytes hold 0xFFCC (RDX RBX RSI
    RDI R8-R15: bits 2, 3, 6..15; RBP, bit 5, not exposed), and that is the mask scan reports there."""
    if not REAL_FIRMWARE:
        pytest.skip("TDVMCALL_REAL_FIRMWARE is not set (.ci/run sets it when the ovmf-inteltdx download works)")
    path = Path(REAL_FIRMWARE)
    if not path.is_file():
        pytest.skip(f"TDVMCALL_REAL_FIRMWARE={REAL_FIRMWARE} is not a file (the download failed)")
    code, doc = scan_json(path)
    s = doc["inputs"][0]["summary"]
    assert (s["tdcall_sites"], s["tdvmcall_sites"]) == (73, 42)
    assert {x["mask"] for x in doc["sites"] if x["mask"]} == {"0xffcc", "0xffc4"}
    assert s["module_rejects"] == 0 and s["hardened_refuses"] == 0
    assert code == 0
    # by hand: the stub's bytes in DxeCore (decompressed by the container layer only)
    from tdvmcall.scan.containers import open_input

    [(_, found)] = list(open_input(path))
    [text] = [c for c in found.codes if c.chain[-3:] == ["DxeCore", "pe32", ".text"]]
    head = b"\xb8\x00\x00\x00\x00" + b"\x48\x31\xc9" + b"\xb9"  # mov eax, 0; xor rcx, rcx; mov ecx, imm32
    starts = [i for i in range(len(text.data)) if text.data.startswith(head, i)]
    assert len(starts) == 2  # TdVmCall and TdVmCallCpuid, both in TdVmcall.nasm
    for at in starts:
        (mask,) = struct.unpack_from("<I", text.data, at + len(head))
        assert mask == 0xFFCC == sum(1 << b for b in (2, 3, *range(6, 16)))
        site = text.data.find(TDCALL_BYTES, at) + text.va  # the stub's tdcall, after the zeroing
        assert site - (at + text.va) < 48
        [reported] = {x["mask"] for x in doc["sites"] if "DxeCore" in x["container"] and x["offset"] == hex(site)}
        assert reported == hex(mask)


# --- more containers ----------------------------------------------------------------------------------
def fake_bzimage(payload: bytes, decompressor: bytes = b"") -> bytes:
    """A bzImage as the boot protocol lays it out (Documentation/arch/x86/boot.rst): setup_sects at
    0x1F1, "HdrS" at 0x202, version 2.15 at 0x206, payload_offset/length at 0x248/0x24C relative to
    the protected-mode code at (setup_sects + 1) * 512, which starts with the decompressor's code
    (``decompressor``, then zeros up to 0x200) and holds the payload."""
    setup_sects = 3
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x020F)
    pm = bytearray(max(0x200, len(decompressor)))  # the decompressor's code, then the payload
    pm[: len(decompressor)] = decompressor
    struct.pack_into("<II", head, 0x248, len(pm), len(payload))
    return bytes(head) + bytes(pm) + payload + struct.pack("<I", 0)


def flat_code(asm: str, d: Path) -> bytes:
    """Flat x86-64 code assembled from Intel-syntax assembly (GNU as, objcopy -O binary)."""
    (d / "flat.s").write_text(".intel_syntax noprefix\n.text\n" + asm)
    subprocess.run(["as", "--64", "-o", str(d / "flat.o"), str(d / "flat.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(d / "flat.o"), str(d / "flat.bin")], check=True)
    return (d / "flat.bin").read_bytes()


#: the decompressor's early console in the style of arch/x86/boot/compressed/tdx.c's tdx_io_out():
#: mask 0xFC00 (R10-R15), R11 = 30 (Instruction.IO), R12 = 1 byte, R13 = 1 (out), R14 = port 0x3F8
DECOMPRESSOR_IO = (
    "io_out:\n    xor eax, eax\n    mov ecx, 0xFC00\n    xor r10d, r10d\n    mov r11d, 30\n    mov r12d, 1\n"
    "    mov r13d, 1\n    mov r14d, 0x3F8\n    .byte 0x66, 0x0f, 0x01, 0xcc\n    ret\n"
)


def test_bzimage_decompressor_and_payload_are_both_scanned(built, tmp_path):
    """The whole boot chain: the decompressor's code before (and around) the payload is scanned as
    well as the kernel inside, each site labelled with where it lives."""
    import gzip

    if not shutil.which("objcopy"):
        pytest.skip("objcopy (binutils) is needed to build the flat decompressor code")
    image = fake_bzimage(gzip.compress(built["sites.elf"].read_bytes()), flat_code(DECOMPRESSOR_IO, tmp_path))
    (tmp_path / "vmlinuz").write_bytes(image)
    _, doc = scan_json(tmp_path / "vmlinuz")
    where = {tuple(s["container"][1:]) for s in doc["sites"]}
    assert where == {("decompressor", "code"), ("vmlinux (gzip)", ".text")}
    [io] = [s for s in doc["sites"] if s["container"][1] == "decompressor"]
    assert (io["mask"], io["call"], io["inputs"]) == ("0xfc00", "Instruction.IO", {"r13": "0x1"})
    assert io["verdict"] == {"legacy": "ok", "hardened": "ok"}
    assert doc["inputs"][0]["summary"]["tdcall_sites"] == 13
    text = scan_text(tmp_path / "vmlinuz", width=200).stdout
    assert "decompressor" in text and "vmlinux (gzip)" in text


def test_unified_kernel_image_scans_the_stub_and_the_kernel_inside(built, tmp_path):
    """A unified kernel image (systemd's stub with .linux, .cmdline, .osrel, .initrd sections added
    by objcopy, as ukify lays it out), built here from the project's own objects: the stub is
    sites.efi, the kernel a bzImage of sites.elf with a decompressor.  Every code section is
    scanned: the stub's .text, the bzImage's decompressor and its vmlinux; the initramfs is said."""
    import gzip

    if not shutil.which("objcopy"):
        pytest.skip("objcopy (binutils) is needed to add the UKI's sections")
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(fake_bzimage(gzip.compress(built["sites.elf"].read_bytes()), flat_code(DECOMPRESSOR_IO, tmp_path)))
    (tmp_path / "cmdline").write_text("console=ttyS0")
    (tmp_path / "osrel").write_text("NAME=test\n")
    (tmp_path / "initrd").write_bytes(b"070701" + bytes(200))
    args = []
    for k, (name, path) in enumerate(
        ((".osrel", "osrel"), (".cmdline", "cmdline"), (".initrd", "initrd"), (".linux", "vmlinuz"))
    ):
        args += [
            "--add-section",
            f"{name}={tmp_path / path}",
            "--change-section-vma",
            f"{name}={0x140100000 + k * 0x100000:#x}",
        ]
    uki = tmp_path / "uki.efi"
    subprocess.run(["objcopy", *args, str(built["sites.efi"]), str(uki)], check=True)
    code, doc = scan_json(uki)
    inner = {tuple(s["container"][1:]) for s in doc["sites"]}
    assert inner == {(".text",), (".linux", "decompressor", "code"), (".linux", "vmlinux (gzip)", ".text")}
    assert doc["inputs"][0]["summary"]["tdcall_sites"] == 12 + 1 + 12
    assert any(".initrd" in line and "not scanned" in line for line in doc["inputs"][0]["skipped"])
    assert code == 1  # sites.s holds failing calls, in the stub and in the kernel alike


REAL_KERNEL = os.environ.get("TDVMCALL_REAL_KERNEL")
UKI_STUB = os.environ.get("TDVMCALL_UKI_STUB")


def test_real_kernel_and_a_uki_around_it(tmp_path):
    """Debian's 6.12 bzImage (``apt-get download linux-image-6.12…-amd64-unsigned``) and a UKI built
    around it with systemd-boot-efi's linuxx64.efi.stub: the decompressor's TDCALLs are found
    (arch/x86/boot/compressed: __tdx_hypercall for the early console's IO, __tdcall for
    TDG.MEM.PAGE.ACCEPT), and the UKI gives the same sites as the bzImage.  .ci/run downloads both
    packages through the configured mirror (about 106 MB, cached) and sets TDVMCALL_REAL_KERNEL and
    TDVMCALL_UKI_STUB; elsewhere set them by hand."""
    if not REAL_KERNEL or not Path(REAL_KERNEL).is_file():
        pytest.skip(
            "TDVMCALL_REAL_KERNEL is not set to a bzImage (Debian's 6.12 vmlinuz: .ci/run fetches it; it could not here)"
        )
    _, doc = scan_json(REAL_KERNEL)
    dec = [s for s in doc["sites"] if s["container"][1] == "decompressor"]
    assert {s["tdcall_leaf"] for s in dec} >= {"TDG.VP.VMCALL", "TDG.MEM.PAGE.ACCEPT"}
    assert {s["call"] for s in dec if s["tdcall_leaf"] == "TDG.VP.VMCALL"} == {"Instruction.IO"}
    if not UKI_STUB or not shutil.which("objcopy"):
        pytest.skip("TDVMCALL_UKI_STUB (systemd-boot-efi's linuxx64.efi.stub) or objcopy not available")
    uki = tmp_path / "uki.efi"
    subprocess.run(
        [
            "objcopy",
            "--add-section",
            f".linux={REAL_KERNEL}",
            "--change-section-vma",
            ".linux=0x2000000",
            UKI_STUB,
            uki,
        ],
        check=True,
    )
    _, udoc = scan_json(uki)
    strip = {(tuple(s["container"][2:]), s["offset"], s["call"]) for s in udoc["sites"]}
    assert strip == {(tuple(s["container"][1:]), s["offset"], s["call"]) for s in doc["sites"]}


def test_bzimage_and_lz4(built, tmp_path):
    import gzip

    import lz4.block
    import lz4.frame

    elf = built["sites.elf"].read_bytes()
    (tmp_path / "vmlinuz").write_bytes(fake_bzimage(gzip.compress(elf)))
    (tmp_path / "x.lz4").write_bytes(lz4.frame.compress(elf))
    # the kernel's legacy lz4: magic 02 21 4C 18, then (u32 size, block) chunks of at most 8 MiB
    block = lz4.block.compress(elf, store_size=False)
    (tmp_path / "y.lz4").write_bytes(b"\x02\x21\x4c\x18" + struct.pack("<I", len(block)) + block)
    _, doc = scan_json(tmp_path)
    assert [i["summary"]["tdcall_sites"] for i in doc["inputs"]] == [12, 12, 12]
    chains = {s["container"][0].rsplit("/", 1)[-1]: s["container"][1:] for s in doc["sites"]}
    assert chains["vmlinuz"] == ["vmlinux (gzip)", ".text"]
    assert chains["x.lz4"] == chains["y.lz4"] == ["lz4", ".text"]


def test_efi_and_tiano_compressed_sections_and_an_unknown_wrapper(built, tmp_path):
    """EFI compression (compression section type 1) and EDK2's Tiano GUID-defined section are
    decompressed by uefi-firmware's decoder; a processing-required GUID-defined section with no
    decoder (Brotli) is skipped with a line, not an error; corrupt Tiano data is an error."""
    efi = pytest.importorskip("uefi_firmware.efi_compressor", reason="the optional tiano extra is not installed")
    pe = built["sites.efi"].read_bytes()
    inner = section(0x10, pe)
    compressed = section(0x01, struct.pack("<IB", len(inner), 1) + efi.EfiCompress(inner, len(inner)))
    tiano_guid = uuid.UUID("A31280AD-481E-41B6-95E8-127F4C984779")
    tiano = section(0x02, tiano_guid.bytes_le + struct.pack("<HH", 24, 1) + efi.TianoCompress(inner, len(inner)))
    brotli = section(
        0x02, uuid.UUID("3D532050-5CDA-4FD0-879E-0F7F630D5AFB").bytes_le + struct.pack("<HH", 24, 1) + b"x"
    )
    (tmp_path / "a.fv").write_bytes(volume(ffs_file(compressed)))
    (tmp_path / "b.fv").write_bytes(volume(ffs_file(tiano + brotli)))
    bad = bytearray(efi.TianoCompress(inner, len(inner)))
    bad[20:60] = b"\xa5" * 40
    (tmp_path / "c.fv").write_bytes(
        volume(ffs_file(section(0x02, tiano_guid.bytes_le + struct.pack("<HH", 24, 1) + bytes(bad))))
    )
    code, doc = scan_json(tmp_path)
    a, b, c = doc["inputs"]
    assert a["summary"]["tdcall_sites"] == 12 and a["containers"]["efi-compressed"] == 1
    assert b["summary"]["tdcall_sites"] == 12 and b["containers"]["tiano"] == 1
    assert b["errors"] == [] and len(b["skipped"]) == 1 and "3D532050" in b["skipped"][0]
    assert len(c["errors"]) == 1 and "corrupt EFI/Tiano" in c["errors"][0]
    assert code == 2


# --- invariants ---------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(mask=st.integers(0, 2**32 - 1), leaf=st.integers(0, 2**32 - 1), wide=st.booleans())
def test_raw_code_immediates_are_recovered_exactly(tmp_path_factory, mask, leaf, wide):
    """Raw flat code `endbr64; mov ecx/rcx, imm32; xor eax, eax; xor r10d, r10d; mov r11d, imm32;
    tdcall`: the recovered mask is the immediate, zero-extended for `mov ecx` (B9 id) and
    sign-extended for `mov rcx` (48 C7 C1 id), whatever the value (Intel SDM, MOV)."""
    imm = struct.pack("<I", mask)
    load = b"\xf3\x0f\x1e\xfa" + (b"\x48\xc7\xc1" if wide else b"\xb9") + imm
    code = load + b"\x31\xc0" + b"\x45\x31\xd2" + b"\x41\xbb" + struct.pack("<I", leaf) + b"\x66\x0f\x01\xcc\xc3"
    path = tmp_path_factory.mktemp("raw") / "blob.bin"
    path.write_bytes(code)
    from tdvmcall.judge import Host
    from tdvmcall.scan.analyze import analyze
    from tdvmcall.scan.containers import open_input

    [(name, found)] = list(open_input(path))
    [site] = analyze(name, found, Host(), {}).sites
    want = (mask | (0xFFFFFFFF00000000 if mask >> 31 else 0)) if wide else mask
    assert site.mask == want and site.regs["r11"].value == leaf and site.regs["r10"].value == 0
    assert site.regs["rcx"].how == "immediate"


def test_raw_blobs_report_only_sites_from_a_function_start_they_can_show(tmp_path):
    """In a raw blob nothing says where code is, and random bytes decode as x86: a TDCALL is reported
    only when decoded from an endbr64 (F3 0F 1E FA), a ``push rbp; mov rbp, rsp`` (55 48 89 E5), or
    the target of two calls; otherwise it is counted as not code, never dropped silently."""
    import random

    stub = (
        b"\xb9\x00\x1c\x00\x00" + b"\x31\xc0" + b"\x45\x31\xd2" + b"\x41\xbb\x1f\x00\x00\x00" + TDCALL_BYTES + b"\xc3"
    )
    rng = random.Random(11)
    noise = bytes(rng.randrange(256) for _ in range(1 << 16)).replace(TDCALL_BYTES, b"\x90" * 4)
    pad = b"\xcc" * 16  # int3 padding: straight-line code does not run across it
    blob = bytearray(noise + pad + stub)  # 1: after random bytes, no start shown
    endbr = len(blob) + len(pad)
    blob += pad + b"\xf3\x0f\x1e\xfa" + stub  # 2: endbr64
    blob += pad + b"\x55\x48\x89\xe5" + stub[:-1] + b"\x5d\xc3"  # 3: push rbp; mov rbp, rsp ... pop rbp
    called = len(blob) + len(pad)
    blob += pad + stub  # 4: called from two places below
    for _ in range(2):
        at = len(blob) + len(pad)
        blob += pad + b"\xe8" + struct.pack("<i", called - (at + 5)) + b"\xc3"
    blob += pad + noise[:4096] + stub  # 5: inside random bytes again
    (tmp_path / "blob.bin").write_bytes(bytes(blob))
    code, doc = scan_json(tmp_path / "blob.bin")
    summary = doc["inputs"][0]["summary"]
    assert (summary["tdcall_sites"], summary["not_code"]) == (3, 2)
    starts = sorted({int(s["symbol"].split("+")[0].removeprefix("sub_"), 16) for s in doc["sites"]})
    assert starts == [endbr, endbr + len(stub) + 4 + len(pad), called]
    assert {s["mask"] for s in doc["sites"]} == {"0x1c00"} and code == 0


def test_check_and_scan_draw_each_verdict_alike():
    """One definition of the verdict colours (``console.VERDICT_STYLE``): check's and scan's reports
    take theirs from it, so a verdict cannot look one way in one report and another way in the other."""
    from tdvmcall import judge
    from tdvmcall.check import report as check_report
    from tdvmcall.console import VERDICT_STYLE
    from tdvmcall.scan import report as scan_report

    for v in judge.VERDICTS:
        assert scan_report.STYLE[v] == check_report.STYLE[v] == VERDICT_STYLE[v], v
    assert set(VERDICT_STYLE) == set(judge.VERDICTS)


def test_judge_agrees_with_check_on_the_shipped_catalog():
    """Scan's way of choosing a call's cases (from the input values it pinned, ``judge.cases_for``)
    and check's (from the catalog row's words, ``check.catalog.cases_for``) give the same verdicts
    for every call of every row of the shipped catalog: a site scan writes with --to-catalog is
    judged by check as scan judged it."""
    from tdvmcall.check import catalog as C
    from tdvmcall.judge import Host, judge

    sites, _errors = C.load_catalog()
    for host in (Host(), Host("1.0", False)):
        results = C.check_sites(sites, C.Host(host.module, host.no_rbp_mod))
        for r in results:
            leaf = r.call.leaf
            if leaf is None:
                continue
            j = judge(r.site.mask, leaf, host, dict(r.call.inputs) or None)
            assert j.verdict == r.verdict, (r.site.label, leaf.name)


@pytest.mark.parametrize(
    ("leaf", "regs", "written", "pinned", "cases"),
    [
        ("Instruction.IO", {"r13": 0}, "IO in", (), ("in",)),
        ("Instruction.IO", {"r13": 1}, "IO out", (), ("out",)),
        ("#VE.RequestMMIO", {"r13": 0xFFFFFFFF00000001}, "MMIO write", (), ("write",)),  # low 32 bits
        ("Instruction.RDMSR", {"r12": 0x1B}, "RDMSR 0x1b", (("r12", 0x1B),), ()),
        ("Instruction.WRMSR", {"r12": 0x80B}, "WRMSR 0x80b", (("r12", 0x80B),), ()),
        ("Instruction.CPUID", {"r12": 0xB}, "CPUID leaf 0xb", (("r12", 0xB),), ()),
        ("ReportFatalError", {"r12": 0x10000}, "ReportFatalError code 0x10000", (("r12", 0x10000),), ()),
        ("ReportFatalError", {"r12": 1 << 63}, "ReportFatalError", (), ()),  # with a GPA: not a code
        ("Instruction.HLT", {}, "HLT", (), ()),
        ("Instruction.WBINVD", {}, "WBINVD", (), ()),
        ("MapGPA", {}, "MapGPA", (), ()),
    ],
)
def test_catalog_rows_scan_writes_are_read_back_by_check(leaf, regs, written, pinned, cases):
    """One vocabulary (judge.CALL_WORDS and the qualifier tables): the call scan writes for a site
    is the call, pins and direction check reads back (docs/check.md's grammar)."""
    from tdvmcall.check.catalog import parse_calls
    from tdvmcall.kvm import leaves as L
    from tdvmcall.scan.analyze import Site
    from tdvmcall.scan.flow import Value
    from tdvmcall.scan.report import catalog_call

    values = {"rax": 0, "rcx": 0xFFCC, "r10": 0, **regs}
    site = Site("in", ["in"], 0x10, "f", 0, {r: Value(values.get(r), "immediate") for r in GPRS}, leaf=L.BY_NAME[leaf])
    assert catalog_call(site) == written
    (ref,), _ = parse_calls(written)
    assert (ref.name, ref.inputs, ref.cases) == (leaf, pinned, cases)


GPRS = ("rax", "rcx", "rdx", "rbx", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


# --- what was not judged is not a pass -------------------------------------------------------------------
#: one TDVMCALL whose mask is loaded from memory nothing in the function stored (RDMSR: R11 = 0x1F)
UNJUDGED = ".type from_mem, @function\nfrom_mem:\n    mov rcx, [rdi]\n" + CALL


def test_a_call_not_judged_is_not_a_pass(tmp_path):
    """A TDVMCALL whose mask was not recovered was not judged: exit 1 as for a failure (the answer,
    JSON's passes and the HTML page say so, and where and why), unless --allow-unresolved."""
    elf = elf_from(UNJUDGED, tmp_path)
    res = scan_text(elf, width=400)
    assert res.exit_code == 1, res.stdout
    first = res.stdout.splitlines()[1]
    assert first.startswith("FAIL under --policy hardened: 1 of 1 call not judged") and "PASS" not in first
    where = res.stdout.splitlines()[2]
    assert where.startswith("Not judged: 1 call") and "from_mem+0x" in where and "(rcx)" in where
    assert "--allow-unresolved" in where
    code, doc = scan_json(elf)
    assert code == 1 and doc["passes"] is False and doc["not_judged"] == 1 and doc["exit_status"] == 1
    assert doc["schema"] == 2  # passes changed meaning: a call not judged is not a pass
    assert doc["sites"][0]["verdict"] == {"legacy": "unresolved", "hardened": "unresolved"}
    page = tmp_path / "p.html"
    assert runner.invoke(app, ["scan", str(elf), "--html", str(page)]).exit_code == 1
    html = page.read_text()
    assert "FAIL under --policy hardened: 1 of 1 call not judged" in html and "Not judged: 1 call" in html
    # allowed: exit 0, said as such
    res = scan_text(elf, "--allow-unresolved")
    assert res.exit_code == 0
    assert res.stdout.splitlines()[1].startswith("PASS under --policy hardened: 1 of 1 call not judged")
    assert "(allowed by --allow-unresolved)" in res.stdout.splitlines()[1]
    res = runner.invoke(app, ["scan", str(elf), "--json", "--allow-unresolved"])
    doc = json.loads(res.stdout)
    assert res.exit_code == 0 and doc["passes"] is True and doc["allow_unresolved"] is True
    res = runner.invoke(app, ["scan", str(elf), "--to-catalog", str(tmp_path / "c.csv")])
    assert "1 call left out: 1 with an unresolved mask or call" in " ".join(res.stdout.split())
    # a failure stays a failure with the option: RDMSR exposing R10 and R11 only is refused by
    # hardened KVM (it reads R12, the MSR index: docs/abi.md §4), beside the call not judged
    short = ".type short, @function\nshort:\n    mov ecx, 0x0C00\n" + CALL
    both = elf_from(UNJUDGED + short, tmp_path)
    res = scan_text(both, "--allow-unresolved", width=400)
    assert res.exit_code == 1, res.stdout
    assert res.stdout.splitlines()[1].startswith("FAIL under --policy hardened: 1 of 2 calls do not pass")


@pytest.mark.parametrize(
    "content,said",
    [
        (b"", "empty file (0 bytes): no code to scan"),
        (b"\xff", "no code found in 1 byte: "),
        (b"\0" * 4096, "no code found in 4096 bytes: "),
        (b"not firmware at all\n", "no code found in 20 bytes: "),
    ],
)
def test_an_input_with_no_code_is_not_a_pass(tmp_path, content, said):
    """An empty or 1-byte .fd (a failed download), or bytes no container holds: said, exit 2."""
    fd = tmp_path / "OVMF.fd"
    fd.write_bytes(content)
    res = scan_text(fd)
    assert res.exit_code == 2 and "PASS" not in res.stdout
    [line] = res.stderr.splitlines()
    assert line.startswith(f"tdvmcall: error: {fd}: {said}")
    code, doc = scan_json(fd)
    assert code == 2 and doc["passes"] is False and doc["inputs"][0]["errors"] == [line.split("error: ", 1)[1]]


def test_a_directory_with_no_code_is_not_a_pass_but_a_text_file_beside_code_is_fine(built, tmp_path):
    (tmp_path / "README").write_text("hello\n")
    res = runner.invoke(app, ["scan", str(tmp_path)])
    assert res.exit_code == 2 and "no code found in any of its 1 files" in res.stderr
    shutil.copy(built["sites.elf"], tmp_path / "sites.elf")
    code, doc = scan_json(tmp_path)
    assert code == 1 and [i["errors"] for i in doc["inputs"]] == [[], []]
    assert "no code found" in doc["inputs"][0]["skipped"][0]
    text = scan_text(tmp_path, width=200).stdout  # one line for the codeless files, not a block each
    assert "1 file of the directories scanned holds no code scan recognises, not scanned: README" in text
    assert f"\n{tmp_path / 'README'}\n" not in text


def test_one_broken_input_does_not_say_the_rest_pass(built, tmp_path):
    good = elf_from(".type ok_call, @function\nok_call:\n    mov ecx, 0x1C00\n" + CALL, tmp_path)
    assert scan_text(good).exit_code == 0
    res = scan_text(built["truncated.fv"], good)
    assert res.exit_code == 2
    first = res.stdout.splitlines()[1]
    assert first.startswith("ERROR: 1 of 2 inputs broken") and "the rest: PASS" not in first and "PASS" not in first
    assert "in the 1 other: the 1 call pass" in first
    res = scan_text(built["truncated.fv"])
    assert "nothing judged" in res.stdout.splitlines()[1] and "PASS" not in res.stdout


def test_a_symlink_loop_is_named_as_such(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    res = runner.invoke(app, ["scan", str(loop)])
    assert res.exit_code == 2 and "symbolic link loop" in res.stderr and "no such file" not in res.stderr
    d = tmp_path / "d"
    d.mkdir()
    (d / "a").symlink_to(d / "b")
    (d / "b").symlink_to(d / "a")
    res = runner.invoke(app, ["scan", str(d)])
    assert res.exit_code == 2 and res.stderr.count("symbolic link loop") == 2


def test_a_file_reached_twice_through_links_is_scanned_once(built, tmp_path):
    shutil.copy(built["sites.elf"], tmp_path / "a.elf")
    (tmp_path / "b.elf").symlink_to(tmp_path / "a.elf")
    os.link(tmp_path / "a.elf", tmp_path / "c.elf")
    code, doc = scan_json(tmp_path, tmp_path / "a.elf")
    assert code == 1
    assert [Path(i["path"]).name for i in doc["inputs"]] == ["a.elf"]
    assert doc["summary"]["tdcall_sites"] == 12 and len(doc["inputs"][0]["skipped"]) == 3
    assert sorted(line.split(": ", 1)[1] for line in doc["inputs"][0]["skipped"]) == [
        "named again; scanned once",
        f"the same file as {tmp_path / 'a.elf'} (a link); scanned once",
        f"the same file as {tmp_path / 'a.elf'} (a link); scanned once",
    ]


def test_the_html_summary_is_in_words(built, tmp_path):
    """Not a dump of counter names; "copies"; an empty scan does not say every call was judged."""
    pe = built["sites.efi"].read_bytes()
    files = b""
    for k, name in enumerate(("ADxe", "BDxe", "CDxe")):
        ui = section(0x15, f"{name}\0".encode("utf-16-le"))
        f = ffs_file(guided_lzma(section(0x10, pe) + ui), name=uuid.UUID(int=FILE_GUID.int + k))
        files += f + b"\xff" * (-len(f) % 8)
    (tmp_path / "three.fv").write_bytes(volume(files))
    page = tmp_path / "p.html"
    runner.invoke(app, ["scan", str(tmp_path / "three.fv"), "--html", str(page)])
    html = page.read_text()
    summary = html.split('id="summary">')[1].split("</ul>")[0]
    assert "tdcall sites" not in summary and "resolved calls" not in summary and "_" not in summary
    assert "36 TDCALL sites in 1 input" in summary and "Under the hardened policy:" in summary
    assert "other copies" in html and "copys" not in html
    nothing = elf_from("", tmp_path)  # code, but no TDCALL
    assert runner.invoke(app, ["scan", str(nothing), "--html", str(page)]).exit_code == 0
    html = page.read_text()
    assert "every call was judged" not in html and "No TDVMCALL found: nothing to judge." in html


def test_an_output_over_an_input_is_refused(built, tmp_path):
    """``scan FW.fd --to-catalog FW.fd`` (or --html, or through a link, or a file of a scanned
    directory) would replace the firmware: one line, exit 2, the input untouched."""
    fd = tmp_path / "FW.fd"
    shutil.copy(built["flash.fd"], fd)
    (tmp_path / "link.csv").symlink_to(fd)
    before = fd.read_bytes()
    for option, target, scanned in (
        ("--to-catalog", fd, fd),
        ("--html", fd, fd),
        ("--to-catalog", tmp_path / "link.csv", fd),
        ("--html", fd, tmp_path),
    ):
        res = runner.invoke(app, ["scan", str(scanned), option, str(target)])
        assert res.exit_code == 2 and res.stderr.count("\n") == 1, (option, target, res.stderr)
        assert res.stderr.startswith(f"tdvmcall: error: {option}: ") and "input" in res.stderr
        assert fd.read_bytes() == before
    res = runner.invoke(app, ["scan", str(fd), "--html", str(tmp_path / "x"), "--to-catalog", str(tmp_path / "x")])
    assert res.exit_code == 2 and "both name" in res.stderr


def test_vmware_hypercall_is_named_and_not_judged_as_kvm(tmp_path):
    """Linux's vmware_tdx_hypercall() (arch/x86/kernel/cpu/vmware.c; arch/x86/include/asm/vmware.h):
    R10 = VMWARE_TDX_VENDOR_LEAF 0x1AF7E4909, R11 = VMWARE_TDX_HCALL_FUNC 1, R12 = the magic
    0x564D5868, R13 = the command, through __tdx_hypercall's mask 0xFFCC.  It is VMware's, made
    only on a VMware host; KVM would answer it -KVM_ENOSYS (an unknown hypercall number): named
    VMware-hypercall and judged not-kvm (the module's check only), not a KVM hypercall that is ok."""
    body = (
        ".type vmw, @function\nvmw:\n    xor eax, eax\n    mov ecx, 0xFFCC\n    movabs r10, 0x1AF7E4909\n"
        "    mov r11d, 1\n    mov r12d, 0x564D5868\n    mov r13d, 10\n    .byte 0x66, 0x0f, 0x01, 0xcc\n    ret\n"
    )
    code, doc = scan_json(elf_from(body, tmp_path))
    [site] = doc["sites"]
    assert code == 0 and site["r10"] == "0x1af7e4909"
    assert site["call"] == "VMware-hypercall" and site["verdict"] == {"legacy": "not-kvm", "hardened": "not-kvm"}
    assert any("VMware" in d and "-KVM_ENOSYS" in d for d in site["details"])
    # the same mask with RBP exposed: the module's check still applies
    code, doc = scan_json(elf_from(body.replace("0xFFCC", "0xFFEC"), tmp_path))
    assert code == 1 and doc["sites"][0]["verdict"]["hardened"] == "module-rejects"
    page = tmp_path / "p.html"
    runner.invoke(app, ["scan", str(tmp_path / "t.elf"), "--html", str(page)])
    assert "not KVM&#x27;s" in page.read_text() or "not KVM's" in page.read_text()
    # the catalog grammar has no word for it: left out, and said so (not as "unresolved")
    res = runner.invoke(app, ["scan", str(tmp_path / "t.elf"), "--to-catalog", str(tmp_path / "c.csv")])
    assert "1 call left out: 1 the catalog has no word for (VMware-hypercall)" in " ".join(res.stdout.split())


# --- names: relocatable objects and labels without a type --------------------------------------------
def test_relocatable_object_sites_are_named_by_their_symbols(built):
    """In a ``.o`` (ET_REL) symbol values are offsets in their section (gABI): every site is named by
    its function as in the linked ELF (not ``sub_0``), with the same values where the function
    sets them itself.  Its calls are not relocated yet (``call wrapper`` is E8 00000000 and a
    relocation): never read as a call to the next instruction, so a value from a caller stays
    unresolved here (the linked ELF follows it)."""
    _, linked = scan_json(built["sites.elf"])
    code, obj = scan_json(built["sites.o"])
    assert code == 1
    want = {s["symbol"]: s for s in linked["sites"]}
    got = {s["symbol"]: s for s in obj["sites"]}
    assert set(got) == set(want) and not any(name.startswith("sub_") for name in got)
    # the functions that set their own values, as sites.s writes them (mask in RCX, call by R11)
    by_hand = {
        "imm_mask+0x16": ("0x1c00", "Instruction.RDMSR"),  # mov ecx, 0x1C00; mov r11d, 0x1F
        "copy_mask+0x14": ("0xffec", "Instruction.HLT"),  # mov r8d, 0xFFEC; mov rcx, r8; r11d 0x0C
        "mov32+0x1a": ("0xfc00", "Instruction.RDMSR"),  # mov ecx, 0xFC00 clears bits 63:32
        "mov8+0x12": ("0xffcc", "Instruction.HLT"),  # mov ecx, 0xFF00; mov cl, 0xCC
        "stack_mask+0x1f": ("0xfc00", "#VE.RequestMMIO"),  # 0xFC00 through [rsp-16]; r11d 0x30
    }
    for name, (mask, call) in by_hand.items():
        assert (got[name]["mask"], got[name]["call"]) == (mask, call), name
        assert (want[name]["mask"], want[name]["call"]) == (mask, call), name
    # wrapper takes R11 from its callers: never through an unrelocated call read as a call to the next
    # instruction ("caller at" is the fast path's); the deep engine (scan/deep.py) applies the
    # relocations and runs the callers: the same calls as in the linked ELF
    assert "caller at" not in json.dumps(obj["sites"])

    def calls(doc: dict) -> set:
        return {(s["via"], s["call"], s["r11"]) for s in doc["sites"] if s["symbol"] == "wrapper+0xd"}

    assert calls(obj) == calls(linked) and len(calls(obj)) == 2


def test_labels_without_a_type_name_their_code(tmp_path):
    """An assembly label with no ``.type`` (STT_NOTYPE) after a sized function starts its own code
    (not ``before+0x..``); a label inside a sized function stays part of it."""
    body = (
        ".type before, @function\nbefore:\n    nop\n    ret\n.size before, .-before\n"
        ".globl untyped\nuntyped:\n    mov ecx, 0x1C00\n" + CALL + ".type sized, @function\nsized:\n"
        "    mov ecx, 0x1C00\ninner:\n" + CALL + ".size sized, .-sized\n"
    )
    _, doc = scan_json(elf_from(body, tmp_path))
    names = sorted(s["symbol"].split("+")[0] for s in doc["sites"])
    assert names == ["sized", "untyped"]
    assert {s["mask"] for s in doc["sites"]} == {"0x1c00"}


# a register either recovered (an immediate) or not; the values drawn include the leaf table's calls
_maybe = st.one_of(st.none(), st.sampled_from([0, 1, 0x1C00, 0xFC00, 0xFFCC, 0xFFEC, 0x1E, 0x1F, 0x0C, 0x1AF7E4909]))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([0, 0, 1, None]), _maybe, _maybe, _maybe), min_size=1, max_size=6),
    st.sampled_from(["hardened", "legacy"]),
    st.booleans(),
)
def test_never_a_pass_for_what_was_not_judged(regs, policy, allow):
    """Whatever the sites, the exit status is 0 only when every call (a TDVMCALL, or a TDCALL whose
    leaf was not recovered) was judged and passes, or what was not judged is allowed; a call that
    fails is exit 1 whatever --allow-unresolved says."""
    from tdvmcall.judge import Host
    from tdvmcall.scan.analyze import Image, Site, judge_site
    from tdvmcall.scan.flow import Value
    from tdvmcall.scan.report import outcome

    sites = []
    for k, (rax, rcx, r10, r11) in enumerate(regs):
        values = {"rax": rax, "rcx": rcx, "r10": r10, "r11": r11, "r12": None, "r13": None}
        vals = {r: Value(v, "immediate" if v is not None else "not known") for r, v in values.items()}
        site = Site("x", ["x", ".text"], 0x10 * k, "f", 0, vals)
        judge_site(site, Host(), {})
        sites.append(site)
    o = outcome([Image("x", sites, [], [], {}, 0, 100)], policy, allow)
    verdicts = [s.verdict(policy) for s in sites if s.rax is None or s.rax == 0]
    failing = [v for v in verdicts if v not in ("ok", "not-kvm", "unresolved")]
    unjudged = [v for v in verdicts if v == "unresolved"]
    assert o.exit_status == (1 if failing or (unjudged and not allow) else 0)
    assert len(o.unresolved) == len(unjudged)
    for s in sites:  # a TDVMCALL whose mask or call was not recovered is never judged a pass
        if s.rax is None or (s.rax == 0 and (s.mask is None or (s.leaf is None and s.foreign is None))):
            assert s.verdict(policy) in ("unresolved", "module-rejects")


def test_directory_links_are_followed_once(built, tmp_path):
    """A directory scan follows a link to a directory (nothing under it is dropped unsaid), walks
    each directory once (a link back to an ancestor ends there) and scans each file once."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(built["sites.elf"], outside / "b.elf")
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    shutil.copy(built["sites.elf"], top / "sub" / "a.elf")
    (top / "to-sub").symlink_to(top / "sub")  # the same directory again
    (top / "to-outside").symlink_to(outside)  # files only reachable through the link
    (top / "sub" / "up").symlink_to(top)  # a loop back to the top
    code, doc = scan_json(top)
    assert code == 1
    assert sorted(Path(i["path"]).name for i in doc["inputs"]) == ["a.elf", "b.elf"]
    assert doc["summary"]["tdcall_sites"] == 24
