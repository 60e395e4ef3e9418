"""The hardened validation as C: a table and a function generated from the leaf table.

What is generated is phase (b) of the ``hardened`` policy in ``kvm/tdx.py`` (``handle_tdvmcall()``),
the check that runs before dispatch, nothing else:

1. dispatch as ``leaves.lookup()`` does: R10 != 0 is a KVM hypercall number, else R11 is the GHCI
   leaf; an unknown number gets the model's fallback row (``lookup()`` asked for one);
2. the registers the call needs: its selectors and required inputs (``leaves.required_inputs()``)
   and every output it may write (``leaves.possible_outputs()``), each under its condition
   (``Cond``) evaluated on the values the VMM received (0 for an unexposed register, as the TDX
   module hands them);
3. the verdict, in the model's order: R10 not exposed -> no status can reach the guest (the model's
   ``internal_error``); a missing input or an unexposed output -> refuse with INVALID_OPERAND (the
   model's ``refused``); else dispatch.

The table is data (one row per call, one row per condition), the logic a few lines that read it,
as the TDX module keeps its generated tables apart from its logic.  Every row is read from
``leaves.LEAVES`` and ``leaves.lookup()``; nothing here names a call.  A condition, operand or
family this generator does not know raises :class:`GeneratorError`: it is never dropped.

The output is deterministic: the same model writes the same bytes (no date, no path, no host).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, fields

from .. import __version__
from ..abi.codes import EXIT_REASON_TDCALL
from ..abi.regs import GPR_NAMES, NR_GPRS, mask_of, reg_index
from ..kvm import leaves as L
from ..kvm.trees import DEFAULT_TREE, UnknownTreeError, tree_rule
from ..kvm.trees import check_tree as _check_tree

HEADER = "tdvmcall_regs.h"
SOURCE = "tdvmcall_regs.c"

#: what the generated C returns (the contract in the header), by the model's hardened verdict
RET_OK, RET_REFUSE, RET_NO_STATUS = 0, 1, 2

#: the Cond ops the generated C evaluates, as the model's ``Cond.holds()`` defines them
COND_OPS = {"eq": "TDVMCALL_COND_EQ", "in": "TDVMCALL_COND_IN", "bit": "TDVMCALL_COND_BIT"}
#: the fields of ``Cond`` and ``Operand`` this generator reads; a new field means a new meaning
KNOWN_COND_FIELDS = {"reg", "op", "value", "text", "width"}
KNOWN_OPERAND_FIELDS = {"reg", "role", "when", "required", "on"}
FAMILIES = ("ghci", "kvm-hypercall")
U64_MAX = (1 << 64) - 1
#: the tree the C is generated for unless one is named: the model's default (``kvm.trees.DEFAULT_TREE``)


class GeneratorError(Exception):
    """The leaf table holds something the generator cannot express in C (a bug of the generator,
    to be fixed here, never a row silently left out)."""


# --- the rows, as plain data --------------------------------------------------------------------
@dataclass(frozen=True)
class CCond:
    """One condition of one call: when ``reg``'s low ``width`` bits satisfy ``op``/``values``, the
    call also needs ``inputs`` exposed and may write ``outputs``."""

    text: str
    reg: int
    op: str
    values: tuple[int, ...]
    width: int
    inputs: int
    outputs: int


@dataclass(frozen=True)
class CLeaf:
    """One call: the number that selects it, the registers it always needs and may always write,
    and its conditions."""

    name: str
    ident: str
    nr: int | None  # GHCI leaf (R11) or hypercall number (R10); None for a fallback row
    inputs: int  # selectors and unconditional required inputs
    outputs: int  # unconditional outputs
    conds: tuple[CCond, ...]
    source: str
    bus_lock: bool = False  # still selected (by R11 alone) when the exit reason says a bus lock was detected


def _ident(name: str) -> str:
    """A C identifier from a call's name: ``#VE.RequestMMIO`` -> ``ve_request_mmio``."""
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", s)
    s = re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_").lower()
    if not s or s[0].isdigit():
        raise GeneratorError(f"{name!r}: no C identifier can be made of this call's name")
    return s


