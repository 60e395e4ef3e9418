"""Real guests' TDVMCALL call sites (the shipped catalog) and the compatibility check.

The catalog (``data/guest-masks.csv``, see ``data/NOTICE.md``; docs/abi.md §6) has one row per call
site: ``guest, snapshot, file, function, mask_hex, tdvmcalls, note``.  ``mask_hex`` is the control
value the site puts in RCX (bits 15:0 GPRs, 31:16 XMMs, 63:32 reserved); ``tdvmcalls`` names, in
free text, the calls made through it.  This module turns that text into rows of the leaf table
(:data:`CALL_NAMES`, :data:`FOREIGN_CALLS`, the grammar in :func:`parse_calls`) and the cases each
call runs (:func:`cases_for`), then has every (site, call) judged by ``judge.py`` -- the TDX module
with the TD's attributes, then KVM under ``legacy`` and ``hardened`` (:func:`check_call`).

Nothing here says which registers a call needs (``kvm/leaves.py``) or how a call is judged
(``judge.py``): only the catalog's grammar, the sites and the counts.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .. import data_file
from ..abi.regs import GPR_NAMES, parse_int
from ..judge import (
    CALL_WORDS,
    CASE_WORDS,
    INPUT_QUALIFIERS,
    POSITIONAL_INPUTS,
    VERDICTS,
    CaseRun,
    Host,
    Judgement,
    ModuleOutcome,
    judge,
    module_outcome,
)
from ..kvm import leaves as L
from ..kvm.regcache import ModelBug
from ..kvm.tdx import POLICIES

CATALOG_COLUMNS = ("guest", "snapshot", "file", "function", "mask_hex", "tdvmcalls", "note")

# --- the catalog's call names ------------------------------------------------------------------
#: Every call KVM implements: what a bare ``all`` stands for (a guest that uses one mask for
#: every TDVMCALL it makes, e.g. Linux's ``__tdx_hypercall``).
ALL_KVM_CALLS: tuple[str, ...] = tuple(leaf.name for leaf in L.GHCI_LEAVES + L.KVM_HYPERCALLS)

#: Catalog call name -> the leaf-table rows it stands for.  A leaf's own name (``MapGPA``,
#: ``Instruction.RDMSR``, ``KVMHypercall.SEND_IPI``, ``Service`` ...) is accepted as well.
#: Names are matched case-insensitively.
CALL_NAMES: dict[str, tuple[str, ...]] = {
    **{word: (name,) for word, name in CALL_WORDS.items()},  # CPUID HLT IO RDMSR WRMSR MMIO WBINVD PCONFIG
    # Linux's kvm_hypercall*() on a TD: R10 = the KVM hypercall number (docs/abi.md §4)
    "KVM-hypercall": tuple(leaf.name for leaf in L.KVM_HYPERCALLS),
}

_HYPERV = (
    "Hyper-V hypercall: R10 holds a Hyper-V control word for a Hyper-V host; KVM would take any "
    "R10 != 0 as a KVM hypercall number, so KVM's leaf table does not describe it (docs/abi.md §4, §6)"
)
_MIGTD = (
    "MigTD call (TD migration): served by the host's migration service, not a leaf of KVM's TDVMCALL "
    "dispatch, which answers SUBFUNC_UNSUPPORTED to leaves it does not know (docs/abi.md §4)"
)

#: Calls the catalog names that are not KVM calls, with the reason.  They are checked against the
#: TDX module only (its control check holds on any host) and reported as ``not-kvm``.
FOREIGN_CALLS: dict[str, str] = {
    "HyperV-hypercall": _HYPERV,
    "MigTD.WaitForRequest": _MIGTD,
    "MigTD.ReportStatus": _MIGTD,
    "MigTD.Send": _MIGTD,
    "MigTD.Receive": _MIGTD,
}

#: Family words: ``MigTD ReportStatus Send`` means ``MigTD.ReportStatus MigTD.Send``.
FAMILY_WORDS = ("MigTD",)
_FAMILIES = {w.lower(): w for w in FAMILY_WORDS}  # matched case-insensitively, as call names are

#: Words that end the list of calls: the rest of the field is a remark (``... and other C callers``).
REMARK_WORDS = ("and",)


def _index() -> dict[str, tuple[str, ...]]:
    idx = {name.lower(): (name,) for name in L.BY_NAME}
    idx.update({name.lower(): (name,) for name in FOREIGN_CALLS})
    idx.update({name.lower(): rows for name, rows in CALL_NAMES.items()})
    return idx


_NAMES = _index()


def accepted_names() -> list[str]:
    """Every call name the catalog accepts (for error messages and ``--help``)."""
    return [
        "all",
        *CALL_NAMES,
        *(n for n in L.BY_NAME if n.lower() not in {c.lower() for c in CALL_NAMES}),
        *FOREIGN_CALLS,
    ]


class CatalogError(ValueError):
    """A bad catalog row or what-if: one line naming the row and the field."""


@dataclass(frozen=True)
class CallRef:
    """One call a site makes: a leaf-table row, or a call that is not KVM's (``foreign`` says why)."""

    name: str  # the leaf name, or the FOREIGN_CALLS name
    written: str  # as the catalog wrote it
    annotation: str = ""  # text in parentheses after the name
    inputs: tuple[tuple[str, int], ...] = ()  # input values pinned by a qualifier
    foreign: str | None = None
    cases: tuple[str, ...] = ()  # the leaf's cases a direction word selects (empty: every case)
    qualifier: str = ""  # the qualifiers and direction words as written (``leaf 0xB``, ``0x802``, ``in``)

    @property
    def label(self) -> str:
        """The call with its qualifiers, as a reader would write it: ``RDMSR 0x802``, ``IO in``."""
        return f"{self.written} {self.qualifier}" if self.qualifier else self.written

    @property
    def leaf(self) -> L.Leaf | None:
        return None if self.foreign else L.BY_NAME[self.name]


