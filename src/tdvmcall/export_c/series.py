"""The hardened validation as a KVM patch series (``tdvmcall export-c --series DIR --tree TREE``).

Three patches in ``git format-patch`` form, written against the kernel tree they are meant for (its
own ``arch/x86/kvm/vmx/tdx.c``, ``Makefile`` and ``Kconfig`` are read, so every context line is the
tree's, and ``git am`` applies the series to that tree unchanged):

1. the generated ``tdvmcall_regs.{h,c}`` (``generate.py``, for the tree's bus-lock rule) and the
   Makefile line that builds them into kvm-intel with TDX;
2. the call in KVM's TDVMCALL exit path: a helper that gathers the GPRs from ``vp_enter_args`` (RAX
   from ``vp_enter_ret``) and acts on the answer (REFUSE: R10 = INVALID_OPERAND and resume;
   NO_STATUS: ``KVM_EXIT_INTERNAL_ERROR`` with the missing and unexposed masks in ``data[]``),
   called in the function that switches on the re-labelled exit reason, before that switch;
3. a KUnit suite with its Kconfig option and ``.kunitconfig``: every hardened conformance vector
   KVM sees is a case, its expectation the model's answer for this tree, plus the tree's bus-lock
   rule as named cases; it builds into kvm-intel on x86 and, through ``arch/x86/um``, under UML,
   where ``kunit.py`` runs it in seconds without TDX hardware.

Where the glue goes is found by structure, not by name: the function that sends
``EXIT_REASON_TDCALL`` to ``handle_tdvmcall()`` (``__tdx_handle_exit()`` in 7.3,
``tdx_handle_exit()`` in 6.16), and its ``switch`` on the exit reason.  A tree in which that cannot
be found is refused (:class:`SeriesError`), never patched by guess.
"""

from __future__ import annotations

import difflib
import email.utils
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, scenario
from ..abi.regs import GPR_NAMES, hex64, mask_of
from ..console import output_files
from ..kvm import leaves as L
from ..kvm.trees import UnknownTreeError, tree_rule
from ..kvm.trees import check_tree as _check_tree
from . import generate as G

TDX_C = "arch/x86/kvm/vmx/tdx.c"
KVM_MAKEFILE = "arch/x86/kvm/Makefile"
KVM_KCONFIG = "arch/x86/kvm/Kconfig"
UM_MAKEFILE = "arch/x86/um/Makefile"
UM_KCONFIG = "arch/x86/um/Kconfig"
VMX_DIR = "arch/x86/kvm/vmx"
TEST_C = f"{VMX_DIR}/tdvmcall_regs_test.c"
KUNITCONFIG = f"{VMX_DIR}/.kunitconfig"
KCONFIG_SYMBOL = "KVM_TDVMCALL_REGS_KUNIT_TEST"
SUITE = "kvm_tdx_tdvmcall_regs"


class SeriesError(ValueError):
    """The tree, the corpus or the options do not allow a series: one line, said to the user."""


# --- the tree ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelTree:
    """The files of a kernel source tree the series touches, and its version."""

    root: Path
    version: tuple[int, int, int]
    files: dict[str, str]

    @property
    def release(self) -> str:
        return ".".join(map(str, self.version))


def read_tree(root: Path) -> KernelTree:
    """Read the version (top Makefile) and the files the series patches."""
    try:
        top = (root / "Makefile").read_text()
    except OSError as e:
        raise SeriesError(f"{root}: not a kernel source tree ({root / 'Makefile'}: {e.strerror})") from None
    version = []
    for key in ("VERSION", "PATCHLEVEL", "SUBLEVEL"):
        m = re.search(rf"^{key} = (\d+)$", top, re.M)
        if m is None:
            raise SeriesError(f"{root / 'Makefile'}: no '{key} = N' line; not a kernel source tree")
        version.append(int(m.group(1)))
    files = {}
    for rel in (TDX_C, KVM_MAKEFILE, KVM_KCONFIG, UM_MAKEFILE, UM_KCONFIG):
        try:
            files[rel] = (root / rel).read_text()
        except OSError as e:
            raise SeriesError(f"{root / rel}: cannot read ({e.strerror}); is this a tree with KVM TDX?") from None
    for rel in (G.HEADER, G.SOURCE, Path(TEST_C).name):
        if (root / VMX_DIR / rel).exists():
            raise SeriesError(f"{root / VMX_DIR / rel}: already there; the series is for a pristine tree")
    return KernelTree(root, (version[0], version[1], version[2]), files)