def _gpr(reg: str, where: str) -> int:
    try:
        i = reg_index(reg)
    except KeyError as e:
        raise GeneratorError(f"{where}: {e.args[0]}") from None
    if i >= NR_GPRS:
        raise GeneratorError(f"{where}: {reg!r} is not a GPR; the C checks GPRs only")
    return i


def _check_fields(obj: object, known: set[str], where: str) -> None:
    """A field this generator does not read must keep its default: a new field is a new meaning."""
    for f in fields(obj):  # type: ignore[arg-type]
        if f.name not in known and getattr(obj, f.name) != f.default:
            raise GeneratorError(
                f"{where}: {type(obj).__name__}.{f.name} = {getattr(obj, f.name)!r} is not known to the C generator"
            )


def c_cond_values(cond: L.Cond, where: str) -> tuple[int, ...]:
    """The values of a condition as the C table holds them, after checking the generator can
    express it exactly as ``Cond.holds()`` decides it."""
    _check_fields(cond, KNOWN_COND_FIELDS, where)
    if cond.op not in COND_OPS:
        raise GeneratorError(
            f"{where}: condition op {cond.op!r} ({cond.text}) is not known to the C generator; known: {', '.join(COND_OPS)}"
        )
    if not isinstance(cond.width, int) or isinstance(cond.width, bool) or not 1 <= cond.width <= 64:
        raise GeneratorError(f"{where}: condition width {cond.width!r} ({cond.text}) is not 1..64")
    limit = (1 << cond.width) - 1
    if cond.op == "in":
        if not isinstance(cond.value, tuple) or not cond.value:
            raise GeneratorError(f"{where}: 'in' needs a non-empty tuple of values, got {cond.value!r}")
        values = cond.value
    else:
        if not isinstance(cond.value, int) or isinstance(cond.value, bool):
            raise GeneratorError(f"{where}: {cond.op!r} needs one integer, got {cond.value!r}")
        values = (cond.value,)
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise GeneratorError(f"{where}: condition value {v!r} is not an integer")
        if cond.op == "bit" and not 0 <= v < cond.width:
            raise GeneratorError(f"{where}: bit {v} is outside the condition's {cond.width} bits")
        if cond.op != "bit" and not 0 <= v <= limit:
            raise GeneratorError(
                f"{where}: value {v:#x} does not fit the condition's {cond.width} bits (it can never hold)"
            )
    return values


def leaf_row(leaf: L.Leaf, nr: int | None) -> CLeaf:
    """One call as a C row: selectors and unconditional operands folded into two masks, one
    condition row per distinct ``Cond`` (inputs and outputs under one condition share its row).
    Optional inputs (``required=False``) never refuse a call (``leaves.required_inputs()``), so
    they are not in the C."""
    if leaf.family not in FAMILIES:
        raise GeneratorError(f"{leaf.name}: family {leaf.family!r} is not known to the C generator")
    inputs = mask_of(_gpr(r, f"{leaf.name} selector") for r in leaf.selectors)
    outputs = 0
    conds: dict[L.Cond, list[int]] = {}  # Cond -> [inputs, outputs], in table order
    for kind, ops in (("input", leaf.inputs), ("output", leaf.outputs)):
        for op in ops:
            where = f"{leaf.name} {kind} {op.reg}"
            _check_fields(op, KNOWN_OPERAND_FIELDS, where)
            bit = 1 << _gpr(op.reg, where)
            if kind == "input" and not op.required:
                continue
            if op.when is None:
                if kind == "input":
                    inputs |= bit
                else:
                    outputs |= bit
                continue
            c_cond_values(op.when, where)
            _gpr(op.when.reg, f"{where} condition")
            row = conds.setdefault(op.when, [0, 0])
            row[0 if kind == "input" else 1] |= bit
    return CLeaf(
        name=leaf.name,
        ident=_ident(leaf.name),
        nr=nr,
        inputs=inputs,
        outputs=outputs,
        conds=tuple(
            CCond(c.text, _gpr(c.reg, leaf.name), c.op, c_cond_values(c, leaf.name), c.width, i, o)
            for c, (i, o) in conds.items()
        ),
        source=leaf.source,
    )


