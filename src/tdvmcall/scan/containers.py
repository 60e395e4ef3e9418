"""Containers: from a path to the regions of x86 code inside it, each named by its chain.

An input is opened by its first bytes and unpacked recursively: directories, gzip/xz/zstd/lz4
streams, Linux ``bzImage`` (the compressed kernel after the setup code), ELF (executable sections,
function symbols), PE/COFF and TE images (executable sections), UEFI firmware images and volumes
(volumes, FFS files named by their UI section or GUID, sections, EDK2's LZMA GUID-defined section,
nested volumes), and anything else as raw flat x86-64 code.

Formats, re-expressed from their specifications:

- ELF: the System V gABI (``Elf64_Ehdr``, ``Elf64_Shdr``, ``Elf64_Sym``); code is every section with
  ``SHF_EXECINSTR``; functions are ``STT_FUNC`` symbols.
- PE/COFF: Microsoft's PE format (``IMAGE_NT_HEADERS``, section headers, ``IMAGE_SCN_MEM_EXECUTE``);
  TE: the PI specification vol. 1 "TE image" (``EFI_TE_IMAGE_HEADER``, 40 bytes; a section's file
  offset is its raw pointer minus ``StrippedSize`` plus 40).
- UEFI firmware volumes: the PI specification vol. 3 (``EFI_FIRMWARE_VOLUME_HEADER`` with signature
  ``_FVH`` at offset 40, ``EFI_FFS_FILE_HEADER`` / ``EFI_FFS_FILE_HEADER2`` for large files, common
  section headers with the 0xFFFFFF extended size, 8-byte file and 4-byte section alignment);
  EDK2 ``MdePkg/Include/Pi/PiFirmwareFile.h``, ``PiFirmwareVolume.h``.  The LZMA GUID-defined section
  (GUID EE4E5898-3914-4259-9D6E-DC7BD79403CF, EDK2 ``MdeModulePkg/Include/Guid/LzmaDecompress.h``)
  holds an LZMA "alone" stream (13-byte header).
- bzImage: Linux ``Documentation/arch/x86/boot.rst`` (``HdrS`` at 0x202, ``setup_sects`` at 0x1F1,
  ``payload_offset``/``payload_length`` at 0x248/0x24C, relative to the protected-mode code at
  ``(setup_sects + 1) * 512``).

Decompression is capped per input (:data:`CAP`); past the cap the input is reported, not exhausted.
"""

from __future__ import annotations

import bz2
import errno
import lzma
import os
import stat
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CAP = 1 << 30  # decompressed bytes per input
TDCALL = b"\x66\x0f\x01\xcc"
MAX_DEPTH = 12

LZMA_GUID = uuid.UUID("EE4E5898-3914-4259-9D6E-DC7BD79403CF")
LZMAF86_GUID = uuid.UUID("D42AE6BD-1352-4BFB-909A-CA72A6EAE889")
TIANO_GUID = uuid.UUID("A31280AD-481E-41B6-95E8-127F4C984779")
CRC32_GUID = uuid.UUID("FC1BCDB0-7D31-49AA-936A-A4600D9DD083")
FFS2_GUID = uuid.UUID("8C8CE578-8A3D-4F1C-9935-896185C32DD3")
FFS3_GUID = uuid.UUID("5473C07A-3DCB-4DCA-BD6F-1E9689E7349A")
BROTLI_GUID = uuid.UUID("3D532050-5CDA-4FD0-879E-0F7F630D5AFB")

FFS_TYPES = {
    0x01: "RAW",
    0x02: "FREEFORM",
    0x03: "SEC",
    0x04: "PEI_CORE",
    0x05: "DXE_CORE",
    0x06: "PEIM",
    0x07: "DRIVER",
    0x08: "COMBINED_PEIM_DRIVER",
    0x09: "APPLICATION",
    0x0A: "MM",
    0x0B: "FV_IMAGE",
    0x0C: "COMBINED_MM_DXE",
    0x0D: "MM_CORE",
    0xF0: "PAD",
}
SECTION_PE32, SECTION_PIC, SECTION_TE, SECTION_RAW = 0x10, 0x11, 0x12, 0x19
SECTION_COMPRESSION, SECTION_GUID_DEFINED, SECTION_FV_IMAGE, SECTION_UI = 0x01, 0x02, 0x17, 0x15


class ContainerError(ValueError):
    """A broken container: one line saying what and where."""


@dataclass
class Code:
    """One region of x86 code: its bytes, the address of its first byte, and what is known of it."""

    chain: list[str]  # outer to inner
    data: bytes
    va: int  # address of data[0] (virtual address or RVA)
    bitness: int = 64
    functions: dict[int, str] = field(default_factory=dict)  # start address -> name
    sizes: dict[int, int] = field(default_factory=dict)  # start address -> size (when the symbol says)
    raw: bool = False  # a flat blob: no sections or symbols say where the code is
    #: in a relocatable object: address -> what fills the byte at link time (its relocation)
    relocs: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # limits met while analysing it
    #: the whole file the region is a section of (ELF, PE, TE), for the deep engine (scan/deep.py),
    #: which maps the image to run it; None for a raw blob
    image: bytes | None = field(default=None, repr=False)
    image_kind: str = "raw"