def tree_release(tree: str) -> tuple[int, int] | None:
    """The kernel release (major, minor) the model's tree describes, from its rule
    (``kvm.trees.TreeRule.version``); None for a development tree such as kvm-x86, which names no
    release."""
    return tree_rule(tree).version


def check_tree(tree: str, kernel: KernelTree) -> None:
    try:
        _check_tree(tree)
    except UnknownTreeError as e:
        raise SeriesError(f"--tree: {e}") from None
    want = tree_release(tree)
    if want is not None and kernel.version[:2] != want:
        raise SeriesError(
            f"{kernel.root} is Linux {kernel.release}, but --tree {tree} is the model of {want[0]}.{want[1]}; "
            "give the tree that matches the source"
        )


# --- finding the places to patch -----------------------------------------------------------------
FUNC_RE = re.compile(r"^(?:static\s+)?(?:noinstr\s+)?int\s+(\w+)\(struct kvm_vcpu \*vcpu(?:, [^)]*)?\)$")


@dataclass(frozen=True)
class Anchors:
    dispatcher: str  # the function that switches on the re-labelled exit reason
    func_line: int  # its first line (0-based)
    switch_line: int  # the line of its switch on the exit reason
    include_line: int  # the line after which the header is included


def find_anchors(tdx_c: str) -> Anchors:
    lines = tdx_c.splitlines()
    case = None
    for i, line in enumerate(lines):
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if line.strip() == "case EXIT_REASON_TDCALL:" and nxt == "return handle_tdvmcall(vcpu);":
            case = i
            break
    if case is None:
        raise SeriesError(
            f"{TDX_C}: no 'case EXIT_REASON_TDCALL: return handle_tdvmcall(vcpu);'; cannot place the check"
        )
    func = next((i for i in range(case, -1, -1) if FUNC_RE.match(lines[i])), None)
    if func is None or lines[func + 1] != "{":
        raise SeriesError(f"{TDX_C}: the function that dispatches TDCALL exits was not found")
    name = FUNC_RE.match(lines[func]).group(1)  # type: ignore[union-attr]
    switch = next(
        (i for i in range(case, func, -1) if re.fullmatch(r"\tswitch \(exit_reason\.basic\) \{", lines[i])), None
    )
    if switch is None:
        raise SeriesError(f"{TDX_C}: {name}() has no 'switch (exit_reason.basic)' before its TDCALL case")
    inc = [i for i, line in enumerate(lines[:func]) if line.startswith('#include "')]
    tdx_h = [i for i in inc if lines[i] == '#include "tdx.h"']
    if not inc:
        raise SeriesError(f"{TDX_C}: no local #include to place the header after")
    return Anchors(name, func, switch, (tdx_h or inc)[-1])


# --- the KUnit cases, from the model ---------------------------------------------------------------
@dataclass(frozen=True)
class KCase:
    name: str
    regs: tuple[int, ...]
    ret: int
    missing: int
    unexposed: int
    why: str = ""


VERDICT_RET = {"refused": G.RET_REFUSE, "internal_error": G.RET_NO_STATUS}


def _case_of(name: str, result: dict[str, Any], why: str = "") -> KCase:
    k = result["kvm"]
    regs = tuple(int(result["vmm"][n], 16) for n in GPR_NAMES)
    return KCase(
        name, regs, VERDICT_RET.get(k["verdict"], G.RET_OK), mask_of(k["missing"]), mask_of(k["unexposed_outputs"]), why
    )