@dataclass(frozen=True)
class Table:
    """Everything the C holds: the GHCI rows (by R11), the hypercall rows (by R10) and the two
    fallbacks ``lookup()`` gives an unknown number."""

    ghci: tuple[CLeaf, ...]
    hypercalls: tuple[CLeaf, ...]
    unknown_ghci: CLeaf
    unknown_hypercall: CLeaf
    unknown_bus_lock: CLeaf | None  # a bus-lock exit whose R11 no row takes; None: the tree re-labels it
    tree: str = DEFAULT_TREE

    @property
    def rows(self) -> tuple[CLeaf, ...]:
        bl = () if self.unknown_bus_lock is None else (self.unknown_bus_lock,)
        return self.ghci + self.hypercalls + (self.unknown_ghci, self.unknown_hypercall, *bl)

    @property
    def max_values(self) -> int:
        return max([len(c.values) for row in self.rows for c in row.conds] + [1])


def _unused(taken: set[int]) -> tuple[int, int]:
    """Two numbers no row takes (non-zero), to ask ``lookup()`` for its fallback twice."""
    free = [n for n in (U64_MAX, 0x7777_7777, *range(1, 64)) if n not in taken]
    return free[0], free[1]


def _same_operands(a: L.Leaf, b: L.Leaf) -> bool:
    return (a.family, a.inputs, a.outputs) == (b.family, b.inputs, b.outputs)


def check_tree(tree: str) -> str:
    """A tree of the model (``kvm.trees.check_tree``), else :class:`GeneratorError`."""
    try:
        return _check_tree(tree)
    except UnknownTreeError as e:
        raise GeneratorError(f"tree: {e}") from None


def model_lookup(tree: str) -> Callable[[int, int, bool], L.Leaf]:
    """The model's dispatch of a TDVMCALL exit in ``tree``: (R10, R11, bus lock) -> the call KVM runs.
    The generator never decides how a tree differs; it asks the model: the tree's rule,
    ``kvm.trees.TREES[tree].lookup`` (a bus-lock exit dispatched on R11 alone in kvm-x86 and v6.16,
    re-labelled by its leaf in v7.3)."""
    check_tree(tree)
    return tree_rule(tree).lookup


def build_table(leaves: tuple[L.Leaf, ...] | None = None, tree: str = DEFAULT_TREE) -> Table:
    """The C table from the leaf table, with the dispatch checked against ``leaves.lookup()``: every
    row must be what ``lookup()`` selects for its number, and the fallback rows are what it answers
    for numbers no row takes (the same for two different ones, else the fallback depends on the
    number and a single C row could not express it)."""
    leaves = L.LEAVES if leaves is None else leaves
    ghci: list[CLeaf] = []
    hcs: list[CLeaf] = []
    for leaf in leaves:
        if leaf.family not in FAMILIES:
            raise GeneratorError(f"{leaf.name}: family {leaf.family!r} is not known to the C generator")
        sel = leaf.selector_values()
        nr = sel["r10"] if leaf.family == "kvm-hypercall" else sel["r11"]
        if not 0 <= nr <= U64_MAX:
            raise GeneratorError(f"{leaf.name}: number {nr!r} does not fit 64 bits")
        if L.lookup(sel["r10"], sel.get("r11", 0)) is not leaf:
            raise GeneratorError(f"{leaf.name}: leaves.lookup() does not select this row for its own number {nr:#x}")
        (hcs if leaf.family == "kvm-hypercall" else ghci).append(leaf_row(leaf, nr))
    fallbacks = []
    for family, rows in (("ghci", ghci), ("kvm-hypercall", hcs)):
        a, b = _unused({r.nr for r in rows if r.nr is not None})
        pick = (lambda n: L.lookup(0, n)) if family == "ghci" else (lambda n: L.lookup(n, 0))
        fa, fb = pick(a), pick(b)
        if fa.family != family or not _same_operands(fa, fb):
            raise GeneratorError(f"leaves.lookup(): the fallback for an unknown {family} number is not one fixed row")
        fallbacks.append(leaf_row(fa, None))
    idents = [r.ident for r in ghci + hcs]
    if len(set(idents)) != len(idents):
        raise GeneratorError(
            f"two calls make the same C identifier: {sorted({i for i in idents if idents.count(i) > 1})}"
        )
    unknown_ghci = CLeaf(**{**fallbacks[0].__dict__, "name": "unknown GHCI leaf", "ident": "unknown_ghci"})
    unknown_hc = CLeaf(**{**fallbacks[1].__dict__, "name": "unknown hypercall", "ident": "unknown_hypercall"})
    ghci_bl, unknown_bl = _bus_lock_rows(leaves, ghci, hcs, model_lookup(tree))
    return Table(ghci_bl, tuple(hcs), unknown_ghci, unknown_hc, unknown_bl, tree)