@dataclass(frozen=True, slots=True)
class Site:
    """One call site: where it was read, the control value it passes and the calls it makes."""

    row: int  # line number in the CSV file (the header is line 1); 0 for a what-if
    guest: str
    snapshot: str
    file: str
    function: str
    mask: int  # the control value in RCX
    calls: tuple[CallRef, ...]
    remarks: tuple[str, ...] = ()
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.guest} {self.function}".strip()


# --- parsing the tdvmcalls field -----------------------------------------------------------------
_TOKEN = re.compile(r"[^\s()]+(?:\([^()]*\))?|\([^()]*\)")


def _names_a_call(token: str) -> bool:
    word = token.partition("(")[0]
    return word.lower() in _NAMES or word.lower() in _FAMILIES


def parse_calls(text: str) -> tuple[list[CallRef], list[str]]:
    """:func:`_parse_calls`, once per distinct text (a large catalog repeats a few ``tdvmcalls``
    fields over and over: its rows then share their frozen :class:`CallRef` values)."""
    calls, remarks = _parse_calls_once(text)
    return list(calls), list(remarks)


@functools.lru_cache(maxsize=4096)
def _parse_calls_once(text: str) -> tuple[tuple[CallRef, ...], tuple[str, ...]]:
    calls, remarks = _parse_calls(text)
    return tuple(calls), tuple(remarks)