@dataclass
class Budget:
    """Decompressed bytes still allowed for one input."""

    left: int = CAP

    def take(self, n: int, where: str) -> None:
        self.left -= n
        if self.left < 0:
            raise ContainerError(f"{where}: decompressed data past the cap of {CAP >> 20} MiB; the rest is not scanned")


@dataclass
class Found:
    """What one input holds: code regions, problems (one line each), containers seen."""

    codes: list[Code] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # broken containers: exit status 2
    skipped: list[str] = field(default_factory=list)  # parts with no decoder: said, not an error
    kinds: dict[str, int] = field(default_factory=dict)
    size: int = -1  # bytes of the input file, once read

    def saw(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


def where(chain: list[str]) -> str:
    return " > ".join(chain)


# --- decompression ---------------------------------------------------------------------------------
def _lzma(data: bytes, fmt: int, budget: Budget, chain: list[str]) -> bytes:
    d = lzma.LZMADecompressor(fmt)
    try:
        out = d.decompress(data, max_length=budget.left + 1)
    except lzma.LZMAError as e:
        raise ContainerError(f"{where(chain)}: corrupt LZMA data ({e})") from None
    budget.take(len(out), where(chain))
    if not d.eof and (fmt != lzma.FORMAT_ALONE or _alone_size(data) is None):
        raise ContainerError(f"{where(chain)}: truncated LZMA stream")
    return out


def _alone_size(data: bytes) -> int | None:
    """The uncompressed size an LZMA "alone" header states (offset 5, u64), None when unknown
    (all ones: then the stream must end with its end marker, so ``eof`` is required)."""
    if len(data) < 13:
        return None
    (size,) = struct.unpack_from("<Q", data, 5)
    return None if size == 0xFFFFFFFFFFFFFFFF else size


def _zlib(data: bytes, budget: Budget, chain: list[str]) -> bytes:
    d = zlib.decompressobj(47)  # gzip or zlib header
    try:
        out = d.decompress(data, budget.left + 1)
    except zlib.error as e:
        raise ContainerError(f"{where(chain)}: corrupt gzip data ({e})") from None
    budget.take(len(out), where(chain))
    if not d.eof:
        raise ContainerError(f"{where(chain)}: truncated gzip stream")
    return out


def _zstd(data: bytes, budget: Budget, chain: list[str]) -> bytes:
    import zstandard

    parts: list[bytes] = []
    try:
        # the kernel's zstd frame has no content size; fed 4 KiB at a time so the cap stops a bomb
        # early, and the object says whether the frame ended (``eof``)
        d = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
        for at in range(0, len(data), 4096):
            part = d.decompress(data[at : at + 4096])
            budget.take(len(part), where(chain))
            parts.append(part)
            if d.eof:
                break
    except zstandard.ZstdError as e:
        raise ContainerError(f"{where(chain)}: corrupt zstd data ({e})") from None
    out = b"".join(parts)
    if not d.eof:
        raise ContainerError(f"{where(chain)}: truncated zstd stream")
    return out


def _lz4(data: bytes, budget: Budget, chain: list[str]) -> bytes:
    try:
        import lz4.block
        import lz4.frame
    except ImportError:
        raise ContainerError(
            f"{where(chain)}: lz4 data, but the optional lz4 package is not installed (pip install lz4)"
        ) from None
    try:
        if data[:4] == b"\x04\x22\x4d\x18":
            d = lz4.frame.LZ4FrameDecompressor()
            out = d.decompress(data, max_length=budget.left + 1)
            budget.take(len(out), where(chain))
            return bytes(out)
        # the legacy format the kernel uses: magic, then chunks of (u32 size, block of at most 8 MiB)
        parts, off = [], 4
        while off + 4 <= len(data):
            (n,) = struct.unpack_from("<I", data, off)
            if n == 0x184C2102 or off + 4 == len(data):
                break  # a following stream, or the trailing size the kernel appends
            if off + 4 + n > len(data):
                raise ContainerError(f"{where(chain)}: truncated lz4 stream ({len(data) - off - 4} of {n} bytes)")
            part = lz4.block.decompress(data[off + 4 : off + 4 + n], uncompressed_size=8 << 20)
            budget.take(len(part), where(chain))
            parts.append(part)
            off += 4 + n
        return b"".join(parts)
    except (RuntimeError, lz4.block.LZ4BlockError) as e:
        raise ContainerError(f"{where(chain)}: corrupt lz4 data ({e})") from None


def _bz2(data: bytes, budget: Budget, chain: list[str]) -> bytes:
    d = bz2.BZ2Decompressor()
    try:
        out = d.decompress(data, max_length=budget.left + 1)
    except OSError as e:
        raise ContainerError(f"{where(chain)}: corrupt bzip2 data ({e})") from None
    budget.take(len(out), where(chain))
    if not d.eof and len(out) <= budget.left:
        raise ContainerError(f"{where(chain)}: truncated bzip2 stream")
    return out


def decompress(data: bytes, budget: Budget, chain: list[str]) -> tuple[str, bytes] | None:
    """If ``data`` starts with a known compression magic, its decompressed bytes and the kind."""
    if data[:2] == b"\x1f\x8b":
        return "gzip", _zlib(data, budget, chain + ["gzip"])
    if data[:6] == b"\xfd7zXZ\x00":
        return "xz", _lzma(data, lzma.FORMAT_XZ, budget, chain + ["xz"])
    if data[:4] == b"\x28\xb5\x2f\xfd":
        return "zstd", _zstd(data, budget, chain + ["zstd"])
    if data[:4] in (b"\x04\x22\x4d\x18", b"\x02\x21\x4c\x18"):
        return "lz4", _lz4(data, budget, chain + ["lz4"])
    if data[:3] == b"BZh" and data[4:10] == b"\x31\x41\x59\x26\x53\x59":
        return "bzip2", _bz2(data, budget, chain + ["bzip2"])
    return None


def _tiano(
    data: bytes, budget: Budget, chain: list[str], found: Found, off: int, tiano_first: bool = False
) -> bytes | None:
    """An EFI- or Tiano-compressed section body (EDK2 ``BaseUefiDecompressLib``: 8-byte header of
    compressed and original sizes, then Huffman-coded LZ77 blocks) decompressed by the C decoder of
    the optional ``uefi-firmware`` package (``pip install 'tdvmcall[tiano]'``).  The compression
    section's type 1 is EFI compression; EDK2's Tiano GUID-defined section uses the Tiano variant;
    each is tried first where it is expected, then the other.  None (and a skipped line) without the
    package."""
    try:
        from uefi_firmware import efi_compressor  # type: ignore[import-untyped]
    except ImportError:
        found.skipped.append(
            f"{where(chain)}: EFI/Tiano-compressed section at {off:#x} not scanned "
            "(the optional decoder is not installed: pip install 'tdvmcall[tiano]')"
        )
        return None
    if len(data) < 8:
        raise ContainerError(f"{where(chain)}: compressed section header truncated")
    csize, osize = struct.unpack_from("<II", data, 0)
    if csize + 8 > len(data):
        raise ContainerError(f"{where(chain)}: compressed data truncated ({len(data) - 8} of {csize} bytes)")
    budget.take(osize, where(chain))
    decoders = [efi_compressor.TianoDecompress, efi_compressor.EfiDecompress]
    for decode in decoders if tiano_first else decoders[::-1]:
        try:
            out = bytes(decode(data, len(data)))
        except Exception:  # the C extension raises a bare Exception("Failed to decompress")
            continue
        if len(out) == osize:
            return out
    raise ContainerError(f"{where(chain)}: corrupt EFI/Tiano-compressed data")


# --- ELF ---------------------------------------------------------------------------------------------
SHF_EXECINSTR = 0x4
SHT_PROGBITS, SHT_SYMTAB, SHT_DYNSYM = 1, 2, 11
STT_FUNC = 2


def elf(data: bytes, chain: list[str], found: Found) -> None:
    """Executable sections of an ELF file, with its function symbols when it has a symbol table."""
    if len(data) < 64:
        raise ContainerError(f"{where(chain)}: ELF header truncated")
    is64 = data[4] == 2
    if data[5] != 1:
        raise ContainerError(f"{where(chain)}: big-endian ELF is not x86")
    bitness = 64 if is64 else 32
    try:
        if is64:
            shoff, shentsize, shnum, shstrndx = (
                struct.unpack_from("<Q", data, 0x28)[0],
                *struct.unpack_from("<HHH", data, 0x3A),
            )
        else:
            shoff, shentsize, shnum, shstrndx = (
                struct.unpack_from("<I", data, 0x20)[0],
                *struct.unpack_from("<HHH", data, 0x2E),
            )
        sections = []
        for i in range(shnum):
            o = shoff + i * shentsize
            if is64:
                name, typ, flags, addr, off, size, link, _info, _al, entsize = struct.unpack_from(
                    "<IIQQQQIIQQ", data, o
                )
            else:
                name, typ, flags, addr, off, size, link, _info, _al, entsize = struct.unpack_from(
                    "<IIIIIIIIII", data, o
                )
            sections.append((name, typ, flags, addr, off, size, link, entsize, _info))
    except struct.error:
        raise ContainerError(f"{where(chain)}: ELF section headers truncated") from None
    strtab = b""
    if 0 < shstrndx < len(sections):
        s = sections[shstrndx]
        strtab = data[s[4] : s[4] + s[5]]

    def sname(i: int) -> str:
        end = strtab.find(b"\0", i)
        return strtab[i:end].decode(errors="replace") if i < len(strtab) else f"#{i}"

    rel = struct.unpack_from("<H", data, 0x10)[0] == ET_REL
    funcs, sizes = _symbols(data, sections, is64, rel)
    relocs = _relocations(data, sections, is64) if rel else {}
    found.saw("elf")
    for k, (name, typ, flags, addr, off, size, *_) in enumerate(sections):
        if typ == SHT_PROGBITS and flags & SHF_EXECINSTR and size:
            if off + size > len(data):
                raise ContainerError(f"{where(chain)}: section {sname(name)} runs past the end of the file")
            if rel:  # a relocatable object: every section at 0, its symbols by section index
                fn = funcs.get(k, {})
                sz = sizes.get(k, {})
            else:
                lo, hi = addr, addr + size
                fn = {a: n for a, n in funcs.get(-1, {}).items() if lo <= a < hi}
                sz = {a: sizes[-1][a] for a in fn if a in sizes.get(-1, {})}
            code = Code(chain + [sname(name)], data[off : off + size], addr, bitness, fn, sz)
            code.relocs = relocs.get(k, {})
            code.image, code.image_kind = data, "elf"
            found.codes.append(code)


#: ELF ``e_type`` of a relocatable object (``.o``): symbol values are offsets in their section, and
#: the bytes a relocation names are not yet filled in (System V gABI, "Relocation")
ET_REL = 1
SHT_RELA, SHT_REL = 4, 9
STT_NOTYPE = 0
#: bytes a relocation fills, per x86-64 type (psABI "Relocation Types"; others are 4 bytes):
#: R_X86_64_64, DTPMOD64, DTPOFF64, TPOFF64, PC64, GOTOFF64, GOT64, GOTPCREL64, GOTPC64, GOTPLT64,
#: PLTOFF64, SIZE64: 8; R_X86_64_16, PC16: 2; R_X86_64_8, PC8: 1
_RELOC_SIZE64 = {1: 8, 16: 8, 17: 8, 18: 8, 24: 8, 25: 8, 27: 8, 28: 8, 29: 8, 30: 8, 31: 8, 33: 8, 12: 2, 13: 2}
_RELOC_SIZE64 |= {14: 1, 15: 1}
#: i386 (SysV i386 psABI): R_386_16, PC16: 2; R_386_8, PC8: 1; others 4
_RELOC_SIZE32 = {20: 2, 21: 2, 22: 1, 23: 1}


def _symbol_rows(data: bytes, sections: list, s: tuple, is64: bool) -> Iterator[tuple[str, int, int, int, int]]:
    """(name, type, section index, value, size) of the symbols of one symbol table."""
    if s[6] >= len(sections):
        return
    st = sections[s[6]]
    names = data[st[4] : st[4] + st[5]]
    table = data[s[4] : s[4] + s[5]]

    def name_at(i: int) -> str:
        return names[i : names.find(b"\0", i)].decode(errors="replace") if i < len(names) else ""

    if is64:
        for nm, info, _o, shndx, value, size in struct.iter_unpack("<IBBHQQ", table[: len(table) // 24 * 24]):
            yield name_at(nm), info & 0xF, shndx, value, size
    else:
        for nm, value, size, info, _o, shndx in struct.iter_unpack("<IIIBBH", table[: len(table) // 16 * 16]):
            yield name_at(nm), info & 0xF, shndx, value, size


def _symbols(
    data: bytes, sections: list, is64: bool, rel: bool
) -> tuple[dict[int, dict[int, str]], dict[int, dict[int, int]]]:
    """Function names and sizes from ``.symtab`` (else ``.dynsym``), keyed by section index in a
    relocatable object (values are offsets in their section) and by -1 otherwise (addresses).
    ``STT_FUNC`` symbols first; then labels without a type (``STT_NOTYPE``: an assembly label with
    no ``.type``) in an executable section, unless a sized function covers them (a label inside a
    function, ``retry:``, is not a function of its own) or they are local (``.L``) or mapping
    symbols; such a label names its code and starts a function with no known size."""
    execs = {k for k, sec in enumerate(sections) if sec[1] == SHT_PROGBITS and sec[2] & SHF_EXECINSTR}
    funcs: dict[int, dict[int, str]] = {}
    sizes: dict[int, dict[int, int]] = {}
    for want in (SHT_SYMTAB, SHT_DYNSYM):
        labels: list[tuple[int, int, str]] = []
        for s in sections:
            if s[1] != want:
                continue
            for name, typ, shndx, value, size in _symbol_rows(data, sections, s, is64):
                if not shndx or shndx >= 0xFF00 or not name or (not value and not rel):
                    continue
                key = shndx if rel else -1
                if typ == STT_FUNC:
                    if value not in funcs.setdefault(key, {}):
                        funcs[key][value] = name
                        if size:
                            sizes.setdefault(key, {})[value] = size
                elif typ == STT_NOTYPE and shndx in execs and not name.startswith((".L", "$")):
                    labels.append((key, value, name))
        for key, value, name in labels:
            mine = funcs.setdefault(key, {})
            if value in mine:
                continue
            if any(a < value < a + n for a, n in sizes.get(key, {}).items()):
                continue  # inside a sized function: a label of its own code
            mine[value] = name
        if any(funcs.values()):
            break
    return funcs, sizes


def _relocations(data: bytes, sections: list, is64: bool) -> dict[int, dict[int, str]]:
    """Per section index, the offsets of the bytes relocations fill in a relocatable object, each
    with what fills it (``R_X86_64_PLT32 memcpy``): those bytes are zeros or an addend until the
    link, so an instruction holding them (``call rel32``, ``mov ecx, offset sym``, ``lea rdi,
    [rip+x]``) has no known target or value."""
    out: dict[int, dict[int, str]] = {}
    for s in sections:
        if s[1] not in (SHT_RELA, SHT_REL) or s[4] + s[5] > len(data):
            continue
        target = s[8]  # sh_info: the section the relocations apply to
        linked = s[6] < len(sections) and sections[s[6]][1] in (SHT_SYMTAB, SHT_DYNSYM)
        names = [n for n, *_ in _symbol_rows(data, sections, sections[s[6]], is64)] if linked else []
        if is64:
            fmt, ent = ("<QQq", 24) if s[1] == SHT_RELA else ("<QQ", 16)
        else:
            fmt, ent = ("<IIi", 12) if s[1] == SHT_RELA else ("<II", 8)
        table = data[s[4] : s[4] + s[5]]
        mine = out.setdefault(target, {})
        for row in struct.iter_unpack(fmt, table[: len(table) // ent * ent]):
            offset, info = row[0], row[1]
            typ, sym = (info & 0xFFFFFFFF, info >> 32) if is64 else (info & 0xFF, info >> 8)
            size = (_RELOC_SIZE64 if is64 else _RELOC_SIZE32).get(typ, 4)
            what = names[sym] if 0 < sym < len(names) and names[sym] else f"symbol #{sym}"
            for b in range(size):
                mine[offset + b] = f"type {typ} to {what}"
    return out


# --- PE/COFF and TE ----------------------------------------------------------------------------------
SCN_MEM_EXECUTE = 0x20000000
SCN_CNT_CODE = 0x20


#: sections of a unified kernel image (systemd's stub, ``ukify``; the UAPI group's "Unified Kernel
#: Image" specification) that hold no code: not scanned, not said
UKI_DATA = (".cmdline", ".osrel", ".uname", ".splash", ".dtb", ".pcrsig", ".pcrpkey", ".sbat", ".sdmagic", ".profile")


def _sections(
    data: bytes, at: int, n: int, adjust: int, bitness: int, chain: list[str], found: Found
) -> list[tuple[str, bytes]]:
    """The code sections of a PE/TE image into ``found``; returns the data sections that hold an
    image of their own, to be explored: a unified kernel image's ``.linux`` (a bzImage), and any
    section holding an ELF or PE/COFF image.  A UKI's ``.initrd`` is said, not scanned."""
    embedded: list[tuple[str, bytes]] = []
    for k in range(n):
        o = at + 40 * k
        if o + 40 > len(data):
            raise ContainerError(f"{where(chain)}: section table truncated")
        name, vsize, va, rsize, rptr = struct.unpack_from("<8sIIII", data, o)
        (chars,) = struct.unpack_from("<I", data, o + 36)
        label = name.rstrip(b"\0").decode(errors="replace") or f"section{k}"
        if chars & (SCN_MEM_EXECUTE | SCN_CNT_CODE) and rsize:
            fo = rptr + adjust
            if fo < 0 or fo + min(rsize, vsize or rsize) > len(data):
                raise ContainerError(f"{where(chain)}: section {label} truncated")
            size = min(rsize, vsize) if vsize else rsize
            found.codes.append(Code(chain + [label], data[fo : fo + size], va, bitness))
        elif rsize and label not in UKI_DATA:
            fo = rptr + adjust
            size = min(rsize, vsize) if vsize else rsize
            body = data[fo : fo + size] if fo >= 0 else b""
            if label == ".initrd":
                found.skipped.append(f"{where(chain + [label])}: the initramfs ({size} bytes) not scanned")
            elif label == ".linux" or body[:4] == b"\x7fELF" or body[:2] == b"MZ":
                if fo < 0 or fo + size > len(data):
                    raise ContainerError(f"{where(chain)}: section {label} truncated")
                embedded.append((label, body))
    return embedded


def pe(data: bytes, chain: list[str], found: Found, budget: Budget | None = None, depth: int = 0) -> None:
    """Executable sections of a PE/COFF image (addresses are RVAs)."""
    try:
        (pe_at,) = struct.unpack_from("<I", data, 0x3C)
        machine, nsec = struct.unpack_from("<HH", data, pe_at + 4)
        (opt_size,) = struct.unpack_from("<H", data, pe_at + 20)
        (entry,) = struct.unpack_from("<I", data, pe_at + 24 + 16)
    except struct.error:
        raise ContainerError(f"{where(chain)}: PE header truncated") from None
    _image(data, chain, found, "pe", machine, pe_at + 24 + opt_size, nsec, 0, entry, budget, depth)


def _image(
    data: bytes,
    chain: list[str],
    found: Found,
    kind: str,
    machine: int,
    table: int,
    nsec: int,
    adjust: int,
    entry: int,
    budget: Budget | None = None,
    depth: int = 0,
) -> None:
    """The executable sections of a PE or TE image whose headers were read, its entry point named;
    then the images its data sections hold (a unified kernel image's ``.linux``), each explored
    under the section's name."""
    bitness = 64 if machine == 0x8664 else 32 if machine == 0x14C else 0
    if not bitness:
        raise ContainerError(f"{where(chain)}: {kind.upper()} machine {machine:#x} is not x86")
    found.saw(kind)
    first = len(found.codes)
    embedded = _sections(data, table, nsec, adjust, bitness, chain, found)
    for c in found.codes[first:]:
        c.image, c.image_kind = data, kind
        if c.va <= entry < c.va + len(c.data):
            c.functions.setdefault(entry, "entry point")
    if embedded and any(label == ".linux" for label, _ in embedded):
        found.saw("uki")
    for label, body in embedded:
        explore(body, chain + [label], found, budget or Budget(), depth + 1)


def te(data: bytes, chain: list[str], found: Found, budget: Budget | None = None, depth: int = 0) -> None:
    """Executable sections of a TE image (addresses are RVAs)."""
    try:
        _sig, machine, nsec, _sub, stripped, entry = struct.unpack_from("<HHBBHI", data, 0)
    except struct.error:
        raise ContainerError(f"{where(chain)}: TE header truncated") from None
    _image(data, chain, found, "te", machine, 40, nsec, 40 - stripped, entry, budget, depth)


# --- UEFI firmware volumes ---------------------------------------------------------------------------
def _guid(b: bytes, o: int = 0) -> uuid.UUID:
    return uuid.UUID(bytes_le=bytes(b[o : o + 16]))


def _u24(b: bytes, o: int) -> int:
    return b[o] | b[o + 1] << 8 | b[o + 2] << 16


def is_volume(data: bytes, at: int = 0) -> bool:
    return data[at + 40 : at + 44] == b"_FVH" and len(data) >= at + 56


def volumes(data: bytes) -> Iterator[int]:
    """Offsets of the firmware volumes in a flash image (the 16-byte zero vector, then ``_FVH``)."""
    i = 0
    while (i := data.find(b"_FVH", i)) >= 0:
        base = i - 40
        if base >= 0 and data[base : base + 16] == bytes(16):
            (length,) = struct.unpack_from("<Q", data, base + 32)
            if length > 0:
                yield base
                i = base + max(length, 44)
                continue
        i += 4


def volume(data: bytes, chain: list[str], found: Found, budget: Budget, depth: int) -> None:
    """The FFS files of one firmware volume starting at ``data[0]``."""
    (length,) = struct.unpack_from("<Q", data, 32)
    (hlen,) = struct.unpack_from("<H", data, 48)
    (ext,) = struct.unpack_from("<H", data, 52)
    if _guid(data, 16) not in (FFS2_GUID, FFS3_GUID):
        found.saw("fv (not FFS: variables or other data)")
        return
    found.saw("fv")
    if length > len(data):
        raise ContainerError(f"{where(chain)}: volume truncated ({len(data)} of {length} bytes)")
    if hlen < 56 or hlen > length:
        raise ContainerError(f"{where(chain)}: bad volume header length {hlen}")
    off = hlen
    if ext:
        if ext + 20 > length:
            raise ContainerError(f"{where(chain)}: bad extended header offset {ext:#x}")
        (esize,) = struct.unpack_from("<I", data, ext + 16)
        off = ext + esize
    while True:
        off = (off + 7) & ~7
        if off + 24 > length or data[off : off + 24] == b"\xff" * 24:
            break
        name = _guid(data, off)
        ftype, attr = data[off + 18], data[off + 19]
        size, hdr = _u24(data, off + 20), 24
        if attr & 0x01:  # FFS_ATTRIB_LARGE_FILE: EFI_FFS_FILE_HEADER2
            (size,) = struct.unpack_from("<Q", data, off + 24)
            hdr = 32
        if size < hdr or off + size > length:
            raise ContainerError(f"{where(chain)}: file {str(name).upper()} at {off:#x} has a bad size {size:#x}")
        if ftype != 0xF0:  # padding
            found.saw("ffs")
            body = data[off + hdr : off + size]
            label = str(name).upper()
            if ftype == 0x01:  # RAW file: the body is the data
                explore(body, chain + [label], found, budget, depth + 1)
            else:
                leaves: list[tuple[list[str], bytes]] = []
                ui = sections(body, chain + [label], leaves, found, budget, depth)
                label = ui or label
                for sub, blob in leaves:
                    explore(blob, chain + [label] + sub, found, budget, depth + 1)
        off += size


def sections(
    data: bytes, chain: list[str], leaves: list[tuple[list[str], bytes]], found: Found, budget: Budget, depth: int
) -> str | None:
    """Walk the sections of a file body; leaf images go to ``leaves`` (with their inner chain), nested
    volumes are walked.  Returns the file's UI name if a UI section says it.  Sections nested (in
    compression or GUID-defined sections) deeper than :data:`MAX_DEPTH` are an error."""
    if depth > MAX_DEPTH:
        raise ContainerError(f"{where(chain)}: sections nested deeper than {MAX_DEPTH}")
    ui: str | None = None
    off = 0
    while off + 4 <= len(data):
        off = (off + 3) & ~3
        if off + 4 > len(data):
            break
        size, typ, hdr = _u24(data, off), data[off + 3], 4
        if size == 0xFFFFFF:
            (size,) = struct.unpack_from("<I", data, off + 4)
            hdr = 8
        if size < hdr or off + size > len(data):
            raise ContainerError(f"{where(chain)}: section at {off:#x} has a bad size {size:#x}")
        body = data[off + hdr : off + size]
        if typ == SECTION_UI:
            ui = body.decode("utf-16-le", errors="replace").rstrip("\0")
        elif typ in (SECTION_PE32, SECTION_PIC):
            leaves.append((["pe32"], body))
        elif typ == SECTION_TE:
            leaves.append((["te"], body))
        elif typ == SECTION_RAW:
            leaves.append(([f"raw@{off:#x}"], body))
        elif typ == SECTION_FV_IMAGE:
            leaves.append((["fv"], body))
        elif typ == SECTION_COMPRESSION:
            if len(body) < 5:
                raise ContainerError(f"{where(chain)}: compression section truncated")
            (ctype,) = struct.unpack_from("<B", body, 4)
            sub: list[tuple[list[str], bytes]] = []
            if ctype == 0:
                name = sections(body[5:], chain, sub, found, budget, depth + 1)
                ui = ui or name
                leaves += sub
            elif (out := _tiano(body[5:], budget, chain + ["efi-compressed"], found, off)) is not None:
                found.saw("efi-compressed")
                name = sections(out, chain + ["efi-compressed"], sub, found, budget, depth + 1)
                ui = ui or name
                leaves += [(["efi-compressed", *p], b) for p, b in sub]
        elif typ == SECTION_GUID_DEFINED:
            if len(body) < 20:
                raise ContainerError(f"{where(chain)}: GUID-defined section truncated")
            g = _guid(body)
            doff, gattr = struct.unpack_from("<HH", body, 16)
            payload = data[off + doff : off + size]
            if g == LZMA_GUID:
                kind = "lzma"
                found.saw(kind)
                out = _lzma(payload, lzma.FORMAT_ALONE, budget, chain + [kind])
                if len(payload) >= 13:
                    (want,) = struct.unpack_from("<Q", payload, 5)
                    if want != 0xFFFFFFFFFFFFFFFF and len(out) != want:
                        raise ContainerError(
                            f"{where(chain + [kind])}: LZMA stream ends after {len(out)} of {want} bytes"
                        )
                sub = []
                name = sections(out, chain + [kind], sub, found, budget, depth + 1)
                ui = ui or name
                leaves += [([kind, *p], b) for p, b in sub]
            elif g == TIANO_GUID:
                sub = []
                out = _tiano(payload, budget, chain + ["tiano"], found, off, tiano_first=True)
                if out is not None:
                    found.saw("tiano")
                    name = sections(out, chain + ["tiano"], sub, found, budget, depth + 1)
                    ui = ui or name
                    leaves += [(["tiano", *p], b) for p, b in sub]
            elif g == CRC32_GUID or not gattr & 0x01:  # not processing-required: the data is plain
                sub = []
                name = sections(payload, chain, sub, found, budget, depth + 1)
                ui = ui or name
                leaves += sub
            else:
                found.skipped.append(
                    f"{where(chain)}: GUID-defined section {str(g).upper()} at {off:#x} not scanned (no decoder)"
                )
        off += size
    return ui


# --- bzImage -----------------------------------------------------------------------------------------
def bzimage(data: bytes, chain: list[str], found: Found, budget: Budget, depth: int) -> None:
    """The whole boot chain of a bzImage (boot protocol 2.08+): the real-mode setup code (sectors 1
    to ``setup_sects``, 16-bit), the protected-mode code that runs before the kernel (the
    decompressor, ``arch/x86/boot/compressed``: its early console IO and memory acceptance make
    TDCALLs), and the compressed kernel inside it (payload offset and length)."""
    setup_sects = data[0x1F1] or 4
    (version,) = struct.unpack_from("<H", data, 0x206)
    if version < 0x208:
        raise ContainerError(f"{where(chain)}: bzImage boot protocol {version:#x} has no payload fields (2.08+)")
    off, length = struct.unpack_from("<II", data, 0x248)
    pm = (setup_sects + 1) * 512
    start = pm + off
    if start + length > len(data):
        raise ContainerError(f"{where(chain)}: bzImage payload runs past the end of the file")
    found.saw("bzimage")
    # the setup code (16-bit; a TDX guest boots through the 64-bit entry, so no TDCALL is expected)
    found.codes.append(Code(chain + ["setup", "code"], data[512:pm], 0, 16))
    # the decompressor: linked at 0 from the start of the protected-mode code, ``syssize`` 16-byte
    # paragraphs long; the payload inside it is blanked, so only code is decoded there
    (syssize,) = struct.unpack_from("<I", data, 0x1F4)
    end = min(len(data), pm + syssize * 16) if syssize else len(data)
    if end > pm:
        blank = bytes(length)
        body = data[pm:start] + blank + data[start + length : end]
        found.codes.append(Code(chain + ["decompressor", "code"], body, 0, 64))
    payload = data[start : start + length]
    got = decompress(payload, budget, chain + ["bzImage payload"])
    if got is None:
        raise ContainerError(f"{where(chain)}: bzImage payload in an unknown compression ({payload[:4].hex()})")
    kind, out = got
    explore(out, chain + [f"vmlinux ({kind})"], found, budget, depth + 1)


# --- dispatch ----------------------------------------------------------------------------------------
def explore(data: bytes, chain: list[str], found: Found, budget: Budget, depth: int = 0) -> None:
    """Recognise ``data`` by its first bytes and collect its code regions into ``found``."""
    if depth > MAX_DEPTH:
        found.skipped.append(f"{where(chain)}: containers nested deeper than {MAX_DEPTH}; not scanned")
        return
    if data[:4] == b"\x7fELF":
        return elf(data, chain, found)
    if data[:2] == b"MZ" and len(data) > 0x40:
        (pe_at,) = struct.unpack_from("<I", data, 0x3C)
        if data[pe_at : pe_at + 4] == b"PE\0\0":
            if len(data) > 0x206 and data[0x202:0x206] == b"HdrS":
                return bzimage(data, chain, found, budget, depth)  # an EFI-stub kernel is a bzImage too
            return pe(data, chain, found, budget, depth)
    if data[:2] == b"VZ" and len(data) >= 40:
        return te(data, chain, found, budget, depth)
    if len(data) > 0x250 and data[0x202:0x206] == b"HdrS":
        return bzimage(data, chain, found, budget, depth)
    if is_volume(data) and struct.unpack_from("<Q", data, 32)[0] >= len(data):
        return volume(data, chain, found, budget, depth)
    got = decompress(data, budget, chain)
    if got is not None:
        kind, out = got
        found.saw(kind)
        return explore(out, chain + [kind], found, budget, depth + 1)
    bases = list(volumes(data)) if b"_FVH" in data else []
    if bases:
        found.saw("flash")
        for base in bases:
            try:
                volume(data[base:], chain + [f"fv@{base:#x}"], found, budget, depth + 1)
            except (ContainerError, struct.error) as e:
                found.problems.append(str(e) if isinstance(e, ContainerError) else f"{where(chain)}: {e}")
        # code outside the volumes (a reset vector, SEC in a raw region) is not scanned as flat code
        return None
    if TDCALL in data:
        found.saw("raw")
        found.codes.append(Code(chain + ["raw"], data, 0, 64, raw=True))
    return None


#: the most bytes read from one input file (a firmware image, a kernel with debug info fit well
#: under it); a larger file is refused before it is read
READ_CAP = CAP


def unreadable(p: Path, e: OSError) -> str:
    """Why a path cannot be read, in one line: a symbolic link loop and a link to nothing are named
    as such (``stat`` says only "too many levels" or "no such file")."""
    if e.errno == errno.ELOOP:
        return f"{p}: a symbolic link loop (too many levels of symbolic links); not scanned"
    if e.errno == errno.ENOENT:
        if p.is_symlink():
            return f"{p}: a symbolic link to nothing ({os.readlink(p)} does not exist); not scanned"
        return f"{p}: no such file or directory"
    return f"{p}: cannot read ({e.strerror or e})"


def read_input(p: Path) -> bytes:
    """The bytes of one input file, at most :data:`READ_CAP`.  Only a regular file is read: a FIFO
    would block and a device (``/dev/zero``) never ends, so both are refused with one line."""
    try:
        st = p.stat()
        if stat.S_ISDIR(st.st_mode):
            os.listdir(p)  # a directory returned by input_files because it cannot be listed: say why
            raise ContainerError(f"{p}: a directory that could not be walked")
        if not stat.S_ISREG(st.st_mode):
            raise ContainerError(f"{p}: not a regular file (a device, FIFO or socket); not scanned")
        if st.st_size > READ_CAP:
            raise ContainerError(f"{p}: {st.st_size >> 20} MiB is more than the {READ_CAP >> 20} MiB read cap")
        with p.open("rb") as f:
            data = f.read(READ_CAP + 1)
    except OSError as e:
        raise ContainerError(unreadable(p, e)) from None
    if len(data) > READ_CAP:  # grew while being read
        raise ContainerError(f"{p}: more than the {READ_CAP >> 20} MiB read cap")
    return data


def input_files(path: Path) -> list[Path]:
    """The files of one input: the file itself, or every entry of a directory, recursively, sorted,
    that is not a directory.  Symbolic links to directories are followed, each directory walked
    once (by device and inode: a link back to an ancestor ends there, and files reached twice are
    scanned once by the caller); a directory that cannot be listed is returned as an entry, so that
    reading it gives its one error line."""
    if not path.is_dir():
        return [path]
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    todo = [path]
    while todo:
        d = todo.pop()  # depth first
        try:
            st = d.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(d.iterdir())
        except OSError:
            out.append(d)
            continue
        out += [e for e in entries if not e.is_dir()]
        todo += reversed([e for e in entries if e.is_dir()])  # walked in name order: the same paths every run
    return sorted(out)


def open_file(p: Path) -> Found:
    """What one file holds.  A broken container ends its walk with one problem line."""
    found = Found()
    try:
        data = read_input(p)
    except ContainerError as e:
        found.problems.append(str(e))
        return found
    try:
        explore(data, [str(p)], found, Budget())
    except ContainerError as e:
        found.problems.append(str(e))
    except (struct.error, IndexError) as e:
        found.problems.append(f"{p}: truncated or corrupt container ({e})")
    except RecursionError:
        found.problems.append(f"{p}: containers nested too deeply to walk")
    except (MemoryError, OverflowError) as e:
        found.problems.append(f"{p}: container too large to unpack ({type(e).__name__})")
    found.size = len(data)
    return found


def no_code(p: str, found: Found) -> str:
    """Why an input holds nothing to scan, in one line: empty, or no container scan recognises
    holds code (and, for bytes it does not recognise, no TDCALL bytes to read as raw code)."""
    if found.size == 0:
        return f"{p}: empty file (0 bytes): no code to scan"
    seen = ", ".join(k for k in found.kinds if k != "raw")
    if seen:
        return f"{p}: no x86 code found in it ({seen}: no executable section or image inside)"
    return (
        f"{p}: no code found in {found.size} byte{'' if found.size == 1 else 's'}: no container scan recognises "
        "(ELF, PE/TE, bzImage, UEFI image or volume, compressed stream) and no TDCALL bytes to read as raw code"
    )


def open_input(path: Path) -> Iterator[tuple[str, Found]]:
    """Every file of an input (a file, or a directory recursively), with what it holds.  A broken
    container ends that file's walk with one problem line; the other files go on.  In a directory,
    entries that are neither directories nor regular files (FIFOs, devices) are refused too."""
    for p in input_files(path):
        yield str(p), open_file(p)