# --- a bus-lock exit, which the model dispatches apart ------------------------------------------
#: bit 26 of a TD exit's reason says a bus lock was detected.  The model (``kvm/tdx.py``) follows
#: ``tdx_to_vmx_exit_reason()``, which compares the whole reason (low 32 bits) with TDCALL: a reason
#: whose basic part (15:0) is TDCALL but which is not exactly TDCALL is not re-labelled, and goes to
#: ``handle_tdvmcall()``, which dispatches on R11 alone (``leaves.lookup(..., bus_lock=True)``).
BUS_LOCK_RULE = "low 32 bits of RAX != TDCALL (77) and bits 15:0 == TDCALL"


def _bus_lock_rows(
    leaves: tuple[L.Leaf, ...], ghci: list[CLeaf], hcs: list[CLeaf], lookup: Callable[[int, int, bool], L.Leaf]
) -> tuple[tuple[CLeaf, ...], CLeaf | None]:
    """Which GHCI rows the tree's dispatch of a bus-lock exit still selects (by R11, whatever R10
    holds), and its fallback for the others; anything else (a hypercall row, an answer that depends
    on R10) is beyond one flag per row and one fallback row, and raises.  If the tree dispatches a
    bus-lock exit exactly as any other (it re-labels it by its leaf), there is nothing apart: the
    rows are returned as they are and the fallback is None (the C then never reads RAX)."""

    def pick(r10: int, r11: int) -> L.Leaf:
        return lookup(r10, r11, True)

    taken_r11 = {r.nr for r in ghci if r.nr is not None}
    taken_nr = {r.nr for r in hcs if r.nr is not None}
    other_r11 = _unused(taken_r11)
    r10s = (0, _unused(taken_nr)[0], *sorted(taken_nr)[:1])
    probes = [(r10, r.nr or 0) for r in ghci for r10 in r10s] + [(r.nr or 0, r11) for r in hcs for r11 in other_r11]
    probes += [(0, n) for n in other_r11] + [(r10s[1], n) for n in other_r11]
    if all(lookup(r10, r11, True) == lookup(r10, r11, False) for r10, r11 in probes):
        return tuple(ghci), None
    fallback = pick(0, other_r11[0])
    if fallback.family != "ghci" or not _same_operands(fallback, pick(r10s[1], other_r11[1])):
        raise GeneratorError("leaves.lookup(bus_lock=True): the fallback is not one fixed GHCI row")
    by_nr = {leaf.r11: leaf for leaf in leaves if leaf.family == "ghci"}
    out = []
    for row in ghci:
        leaf = by_nr[row.nr]
        got = [pick(r10, row.nr or 0) for r10 in r10s]
        if all(g is leaf for g in got):
            out.append(CLeaf(**{**row.__dict__, "bus_lock": True}))
        elif all(g is not leaf and _same_operands(g, fallback) for g in got):
            out.append(row)
        else:
            raise GeneratorError(
                f"{row.name}: under a bus lock, leaves.lookup() depends on R10; the C cannot express it"
            )
    for row in hcs:
        if not all(_same_operands(pick(row.nr or 0, r11), fallback) for r11 in other_r11):
            raise GeneratorError(f"{row.name}: under a bus lock, leaves.lookup() selects a hypercall row")
    unknown = leaf_row(fallback, None)
    return tuple(out), CLeaf(**{**unknown.__dict__, "name": "bus lock, other R11", "ident": "unknown_bus_lock"})