def _parse_calls(text: str) -> tuple[list[CallRef], list[str]]:
    """Parse a ``tdvmcalls`` field into calls and remarks.  The grammar, in order of the tokens:

    - ``all`` alone, or followed by words that do not start with a call name (``all selftest
      calls``): every call KVM implements (:data:`ALL_KVM_CALLS`), the words kept as a remark;
      ``all:`` (or ``all``) followed by call names: the site's one mask serves all of the listed
      calls (the prefix is then only a remark);
    - ``NAME`` or ``NAME(annotation)``: a call (:data:`CALL_NAMES`, a leaf name, or
      :data:`FOREIGN_CALLS`); the annotation is kept as a remark on that call;
    - after a name, in any order: ``QUALIFIER VALUE`` (:data:`INPUT_QUALIFIERS`, e.g. ``CPUID leaf
      0xB``) pins that input; a bare number (:data:`POSITIONAL_INPUTS`, ``RDMSR 0x802``) pins the MSR
      index; a direction word (:data:`CASE_WORDS`, ``IO in``, ``MMIO write``) runs only that case;
    - ``FAMILY A B``: ``FAMILY.A FAMILY.B`` (:data:`FAMILY_WORDS`);
    - ``(text)`` on its own: a remark on the row (a comment: it changes no call);
    - ``and ...``: the rest is a remark (the list is not exhaustive).

    Raises :class:`CatalogError` for an unknown name, a bad or twice-pinned value, or unbalanced
    parentheses."""
    if text.count("(") != text.count(")"):
        raise CatalogError(f"unbalanced parentheses in {text!r}")
    tokens = _TOKEN.findall(text)
    calls: list[CallRef] = []
    remarks: list[str] = []
    family: str | None = None
    i = 0
    if tokens and tokens[0].lower() in ("all", "all:"):
        words = [t for t in tokens[1:] if not t.startswith("(")]
        if tokens[0].lower() == "all" and not (words and _names_a_call(words[0])):
            calls += [CallRef(name, "all") for name in ALL_KVM_CALLS]
            if words:
                remarks.append(" ".join(["all", *words]))
            remarks += [t[1:-1].strip() for t in tokens[1:] if t.startswith("(")]
            return calls, remarks
        remarks.append("one mask for all of these calls")
        i = 1
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok.startswith("("):
            remarks.append(tok[1:-1].strip())
            continue
        if tok.lower() in REMARK_WORDS:
            remarks.append(" ".join(tokens[i - 1 :]))
            break
        word, _, annotation = tok.partition("(")
        annotation = annotation[:-1].strip() if annotation else ""
        if word.lower() in _FAMILIES:
            family = _FAMILIES[word.lower()]
            continue
        names = _NAMES.get(word.lower())
        if names is None and family is not None:
            names = _NAMES.get(f"{family}.{word}".lower())
        if names is None:
            raise CatalogError(f"unknown call name {word!r}; accepted: {', '.join(accepted_names())}")
        if not (family and names[0].startswith(family + ".")):
            family = None
        start = i
        pinned, cases, i = _modifiers(word, names[0], tokens, i)
        qualifier = " ".join(tokens[start:i])
        for name in names:
            calls.append(
                CallRef(name, word, annotation, pinned, FOREIGN_CALLS.get(name), cases=cases, qualifier=qualifier)
            )
    if not calls:
        raise CatalogError(f"no call named in {text!r}; accepted: {', '.join(accepted_names())}")
    return calls, remarks


def _modifiers(
    word: str, leaf: str, tokens: list[str], i: int
) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...], int]:
    """The qualifiers, positional values and direction words after a call name, from token ``i``:
    the pinned inputs, the selected cases and the index of the next token."""
    quals = INPUT_QUALIFIERS.get(leaf, {})
    positional = POSITIONAL_INPUTS.get(leaf)
    case_words = CASE_WORDS.get(leaf, {})
    pinned: dict[str, int] = {}
    cases: list[str] = []

    def pin(reg: str, value_text: str, what: str) -> None:
        try:
            value = parse_int(value_text, what)
        except ValueError as e:
            raise CatalogError(str(e)) from None
        if reg in pinned:
            raise CatalogError(f"{word}: {reg} is pinned twice ({pinned[reg]:#x} and {value:#x})")
        pinned[reg] = value

    while i < len(tokens):
        tok = tokens[i].lower()
        if tok in quals and i + 1 < len(tokens):
            pin(quals[tok], tokens[i + 1], f"{word} {tokens[i]}")
            i += 2
        elif positional is not None and tok[:1].isdigit():
            pin(positional, tokens[i], f"{word} index")
            i += 1
        elif tok in case_words:
            cases += [case_words[tok]] if case_words[tok] not in cases else []
            i += 1
        else:
            break
    return tuple(pinned.items()), tuple(cases), i


def parse_mask(text: str) -> int:
    """The control value of a row: decimal or ``0x`` hex, at most 64 bits."""
    try:
        return parse_int(text, "mask")
    except ValueError as e:
        raise CatalogError(str(e).removeprefix("mask: ")) from None


# --- loading ---------------------------------------------------------------------------------------
def shipped_catalog_text() -> str:
    return data_file("guest-masks.csv").read_text()