def _answer(result: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    k = result["kvm"]
    return k["verdict"], sorted(k["missing"]), sorted(k["unexposed_outputs"])


def vector_cases(corpus: Path, tree: str) -> list[KCase]:
    """Every hardened vector of a conformance corpus (``tdvmcall vectors export``, docs/vectors.md)
    that reaches KVM, as a case: its scenario run by the model for ``tree``.  A vector whose
    recorded answer is not the model's for the tree it names is refused: the corpus is stale or
    from another implementation, and a suite must not be built on it."""
    try:
        index = json.loads((corpus / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise SeriesError(
            f"--vectors: {corpus / 'index.json'}: cannot read ({getattr(e, 'strerror', None) or e})"
        ) from None
    if (
        not isinstance(index, dict)
        or index.get("format") != "tdvmcall-vectors"
        or not isinstance(index.get("files"), list)
    ):
        raise SeriesError(f"--vectors: {corpus / 'index.json'} is not a tdvmcall-vectors index")
    out = []
    for entry in index["files"]:
        if entry.get("policy") != "hardened" or entry.get("verdict") == "module-refused":
            continue
        path = corpus / entry["file"]
        try:
            vector = json.loads(path.read_text())
            sc = vector["scenario"]
            recorded = vector["expected"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SeriesError(f"--vectors: {path}: not a readable vector ({e})") from None
        try:
            if _answer(scenario.run_json(sc)) != _answer(recorded):
                raise SeriesError(f"--vectors: {path}: its answer is not the model's; export the corpus again")
            result = scenario.run_json({**sc, "kvm": {**sc["kvm"], "tree": tree}})
        except scenario.ScenarioError as e:
            raise SeriesError(f"--vectors: {path}: {e}") from None
        # every case is a hardened one: the policy is left out of its name
        out.append(_case_of(str(vector["id"]).replace(".hardened.", "."), result))
    if not out:
        raise SeriesError(f"--vectors: {corpus} holds no hardened vector that reaches KVM")
    return out


def bus_lock_cases(tree: str) -> list[KCase]:
    """The tree's bus-lock rule as named cases: every call and case of the leaf table, on a TD exit
    whose reason says a bus lock was detected, with the call's own minimal mask and with R10 and R11
    alone; the answers are the model's for ``tree`` (``handle_tdvmcall()`` with its re-labelling)."""
    out = []
    seen = set()
    for leaf in (*L.LEAVES, L.UNKNOWN_HYPERCALL):
        for case in leaf.cases:
            regs = leaf.selector_values() | dict(case.regs)
            minimal = L.minimal_mask(leaf, regs)
            for label, mask in (("minimal", minimal), ("r10-r11", mask_of(("r10", "r11")))):
                guest = {n: hex64(v) for n, v in regs.items()} | {"rcx": hex64(mask)}
                sc = {
                    "td": {"module": "1.5", "no_rbp_mod": True, "bus_lock": True},
                    "kvm": {"policy": "hardened", "tree": tree},
                    "guest": guest,
                    "platform": dict(case.platform),
                }
                result = scenario.run_json(sc)
                if not result["module"]["exited"]:
                    continue
                name = f"bus_lock.{_slug(leaf.name)}.{_slug(case.name)}.{label}"
                if name in seen:
                    continue
                seen.add(name)
                k = result["kvm"]
                why = f"{leaf.name} ({case.name}) as {k['leaf']}: {k['verdict']}"
                out.append(_case_of(name, result, why))
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- the C of the glue and the test -----------------------------------------------------------------
VP_ENTER_ARGS = ("rcx", "rdx", "rbx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def glue_helper() -> list[str]:
    regs = [f"\t\t[TDVMCALL_{n.upper()}] = tdx->vp_enter_args.{n}," for n in VP_ENTER_ARGS]
    return [
        "/*",
        " * Check the GPRs a TDVMCALL exposed before KVM acts on it. The guest",
        " * exposes GPRs by the mask in RCX; an unexposed one reads as zero here and a",
        " * write to it never reaches the guest. tdvmcall_check_regs() wants every",
        " * register the call reads and every one it may write exposed. RSP and RBP",
        " * are never passed (vp_enter_args has no slot for them) and no call uses them.",
        " */",
        "static int tdx_check_tdvmcall_regs(struct kvm_vcpu *vcpu)",
        "{",
        "\tstruct vcpu_tdx *tdx = to_tdx(vcpu);",
        "\tu64 regs[16] = {",
        "\t\t[TDVMCALL_RAX] = tdx->vp_enter_ret,",
        *regs,
        "\t};",
        "\tu64 missing, unexposed;",
        "\tint ret;",
        "",
        "\tif ((u16)tdx->vp_enter_ret != EXIT_REASON_TDCALL)",
        "\t\treturn TDVMCALL_REGS_OK;",
        "",
        "\tret = tdvmcall_check_regs(regs, &missing, &unexposed);",
        "\tswitch (ret) {",
        "\tcase TDVMCALL_REGS_REFUSE:",
        "\t\ttdvmcall_set_return_code(vcpu, TDVMCALL_STATUS_INVALID_OPERAND);",
        "\t\tbreak;",
        "\tcase TDVMCALL_REGS_NO_STATUS:",
        "\t\t/* R10 is not exposed: no status can reach the guest. */",
        "\t\tvcpu->run->exit_reason = KVM_EXIT_INTERNAL_ERROR;",
        "\t\tvcpu->run->internal.suberror = KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON;",
        "\t\tvcpu->run->internal.ndata = 4;",
        "\t\tvcpu->run->internal.data[0] = tdx->vp_enter_ret;",
        "\t\tvcpu->run->internal.data[1] = vcpu->arch.last_vmentry_cpu;",
        "\t\tvcpu->run->internal.data[2] = missing;",
        "\t\tvcpu->run->internal.data[3] = unexposed;",
        "\t\tbreak;",
        "\tdefault:",
        "\t\tbreak;",
        "\t}",
        "\treturn ret;",
        "}",
        "",
    ]


GLUE_CALL = [
    "\t/* A TDVMCALL must expose the GPRs it reads and writes. */",
    "\tswitch (tdx_check_tdvmcall_regs(vcpu)) {",
    "\tcase TDVMCALL_REGS_REFUSE:",
    "\t\treturn 1;",
    "\tcase TDVMCALL_REGS_NO_STATUS:",
    "\t\treturn 0;",
    "\tdefault:",
    "\t\tbreak;",
    "\t}",
    "",
]

RET_NAMES = {
    G.RET_OK: "TDVMCALL_REGS_OK",
    G.RET_REFUSE: "TDVMCALL_REGS_REFUSE",
    G.RET_NO_STATUS: "TDVMCALL_REGS_NO_STATUS",
}


def _regs_init(regs: tuple[int, ...]) -> list[str]:
    items = [f"[TDVMCALL_{GPR_NAMES[i].upper()}] = {v:#x}," for i, v in enumerate(regs) if v]
    lines: list[str] = []
    for item in items:
        if lines and len(("\t\t\t" + lines[-1] + " " + item).expandtabs(8)) <= 100:
            lines[-1] += " " + item
        else:
            lines.append(item)
    return ["\t\t.regs = {", *[f"\t\t\t{ln}" for ln in lines], "\t\t},"] if lines else ["\t\t.regs = { 0 },"]


def _case_c(c: KCase) -> list[str]:
    out = ["\t{", f'\t\t.name = "{c.name}",']
    out += _regs_init(c.regs)
    out.append(f"\t\t.ret = {RET_NAMES[c.ret]},")
    if c.missing:
        out.append(f"\t\t.missing = {c.missing:#06x},")
    if c.unexposed:
        out.append(f"\t\t.unexposed = {c.unexposed:#06x},")
    out.append("\t},")
    return out


def render_test(tree: str, vectors: list[KCase], bus_lock: list[KCase], fingerprint: str) -> str:
    for c in vectors + bus_lock:
        if len(c.name) >= 128 or '"' in c.name or "\\" in c.name:
            raise SeriesError(f"case name {c.name!r} does not fit a KUnit parameter description")
    vec_c = [line for c in vectors for line in _case_c(c)]
    bl_c = [line for c in bus_lock for line in _case_c(c)]
    body = [
        "// SPDX-License-Identifier: GPL-2.0-only OR MIT",
        "/*",
        " * KUnit tests of tdvmcall_check_regs(): the answer for every hardened",
        " * conformance vector KVM sees, and for TDVMCALL exits that report a bus lock.",
        " *",
        f" * Generated by `tdvmcall export-c --series` (tdvmcall {__version__}) for the",
        f" * model's tree {tree}, table {fingerprint}. Do not edit: generate it again.",
        " */",
        "#include <kunit/test.h>",
        "",
        f'#include "{G.HEADER}"',
        "",
        "struct tdvmcall_regs_case {",
        "\tconst char *name;",
        "\tu64 regs[16];",
        "\tu64 missing;",
        "\tu64 unexposed;",
        "\tint ret;",
        "};",
        "",
        "/* The conformance vectors: each call of the leaf table at its boundary masks. */",
        "static const struct tdvmcall_regs_case tdvmcall_regs_vectors[] = {",
        *vec_c,
        "};",
        "",
        "/*",
        " * TDVMCALL exits whose reason has bit 26 set (a bus lock was detected), each",
        " * call with its own minimal mask and with R10 and R11 alone. Whether KVM",
        " * re-labels such an exit by its leaf differs between trees; these answers are",
        f" * the model's for {tree}.",
        " */",
        "static const struct tdvmcall_regs_case tdvmcall_regs_bus_lock[] = {",
        *bl_c,
        "};",
        "",
        "KUNIT_ARRAY_PARAM_DESC(tdvmcall_regs_vectors, tdvmcall_regs_vectors, name);",
        "KUNIT_ARRAY_PARAM_DESC(tdvmcall_regs_bus_lock, tdvmcall_regs_bus_lock, name);",
        "",
        "static void tdvmcall_regs_check(struct kunit *test)",
        "{",
        "\tconst struct tdvmcall_regs_case *c = test->param_value;",
        "\tu64 missing = ~0ULL, unexposed = ~0ULL;",
        "",
        "\tKUNIT_EXPECT_EQ(test, tdvmcall_check_regs(c->regs, &missing, &unexposed), c->ret);",
        "\tKUNIT_EXPECT_EQ(test, missing, c->missing);",
        "\tKUNIT_EXPECT_EQ(test, unexposed, c->unexposed);",
        "}",
        "",
        "static struct kunit_case tdvmcall_regs_test_cases[] = {",
        "\tKUNIT_CASE_PARAM_ATTR(tdvmcall_regs_check, tdvmcall_regs_vectors_gen_params,",
        "\t\t\t      { .speed = KUNIT_SPEED_NORMAL }),",
        "\tKUNIT_CASE_PARAM_ATTR(tdvmcall_regs_check, tdvmcall_regs_bus_lock_gen_params,",
        "\t\t\t      { .speed = KUNIT_SPEED_NORMAL }),",
        "\t{}",
        "};",
        "",
        "static struct kunit_suite tdvmcall_regs_test_suite = {",
        f'\t.name = "{SUITE}",',
        "\t.test_cases = tdvmcall_regs_test_cases,",
        "};",
        "",
        "kunit_test_suite(tdvmcall_regs_test_suite);",
    ]
    return "\n".join(body) + "\n"


# --- editing the tree's files -----------------------------------------------------------------------
def _insert_after(text: str, pattern: str, new: list[str], where: str) -> str:
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if re.fullmatch(pattern, line)]
    if len(hits) != 1:
        raise SeriesError(f"{where}: expected one line matching {pattern!r}, found {len(hits)}")
    i = hits[0] + 1
    return "\n".join(lines[:i] + new + lines[i:]) + "\n"


def _kconfig_entry_end(text: str, symbol: str, where: str) -> int:
    """The index of the last line of a Kconfig entry (its help text included)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line == f"config {symbol}"), None)
    if start is None:
        raise SeriesError(f"{where}: no 'config {symbol}' entry")
    end = start
    for i in range(start + 1, len(lines)):
        if re.match(r"^(config|menuconfig|endmenu|endif|menu|if|source|choice|comment)\b", lines[i]):
            break
        if lines[i].strip():
            end = i
    return end


@dataclass
class Patch:
    subject: str
    body: str
    changes: list[tuple[str, str | None, str]] = field(default_factory=list)  # path, old, new


def build_series(kernel: KernelTree, tree: str, corpus: Path, author: str) -> list[Patch]:
    """The three patches, each a list of (path, old text or None for a new file, new text)."""
    check_tree(tree, kernel)
    anchors = find_anchors(kernel.files[TDX_C])
    rule = tree_rule(tree)
    if anchors.dispatcher != rule.exit_dispatcher:
        raise SeriesError(
            f"{kernel.root / TDX_C} dispatches TDCALL exits in {anchors.dispatcher}(), but in the model's tree "
            f"{tree} that is {rule.exit_dispatcher}() ({rule.source}): is the source that tree?"
        )
    table = G.build_table(tree=tree)
    files = G.generate(tree=tree)
    cur = dict(kernel.files)

    def change(patch: Patch, path: str, new: str) -> None:
        patch.changes.append((path, cur.get(path), new))
        cur[path] = new

    # 1: the generated files and the Makefile line
    p1 = Patch(
        "KVM: TDX: Add a table of the GPRs each TDVMCALL reads and writes",
        f"""A TD guest passes a TDVMCALL's inputs and outputs in the GPRs it selects
with the mask in RCX (GHCI 1.5, TDG.VP.VMCALL); the TDX module hands KVM
zero for a GPR that is not selected and drops what KVM writes to it
(TDX module ABI, TDH.VP.ENTER). KVM reads and writes the registers of
each call without looking at that mask, so a call that does not expose a
register KVM uses gets a zero as its input or loses an output, and KVM
cannot tell.

Add tdvmcall_check_regs(), which tells from the exit's GPRs whether the
call exposed every register it reads and every one it may write, with
the masks of those that are missing. It dispatches as KVM does (a
non-zero R10 is a KVM hypercall, else R11 is the GHCI leaf) and reads a
table with one row per call and one per condition on an input (IO's and
MMIO's direction, ReportFatalError's GPA flag, GetTdVmCallInfo's leaf).

The table is generated from the leaf table of tdvmcall {__version__}
(table {G.table_fingerprint(table)}), which records, for each call, the
registers KVM's handler in this file reads and writes; its tests compare
the C with the model on every GPR mask. Nothing calls it yet.""",
    )
    change(p1, f"{VMX_DIR}/{G.HEADER}", files[G.HEADER])
    change(p1, f"{VMX_DIR}/{G.SOURCE}", files[G.SOURCE])
    tdx_line = r"kvm-intel-\$\(CONFIG_KVM_INTEL_TDX\)(\s+)\+= vmx/tdx\.o"
    m = re.search("^" + tdx_line + "$", cur[KVM_MAKEFILE], re.M)
    if m is None:
        raise SeriesError(f"{KVM_MAKEFILE}: no 'kvm-intel-$(CONFIG_KVM_INTEL_TDX) += vmx/tdx.o' line")
    change(
        p1,
        KVM_MAKEFILE,
        _insert_after(
            cur[KVM_MAKEFILE],
            tdx_line,
            [f"kvm-intel-$(CONFIG_KVM_INTEL_TDX){m.group(1)}+= vmx/tdvmcall_regs.o"],
            KVM_MAKEFILE,
        ),
    )

    # 2: the glue in the TDVMCALL exit path
    lines = cur[TDX_C].splitlines()
    a = anchors
    new = (
        lines[: a.include_line + 1]
        + [f'#include "{G.HEADER}"']
        + lines[a.include_line + 1 : a.func_line]
        + glue_helper()
        + lines[a.func_line : a.switch_line]
        + GLUE_CALL
        + lines[a.switch_line :]
    )
    p2 = Patch(
        "KVM: TDX: Refuse a TDVMCALL that does not expose the GPRs it uses",
        f"""KVM handles a TDVMCALL with whatever the TDX module put in the GPRs, and
the module puts zero in every GPR the guest did not select in RCX and
drops what KVM writes to it. A call that does not expose a register it
reads runs on a zero (e.g. MapGPA of GPA 0); one that does not expose a
register KVM writes completes, but the guest never sees the result and
reads its own stale value (e.g. CPUID's outputs in R12-R15).

Check the exposed GPRs in {a.dispatcher}(), on the exit's own
registers and before the exit is dispatched by its re-labelled reason,
so the instruction leaves (CPUID, HLT, IO, MSR, MMIO) and the KVM
hypercalls are covered as well as the calls handle_tdvmcall() takes.
If a register is missing, run nothing and answer
TDVMCALL_STATUS_INVALID_OPERAND, as the GHCI allows for a malformed
call, and resume the guest. If R10 itself is not exposed, no status
can reach the guest: exit to userspace with KVM_EXIT_INTERNAL_ERROR,
the exit reason, the CPU, and the missing and unexposed GPR masks in
data[0..3], so the VMM can stop the TD.

A guest that exposes what the GHCI asks for (Linux exposes 0xffcc on
every TDVMCALL) sees no change.""",
    )
    change(p2, TDX_C, "\n".join(new) + "\n")

    # 3: the KUnit suite
    vectors = vector_cases(corpus, tree)
    bl = bus_lock_cases(tree)
    p3 = Patch(
        "KVM: TDX: Add KUnit tests for the TDVMCALL register check",
        f"""Test tdvmcall_check_regs() on the answers the model of the TDVMCALL
register path (tdvmcall {__version__}) gives for its conformance vectors:
{len(vectors)} exits, each call of the GHCI and each KVM hypercall at the
smallest mask it needs, one register short of it, and the mask Linux
uses, and {len(bl)} exits whose reason reports a bus lock, where whether
KVM re-labels the exit by its leaf depends on the tree ({tree} here).

The check is plain C without hardware state, so the suite also builds
under UML, through arch/x86/um, where it runs in seconds:

  ./tools/testing/kunit/kunit.py run --kunitconfig={VMX_DIR}

On x86 it builds into kvm-intel with {KCONFIG_SYMBOL}.""",
    )
    change(p3, TEST_C, render_test(tree, vectors, bl, G.table_fingerprint(table)))
    change(p3, KUNITCONFIG, f"CONFIG_KUNIT=y\nCONFIG_{KCONFIG_SYMBOL}=y\n")
    kconf = [
        "",
        f"config {KCONFIG_SYMBOL}",
        '\tbool "KUnit tests for the TDVMCALL register check" if !KUNIT_ALL_TESTS',
        "\tdepends on KUNIT=y && KVM_INTEL_TDX",
        "\tdefault KUNIT_ALL_TESTS",
        "\thelp",
        "\t  Builds the KUnit tests of tdvmcall_check_regs() into kvm-intel.",
        "\t  The check tells whether a TDVMCALL exposed every GPR KVM reads and",
        "\t  writes for it; the tests run it on the exits of a conformance corpus",
        "\t  and on exits that report a bus lock, and compare its answers with",
        "\t  those of the model the check was generated from.",
        "",
        "\t  If unsure, say N.",
    ]
    end = _kconfig_entry_end(cur[KVM_KCONFIG], "KVM_INTEL_TDX", KVM_KCONFIG)
    kl = cur[KVM_KCONFIG].splitlines()
    change(p3, KVM_KCONFIG, "\n".join(kl[: end + 1] + kconf + kl[end + 1 :]) + "\n")
    regs_line = r"kvm-intel-\$\(CONFIG_KVM_INTEL_TDX\)\s+\+= vmx/tdvmcall_regs\.o"
    change(
        p3,
        KVM_MAKEFILE,
        _insert_after(
            cur[KVM_MAKEFILE],
            regs_line,
            [f"kvm-intel-$(CONFIG_{KCONFIG_SYMBOL}) += vmx/tdvmcall_regs_test.o"],
            KVM_MAKEFILE,
        ),
    )
    um_kconf = [
        "",
        f"config {KCONFIG_SYMBOL}",
        '\tbool "KUnit tests for the TDVMCALL register check" if !KUNIT_ALL_TESTS',
        "\tdepends on KUNIT=y && 64BIT",
        "\tdefault KUNIT_ALL_TESTS",
        "\thelp",
        "\t  Builds the KUnit tests of KVM TDX's TDVMCALL register check,",
        "\t  tdvmcall_check_regs() in arch/x86/kvm/vmx/, into UML. The check",
        "\t  is plain C that reads a table, so kunit.py can run its tests",
        "\t  here in seconds, without TDX hardware or a KVM build.",
        "",
        "\t  If unsure, say N.",
    ]
    um = cur[UM_KCONFIG].rstrip("\n") + "\n" + "\n".join(um_kconf) + "\n"
    change(p3, UM_KCONFIG, um)
    um_mk = cur[UM_MAKEFILE].splitlines()
    at = next((i for i, line in enumerate(um_mk) if line.startswith("USER_OBJS :=")), None)
    if at is None:
        raise SeriesError(f"{UM_MAKEFILE}: no 'USER_OBJS :=' line to place the test before")
    um_new = [
        f"obj-$(CONFIG_{KCONFIG_SYMBOL}) += ../kvm/vmx/tdvmcall_regs.o \\",
        "\t../kvm/vmx/tdvmcall_regs_test.o",
        "",
    ]
    change(p3, UM_MAKEFILE, "\n".join(um_mk[:at] + um_new + um_mk[at:]) + "\n")
    return [p1, p2, p3]


# --- git format-patch -----------------------------------------------------------------------------
def _diff(path: str, old: str | None, new: str) -> str:
    a = [] if old is None else old.splitlines(keepends=True)
    b = new.splitlines(keepends=True)
    head = f"diff --git a/{path} b/{path}\n"
    if old is None:
        head += "new file mode 100644\n"
    hunks = list(difflib.unified_diff(a, b, "/dev/null" if old is None else f"a/{path}", f"b/{path}", n=3))
    if not hunks:
        return ""
    hunks[0] = hunks[0].rstrip("\n").rstrip() + "\n"
    hunks[1] = hunks[1].rstrip("\n").rstrip() + "\n"
    return head + "".join(hunks)


def _diffstat(changes: Iterable[tuple[str, str | None, str]]) -> str:
    rows = []
    total_add = total_del = 0
    for path, old, new in changes:
        add = dele = 0
        for line in difflib.unified_diff((old or "").splitlines(), new.splitlines(), n=0, lineterm=""):
            if line.startswith("+") and not line.startswith("+++"):
                add += 1
            elif line.startswith("-") and not line.startswith("---"):
                dele += 1
        rows.append((path, add, dele))
        total_add += add
        total_del += dele
    width = max(len(p) for p, _, _ in rows)
    out = [f" {p.ljust(width)} | {a + d:4d} {'+' * min(a, 40)}{'-' * min(d, 40)}" for p, a, d in rows]
    created = sum(1 for _, old, _ in changes if old is None)
    out.append(
        f" {len(rows)} file{'s' if len(rows) != 1 else ''} changed, {total_add} insertion{'s' if total_add != 1 else ''}(+)"
        + (f", {total_del} deletion{'s' if total_del != 1 else ''}(-)" if total_del else "")
    )
    for path, old, _ in changes:
        if old is None:
            out.append(f" create mode 100644 {path}")
    del created
    return "\n".join(out) + "\n"


def format_patch(patch: Patch, n: int, total: int, author: str, date: float) -> str:
    subject = f"[PATCH {n}/{total}] {patch.subject}"
    name, addr = email.utils.parseaddr(author)
    return (
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n"
        f"From: {author}\n"
        f"Date: {email.utils.formatdate(date, usegmt=True)}\n"
        f"Subject: {subject}\n"
        "MIME-Version: 1.0\n"
        "Content-Type: text/plain; charset=UTF-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        f"{patch.body}\n"
        "\n"
        f"Signed-off-by: {name} <{addr}>\n"
        "---\n"
        f"{_diffstat(patch.changes)}\n"
        + "".join(_diff(p, o, nw) for p, o, nw in patch.changes)
        + f"-- \ntdvmcall {__version__}\n\n"
    )


def patch_file_name(n: int, subject: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", subject).strip("-")[:52].rstrip("-")
    return f"{n:04d}-{slug}.patch"


def check_author(author: str) -> str:
    name, addr = email.utils.parseaddr(author)
    if not name or "@" not in addr:
        raise SeriesError(f"--author: {author!r} is not 'Name <email>'")
    return f"{name} <{addr}>"


def write_series(
    directory: Path, kernel_root: Path, tree: str, corpus: Path, author: str, date: float | None = None
) -> dict[str, Any]:
    """Write the series into ``directory`` (created; existing ``*.patch`` files of an earlier series
    are replaced).  Returns what was written."""
    kernel = read_tree(kernel_root)
    author = check_author(author)
    patches = build_series(kernel, tree, corpus, author)
    when = time.time() if date is None else date
    directory.mkdir(parents=True, exist_ok=True)
    # an earlier series in the directory would be applied with this one by `git am DIR/*.patch`
    names = {patch_file_name(n, p.subject) for n, p in enumerate(patches, 1)}
    removed = sorted(str(p) for p in directory.glob("[0-9][0-9][0-9][0-9]-*.patch") if p.name not in names)
    written = []
    # every patch renamed into place once all are whole (console.output_files), the earlier series
    # removed after: an interrupt leaves the old series or the new one, never a mix or a partial patch
    with output_files(directory / patch_file_name(n, p.subject) for n, p in enumerate(patches, 1)) as partial:
        for n, p in enumerate(patches, 1):
            name = patch_file_name(n, p.subject)
            partial[n - 1].write_text(format_patch(p, n, len(patches), author, when))
            written.append({"file": str(directory / name), "subject": p.subject, "files": [c[0] for c in p.changes]})
    for old in removed:
        Path(old).unlink()
    test = next(c[2] for c in patches[2].changes if c[0] == TEST_C)
    return {
        "tree": tree,
        "kernel": str(kernel_root),
        "release": kernel.release,
        "dispatcher": find_anchors(kernel.files[TDX_C]).dispatcher,
        "patches": written,
        "removed": removed,
        "kunit_cases": {
            "vectors": test.count('\t\t.name = "') - sum(1 for _ in re.finditer(r'\.name = "bus_lock\.', test)),
            "bus_lock": len(re.findall(r'\.name = "bus_lock\.', test)),
        },
    }