# --- the C text -----------------------------------------------------------------------------------
def _comment(text: str) -> str:
    """Text safe inside a C comment (no comment end, no line break)."""
    return " ".join(text.replace("*/", "* /").split())


def _names(mask: int) -> str:
    return " ".join(GPR_NAMES[i].upper() for i in range(NR_GPRS) if mask >> i & 1) or "none"


def _mask(mask: int) -> str:
    return f"0x{mask:04x}"


def _width_mask(width: int) -> str:
    return f"GENMASK_ULL({width - 1}, 0)"


def _hex(v: int) -> str:
    return f"{v:#x}" if v > 9 else str(v)


def _generator_line() -> str:
    return f"Generated by `tdvmcall export-c` from the leaf table of tdvmcall {__version__}"


def table_fingerprint(table: Table) -> str:
    """A short digest of every row the C holds: two outputs with the same fingerprint hold the same
    table (printed in both files' header)."""
    text = repr(table).encode()
    return hashlib.sha256(text).hexdigest()[:16]


def render_header(table: Table) -> str:
    regs = "\n".join(f"#define TDVMCALL_{name.upper()}\t{i}" for i, name in enumerate(GPR_NAMES))
    return f"""\
/* SPDX-License-Identifier: GPL-2.0-only OR MIT */
/*
 * tdvmcall_regs.h - validate the GPRs a TD exposed on a TDVMCALL exit
 *
 * {_generator_line()}
 * (src/tdvmcall/kvm/leaves.py), table {table_fingerprint(table)}: {len(table.rows)} rows, \
{sum(len(r.conds) for r in table.rows)} conditions.
 * For the model's KVM tree {table.tree}. Do not edit: change the leaf table and run
 * `tdvmcall export-c DIR --tree {table.tree}` again (--check tells a copy has drifted).
 * It decides what the model's hardened policy decides (kvm/tdx.py); see docs/kvm.md.
 */
#ifndef TDVMCALL_REGS_H
#define TDVMCALL_REGS_H

#ifdef __KERNEL__
#include <linux/types.h>
#else
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
#endif

/* GPR numbers: KVM's enum kvm_reg order, also the bit of each GPR in the TDX GPR-select mask */
{regs}

#define TDVMCALL_REGS_OK\t{RET_OK} /* dispatch the call */
#define TDVMCALL_REGS_REFUSE\t{RET_REFUSE} /* R10 = TDVMCALL_STATUS_INVALID_OPERAND, run nothing */
#define TDVMCALL_REGS_NO_STATUS\t{RET_NO_STATUS} /* R10 not exposed: no status can reach the guest */

/**
 * tdvmcall_check_regs() - check a TDVMCALL's exposed GPRs before dispatching it
 * @regs: the 16 GPRs as the TDX module hands them to the VMM, indexed by register
 *	number (RAX=0, RCX=1, RDX=2, RBX=3, RSP=4, RBP=5, RSI=6, RDI=7, R8..R15=8..15);
 *	regs[1] is the exit qualification, bits 15:0 the GPRs the guest exposed. An
 *	unexposed GPR reads as 0.
 * @missing: set to the required inputs that are not exposed (bit n = register n).
 * @unexposed: set to the outputs this call may write that are not exposed.
 *
 * The call is the one KVM dispatches: R10 != 0 is a KVM hypercall number, else R11 the GHCI
 * leaf. It needs R10 (and R11 for a GHCI leaf), its required inputs and every output it may
 * write exposed, each under its condition on the input values.
 *
 * Return: %TDVMCALL_REGS_NO_STATUS if R10 is not exposed, else %TDVMCALL_REGS_REFUSE if
 * *@missing or *@unexposed is not empty, else %TDVMCALL_REGS_OK. Both masks are set in
 * every case.
 */
int tdvmcall_check_regs(const u64 regs[16], u64 *missing, u64 *unexposed);

#endif /* TDVMCALL_REGS_H */
"""