def _read_catalog_file(path: str | Path) -> str | None:
    """The text of a catalog that is not a regular file (a pipe: it can be read only once); None for
    a regular file, checked (at most 64 MiB, UTF-8) a block at a time and then read row by row each
    time a report goes over it (:meth:`Catalog.rows`), never held whole."""
    limit = 64 << 20  # /dev/zero is not a catalog
    try:
        with Path(path).open("rb") as f:
            if stat.S_ISREG(os.fstat(f.fileno()).st_mode) and _utf8_within(f, limit):
                return None
            if f.seekable():
                f.seek(0)
            data = f.read(limit + 1)  # a pipe, or a file that fails: read whole, for the error's words
    except OSError as e:
        raise CatalogError(f"{path}: cannot read the catalog ({e.strerror or e})") from None
    if len(data) > limit:
        raise CatalogError(f"{path}: holds more than 64 MiB; not a catalog")
    try:
        return data.decode("utf-8-sig")  # a spreadsheet's BOM is not part of the first column's name
    except UnicodeDecodeError as e:
        raise CatalogError(f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def _utf8_within(f: BinaryIO, limit: int) -> bool:
    """Whether the file holds UTF-8 text of at most ``limit`` bytes, read a block at a time."""
    decoder, size = codecs.getincrementaldecoder("utf-8")(), 0
    try:
        while block := f.read(1 << 20):
            size += len(block)
            if size > limit:
                return False
            decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text`` with their ends, one at a time (``io.StringIO`` would copy the whole
    text at four bytes a character)."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


@dataclass(frozen=True)
class Catalog:
    """A catalog's text, read once (at most 64 MiB), and the name errors give it.  :meth:`rows`
    parses it row by row each time it is iterated: a report can go over a large catalog more than
    once without holding every row."""

    text: str
    where: str
    path: Path | None = None  # a regular file, read row by row (``text`` is then empty)

    @classmethod
    def read(cls, path: str | Path | None = None, text: str | None = None) -> Catalog:
        """The shipped catalog (``path`` and ``text`` None), a file, or ``text`` already read (from
        standard input: named ``path``, or "standard input")."""
        if text is not None:
            return cls(text, str(path) if path is not None else "standard input")
        if path is None:
            return cls(shipped_catalog_text(), "guest-masks.csv")
        read = _read_catalog_file(path)
        return cls(read, str(path)) if read is not None else cls("", str(path), Path(path))

    def _text_lines(self) -> Iterator[str]:
        """The catalog's lines with their ends, from the file each time when it is a regular file."""
        if self.path is None:
            yield from _lines(self.text)
            return
        try:
            with self.path.open("rb") as f:  # lines end at b"\n" only, as in :func:`_lines`
                for n, line in enumerate(f):
                    yield line.decode("utf-8-sig" if n == 0 else "utf-8")
        except OSError as e:
            raise CatalogError(f"{self.where}: cannot read the catalog ({e.strerror or e})") from None
        except UnicodeDecodeError:  # changed since it was read
            raise CatalogError(f"{self.where}: no longer UTF-8 text (changed while checked?)") from None

    def header(self) -> tuple[list[str], list[str]]:
        """The columns and the header's errors (unknown columns).  A missing column or a column
        named twice raise :class:`CatalogError` (no row could be read right)."""
        line = next(self._text_lines(), "").partition("\n")[0]
        first = next(csv.reader(io.StringIO(line)), [])
        columns = [c.strip() for c in first]
        missing = [c for c in CATALOG_COLUMNS if c not in columns and c != "note"]
        if missing:
            raise CatalogError(
                f"{self.where}: missing column(s) {', '.join(missing)}; expected: {','.join(CATALOG_COLUMNS)}"
            )
        if twice := list(dict.fromkeys(c for c in columns if columns.count(c) > 1 and c)):
            raise CatalogError(
                f"{self.where} line 1: the header names column(s) {', '.join(map(repr, twice))} more than once; "
                "which field is which cannot be told"
            )
        errors = []
        if unknown := [c for c in columns if c not in CATALOG_COLUMNS]:
            errors.append(
                f"{self.where}: unknown column(s) {', '.join(map(repr, unknown))}; expected: {','.join(CATALOG_COLUMNS)}"
            )
        return columns, errors

    def rows(self) -> Iterator[Site | str]:
        """Every row after the header, in order: a :class:`Site`, or one error line for a bad row
        (``<file> row <n>: <why>``, ``<file> row <n>, field <name>: <why>``; ``<n>`` is the line
        number in the file, the header being line 1)."""
        columns, _ = self.header()
        where = self.where
        reader = csv.reader(self._text_lines())
        next(reader, None)
        end = reader.line_num  # the line the previous record ended on
        while True:
            try:
                fields = next(reader, None)
            except csv.Error as e:  # e.g. a line break inside a field that is not quoted (a lone CR)
                raise CatalogError(f"{where} row {reader.line_num}: not CSV ({e})") from None
            if fields is None:
                break
            line, end = end + 1, reader.line_num
            if not fields:  # a blank line
                continue
            if end > line:  # a quoted field ran over line ends: an unterminated quote swallows rows
                yield (
                    f"{where} row {line}: a quoted field opened on line {line} runs on to line {end} (a quote "
                    f"not closed on its line?); lines {line}-{end} not checked"
                )
                continue
            if len(fields) > len(columns):
                yield (
                    f"{where} row {line}: {len(fields) - len(columns)} field(s) more than the header's "
                    f"{len(columns)} (a comma in an unquoted field?); row not checked"
                )
                continue
            row = dict(zip(columns, fields))
            if not any(v.strip() for v in fields):
                yield f"{where} row {line}: every field is empty; row not checked"
                continue
            if lacking := [c for c in columns[len(fields) :] if c in CATALOG_COLUMNS and c != "note"]:
                yield (
                    f"{where} row {line}: {len(fields)} field(s) of the header's {len(columns)}, no "
                    f"{', '.join(lacking)} (a missing comma?); row not checked"
                )
                continue
            field_name = "mask_hex"
            try:
                mask = parse_mask(row["mask_hex"])
                field_name = "tdvmcalls"
                calls, remarks = _parse_calls_once(row["tdvmcalls"])
            except CatalogError as e:
                yield f"{where} row {line}, field {field_name}: {e}"
                continue
            yield Site(
                line,
                *(sys.intern(row[c].strip()) for c in ("guest", "snapshot", "file")),
                row["function"].strip(),
                mask,
                calls,
                remarks,
                row.get("note", "").strip(),
            )


def load_catalog(path: str | Path | None = None, text: str | None = None) -> tuple[list[Site], list[str]]:
    """Read a catalog (the shipped one if ``path`` and ``text`` are None; ``text`` is a catalog
    already read, e.g. from standard input, named ``path`` or "standard input" in errors).  Returns
    the good sites and one error line per bad row (``<file> row <n>, field <name>: <why>``); a bad
    row does not stop the others.  An unreadable file, missing columns or a column named twice
    raise :class:`CatalogError`.  (:class:`Catalog` reads the rows one at a time.)"""
    catalog = Catalog.read(path, text)
    _, errors = catalog.header()
    sites: list[Site] = []
    for row in catalog.rows():
        if isinstance(row, Site):
            sites.append(row)
        else:
            errors.append(row)
    return sites, errors


def what_if(mask: str, calls: Iterable[str] | None) -> Site:
    """A single what-if site from ``--mask`` and ``--call`` (all KVM calls when none is given)."""
    value = parse_mask(mask)
    text = " ".join(calls or ()) or "all"
    refs, remarks = parse_calls(text)
    return Site(0, "what-if", "", "", f"--mask {value:#x}", value, tuple(refs), tuple(remarks))


# --- the check -------------------------------------------------------------------------------------
@dataclass(slots=True)
class CallCheck:
    """The check of one call at one site: the site, the call as the catalog names it, and its
    :class:`~tdvmcall.judge.Judgement` (the module's outcome, the verdict per policy, the cases
    run, the notes), whose parts it exposes under the same names."""

    site: Site
    call: CallRef
    judgement: Judgement

    @property
    def module(self) -> ModuleOutcome:
        return self.judgement.module

    @property
    def verdict(self) -> dict[str, str]:  # policy -> verdict
        return self.judgement.verdict

    @property
    def runs(self) -> list[CaseRun]:
        return self.judgement.runs

    @property
    def unused(self) -> list[str]:  # exposed GPRs the call neither reads nor writes
        return self.judgement.unused

    @property
    def notes(self) -> list[str]:  # the exposure notes, then call_notes
        return self.judgement.notes

    @property
    def call_notes(self) -> list[str]:  # the notes about the call, not the exposure
        return self.judgement.call_notes

    def passes(self, policy: str) -> bool:
        return self.judgement.passes(policy)

    def refusals(self) -> list[CaseRun]:
        return self.judgement.refusals()

    def silences(self) -> list[CaseRun]:
        return self.judgement.silences()


def cases_for(call: CallRef) -> list[L.Case]:
    """The cases a catalog call runs: the leaf's cases (one per condition; only those a direction
    word selects), or one case with the inputs a qualifier pinned, over the first of them."""
    leaf = call.leaf
    assert leaf is not None
    cases = [c for c in leaf.cases if not call.cases or c.name in call.cases]
    if not cases:
        raise ModelBug(f"{call.label}: {leaf.name} has no case named {' or '.join(call.cases)}")
    if not call.inputs:
        return cases
    pinned = dict(call.inputs)
    name = " ".join([*call.cases, *(f"{r}={v:#x}" for r, v in call.inputs)])
    return [L.Case(name, {**cases[0].regs, **pinned}, cases[0].platform)]


def site_unused(checks: Iterable[CallCheck]) -> list[str]:
    """The GPRs a site exposes that none of its calls reads or writes, under any condition: the
    over-exposure of the site as a whole.  A call that is not KVM's may use any register (KVM's
    table does not describe it), so a site making one has none."""
    checks = list(checks)
    unused = [set(c.unused) if c.call.leaf is not None else set() for c in checks]
    common = set.intersection(*unused) if unused else set()
    return [r for r in GPR_NAMES if r in common]


def check_call(site: Site, call: CallRef, host: Host, module: ModuleOutcome | None = None) -> CallCheck:
    """Check one call at one site: :func:`tdvmcall.judge.judge` of the site's mask and the call's
    leaf (None for a call that is not KVM's: ``not-kvm``), over the cases the row selects."""
    leaf = call.leaf
    cases = cases_for(call) if leaf is not None else None
    return CallCheck(site, call, judge(site.mask, leaf, host, module=module, cases=cases))


class Checker:
    """Checks calls against one host, judging each distinct (mask, call, cases, pinned inputs) once:
    a large catalog repeats the same few masks and calls, and a judgement depends on nothing else
    (the site's name, file and note are only shown).  The checks of equal calls share one
    :class:`~tdvmcall.judge.Judgement`, which nothing changes after it is made."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self._modules: dict[int, ModuleOutcome] = {}
        self._judged: dict[tuple, Judgement] = {}

    def check(self, site: Site) -> list[CallCheck]:
        """Every call of one site."""
        module = self._modules.get(site.mask)
        if module is None:
            module = self._modules[site.mask] = module_outcome(site.mask, self.host)
        out = []
        for call in site.calls:
            key = (site.mask, call.name, call.cases, call.inputs)
            judgement = self._judged.get(key)
            if judgement is None:
                judgement = self._judged[key] = check_call(site, call, self.host, module).judgement
            out.append(CallCheck(site, call, judgement))
        return out


def check_sites(sites: Iterable[Site], host: Host) -> list[CallCheck]:
    """Check every call of every site (each distinct call and mask judged once: :class:`Checker`)."""
    checker = Checker(host)
    results = []
    for site in sites:
        results += checker.check(site)
    return results


def summary(results: list[CallCheck]) -> dict:
    """Counts: sites, (site, call) pairs, and verdicts per policy (every verdict listed)."""
    return {
        "sites": len({id(r.site) for r in results}),
        "calls": len(results),
        **{p: {v: sum(r.verdict[p] == v for r in results) for v in VERDICTS} for p in POLICIES},
    }


def failing(results: list[CallCheck], policy: str) -> list[CallCheck]:
    return [r for r in results if not r.passes(policy)]