def _render_conds(row: CLeaf, nvals: int) -> str:
    if not row.conds:
        return ""
    out = [f"static const struct tdvmcall_cond tdvmcall_conds_{row.ident}[] = {{"]
    for c in row.conds:
        vals = ", ".join(str(v) if c.op == "bit" else _hex(v) for v in c.values)
        lines = [
            f"\t{{\t/* {_comment(row.name)}: {_comment(c.text)} */",
            f"\t\t.reg = TDVMCALL_{GPR_NAMES[c.reg].upper()}, .op = {COND_OPS[c.op]}, "
            f".width_mask = {_width_mask(c.width)},",
            f"\t\t.values = {{ {vals} }}, .nr_values = {len(c.values)},",
        ]
        if c.inputs:
            lines.append(f"\t\t.inputs = {_mask(c.inputs)},\t/* {_names(c.inputs)} */")
        if c.outputs:
            lines.append(f"\t\t.outputs = {_mask(c.outputs)},\t/* {_names(c.outputs)} */")
        lines.append("\t},")
        out += lines
    out.append("};")
    return "\n".join(out) + "\n\n"


def _source_comment(text: str, indent: str) -> list[str]:
    """The row's source as a C comment, wrapped to fit 100 columns (tabs count 8)."""
    width = 100 - 8 * len(indent) - 3
    words = _comment(text).split()
    lines: list[str] = []
    for w in words:
        if lines and len(lines[-1]) + 1 + len(w) <= width - 3:
            lines[-1] += " " + w
        else:
            lines.append(w)
    if len(lines) == 1 and len(lines[0]) <= width - 3:
        return [f"{indent}/* {lines[0]} */"]
    return [f"{indent}/*"] + [f"{indent} * {line}" for line in lines] + [f"{indent} */"]


def _render_row(row: CLeaf, indent: str = "\t") -> str:
    lines = [f"{indent}{{\t/* {_comment(row.name)} */"]
    lines += _source_comment(row.source, indent + "\t")
    if row.nr is not None:
        lines.append(f"{indent}\t.nr = {row.nr:#x},")
    lines.append(f"{indent}\t.inputs = {_mask(row.inputs)},\t/* {_names(row.inputs)} */")
    lines.append(f"{indent}\t.outputs = {_mask(row.outputs)},\t/* {_names(row.outputs)} */")
    if row.conds:
        lines.append(f"{indent}\t.conds = tdvmcall_conds_{row.ident},")
        lines.append(f"{indent}\t.nr_conds = ARRAY_SIZE(tdvmcall_conds_{row.ident}),")
    if row.bus_lock:
        lines.append(f"{indent}\t.bus_lock = 1,")
    lines.append(f"{indent}}},")
    return "\n".join(lines)


def _render_fallback(row: CLeaf) -> str:
    body = _render_row(row, indent="").split("\n")
    body[0] = f"static const struct tdvmcall_leaf tdvmcall_{row.ident} = {{"
    body[-1] = "};"
    return "\n".join(body)


def render_source(table: Table) -> str:
    nvals = table.max_values
    conds = "".join(_render_conds(r, nvals) for r in table.rows)
    ghci = "\n".join(_render_row(r) for r in table.ghci)
    hcs = "\n".join(_render_row(r) for r in table.hypercalls)
    bl = table.unknown_bus_lock
    bl_doc = " * @bus_lock: still selected, by R11 alone, when the exit reason says a bus lock was detected\n"
    if bl is None:
        bl_doc = f" * @bus_lock: never set: in {table.tree} KVM re-labels a bus-lock exit by its leaf like any other\n"
    bl_field = "\tu32 bus_lock;\n"
    bl_define = f"#define TDVMCALL_EXIT_REASON_TDCALL\t{EXIT_REASON_TDCALL}\n"
    bl_rows = (
        ""
        if bl is None
        else f"""
/* {_comment(bl.name)}: a bus-lock exit whose R11 no row above takes */
{_render_fallback(bl)}

/*
 * A TDVMCALL exit whose reason also says a bus lock was detected (bit 26) is not re-labelled
 * by its leaf: KVM dispatches it on R11 alone. The rule: the low 32 bits of RAX are not TDCALL
 * ({EXIT_REASON_TDCALL}), but bits 15:0 are.
 */
static int tdvmcall_bus_lock(u64 rax)
{{
\tu64 reason = rax & GENMASK_ULL(31, 0);

\treturn reason != TDVMCALL_EXIT_REASON_TDCALL &&
\t       (reason & GENMASK_ULL(15, 0)) == TDVMCALL_EXIT_REASON_TDCALL;
}}
"""
    )
    if bl is None:
        bl_define = ""
    bl_lookup = (
        ""
        if bl is None
        else """\tif (tdvmcall_bus_lock(regs[TDVMCALL_RAX])) {
\t\tfor (i = 0; i < ARRAY_SIZE(tdvmcall_ghci_leaves); i++)
\t\t\tif (tdvmcall_ghci_leaves[i].bus_lock && tdvmcall_ghci_leaves[i].nr == r11)
\t\t\t\treturn &tdvmcall_ghci_leaves[i];
\t\treturn &tdvmcall_unknown_bus_lock;
\t}
"""
    )
    return f"""\
// SPDX-License-Identifier: GPL-2.0-only OR MIT
/*
 * tdvmcall_regs.c - validate the GPRs a TD exposed on a TDVMCALL exit
 *
 * {_generator_line()}
 * (src/tdvmcall/kvm/leaves.py), table {table_fingerprint(table)}.
 * For the model's KVM tree {table.tree}. Do not edit: change the leaf table and run
 * `tdvmcall export-c DIR --tree {table.tree}` again.
 *
 * The tables below say, for every call, which GPRs it reads and writes; the function at the end
 * reads them. Register roles follow arch/x86/kvm/vmx/tdx.c (each row names its function).
 */
#ifdef __KERNEL__
#include <linux/array_size.h>
#include <linux/bits.h>
#else
#define BIT_ULL(nr)		(1ULL << (nr))
#define GENMASK_ULL(h, l)	((~0ULL >> (63 - (h))) & (~0ULL << (l)))
#define ARRAY_SIZE(arr)		(sizeof(arr) / sizeof((arr)[0]))
#endif

#include "{HEADER}"

#define TDVMCALL_GPR_SELECT\tGENMASK_ULL(15, 0)\t/* exit qualification bits 15:0 */
#define TDVMCALL_COND_MAX_VALUES\t{nvals}
{bl_define}
enum tdvmcall_cond_op {{
\tTDVMCALL_COND_EQ,\t/* the register equals values[0] */
\tTDVMCALL_COND_IN,\t/* the register is one of values[0 .. nr_values - 1] */
\tTDVMCALL_COND_BIT,\t/* bit values[0] of the register is set */
}};

/**
 * struct tdvmcall_cond - registers a call needs only when an input has some value
 * @values: what the register is compared with (see &enum tdvmcall_cond_op)
 * @width_mask: the low bits of the register that count (KVM truncates some inputs to 32 bits)
 * @inputs: required inputs when the condition holds (bit n = register n)
 * @outputs: outputs the call may write when the condition holds
 * @reg: the register tested, as the VMM received it
 * @op: &enum tdvmcall_cond_op
 * @nr_values: how many of @values count (TDVMCALL_COND_IN)
 */
struct tdvmcall_cond {{
\tu64 values[TDVMCALL_COND_MAX_VALUES];
\tu64 width_mask;
\tu64 inputs;
\tu64 outputs;
\tu32 reg;
\tu16 op;
\tu16 nr_values;
}};

/**
 * struct tdvmcall_leaf - the GPRs one call reads and writes
 * @nr: the GHCI leaf (R11) or the KVM hypercall number (R10) that selects the call
 * @inputs: required inputs whatever the values, R10 (and R11 for a GHCI leaf) included
 * @outputs: outputs the call may write whatever the values
 * @conds: the registers it needs under conditions on its inputs
 * @nr_conds: the number of @conds
{bl_doc} */
struct tdvmcall_leaf {{
\tu64 nr;
\tu64 inputs;
\tu64 outputs;
\tconst struct tdvmcall_cond *conds;
\tu32 nr_conds;
{bl_field}}};

{conds}/* GHCI leaves, selected by R11 when R10 is 0 */
static const struct tdvmcall_leaf tdvmcall_ghci_leaves[] = {{
{ghci}
}};

/* KVM hypercalls, selected by a non-zero R10 */
static const struct tdvmcall_leaf tdvmcall_hypercalls[] = {{
{hcs}
}};

/* {_comment(table.unknown_ghci.name)}: an R11 no GHCI row takes */
{_render_fallback(table.unknown_ghci)}

/* {_comment(table.unknown_hypercall.name)}: an R10 no hypercall row takes */
{_render_fallback(table.unknown_hypercall)}
{bl_rows}
static const struct tdvmcall_leaf *tdvmcall_lookup(const u64 regs[16])
{{
\tconst struct tdvmcall_leaf *table = tdvmcall_ghci_leaves;
\tunsigned int i, n = ARRAY_SIZE(tdvmcall_ghci_leaves);
\tu64 r10 = regs[TDVMCALL_R10], r11 = regs[TDVMCALL_R11];
\tu64 nr = r11;

{bl_lookup}\tif (r10) {{
\t\ttable = tdvmcall_hypercalls;
\t\tn = ARRAY_SIZE(tdvmcall_hypercalls);
\t\tnr = r10;
\t}}
\tfor (i = 0; i < n; i++)
\t\tif (table[i].nr == nr)
\t\t\treturn &table[i];
\treturn r10 ? &tdvmcall_unknown_hypercall : &tdvmcall_unknown_ghci;
}}

static int tdvmcall_cond_holds(const struct tdvmcall_cond *c, const u64 regs[16])
{{
\tu64 v = regs[c->reg] & c->width_mask;
\tunsigned int i;

\tswitch (c->op) {{
\tcase TDVMCALL_COND_EQ:
\t\treturn v == c->values[0];
\tcase TDVMCALL_COND_IN:
\t\tfor (i = 0; i < c->nr_values; i++)
\t\t\tif (v == c->values[i])
\t\t\t\treturn 1;
\t\treturn 0;
\tcase TDVMCALL_COND_BIT:
\t\treturn (v >> c->values[0]) & 1;
\tdefault:
\t\treturn 0;
\t}}
}}

int tdvmcall_check_regs(const u64 regs[16], u64 *missing, u64 *unexposed)
{{
\tu64 exposed = regs[TDVMCALL_RCX] & TDVMCALL_GPR_SELECT;
\tconst struct tdvmcall_leaf *leaf = tdvmcall_lookup(regs);
\tu64 inputs = leaf->inputs, outputs = leaf->outputs;
\tunsigned int i;

\tfor (i = 0; i < leaf->nr_conds; i++) {{
\t\tif (tdvmcall_cond_holds(&leaf->conds[i], regs)) {{
\t\t\tinputs |= leaf->conds[i].inputs;
\t\t\toutputs |= leaf->conds[i].outputs;
\t\t}}
\t}}
\t*missing = inputs & ~exposed;
\t*unexposed = outputs & ~exposed;

\tif (!(exposed & BIT_ULL(TDVMCALL_R10)))
\t\treturn TDVMCALL_REGS_NO_STATUS;
\tif (*missing || *unexposed)
\t\treturn TDVMCALL_REGS_REFUSE;
\treturn TDVMCALL_REGS_OK;
}}
"""


def generate(leaves: tuple[L.Leaf, ...] | None = None, tree: str = DEFAULT_TREE) -> dict[str, str]:
    """The two files, by name, from the leaf table (``leaves.LEAVES`` unless given), for a tree of
    the model."""
    table = build_table(leaves, tree)
    return {HEADER: render_header(table), SOURCE: render_source(table)}
