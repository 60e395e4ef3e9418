"""From code regions to judged sites: every TDCALL, its registers, its callers, its verdicts."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from dataclasses import dataclass, field

import iced_x86 as ix

from ..abi.codes import TdcallRax, tdcall_rax_problems
from ..abi.control import Control
from ..abi.regs import fmt_mask
from ..judge import (
    HARDENED_REFUSES,
    LEGACY_SILENT,
    MODULE_REJECTS,
    PASSING,
    Host,
    Judgement,
    ModuleOutcome,
    judge,
    module_outcome,
    serves,
)
from ..kvm import leaves as L
from . import deep as deep_engine
from .containers import Code, Found
from .deep import Engine as Deep
from .flow import Function, Region, Value, memory_at_call, resolve, unknown
from .names import readable, readable_via

#: The inputs that decide a call's case (which registers it reads or writes), per leaf: recovered
#: and, when known, pinned in the judgement (an IO site known to read is not judged on its write).
DECIDING: dict[str, tuple[str, ...]] = {
    "Instruction.CPUID": ("r12", "r13"),
    "Instruction.IO": ("r13",),
    "#VE.RequestMMIO": ("r13",),
    "Instruction.RDMSR": ("r12",),
    "Instruction.WRMSR": ("r12",),
    "ReportFatalError": ("r12",),
    "GetTdVmCallInfo": ("r12",),
}
REGS = ("rax", "rcx", "r10", "r11", "r12", "r13")
#: callers followed per site (one resolved call each); beyond, the site says how many were left
MAX_CALLERS = 256


@dataclass
class Site:
    """One resolved TDCALL: a site, once per caller when its values come from the caller."""

    input: str
    container: list[str]
    address: int
    function: str
    function_start: int
    regs: dict[str, Value]
    via: str | None = None
    leaf: L.Leaf | None = None
    judgement: Judgement | None = None
    module: ModuleOutcome | None = None
    serves: list[str] = field(default_factory=list)
    fails: list[str] = field(default_factory=list)
    #: a digest of the code bytes from the function's start to the TDCALL: the same stub linked
    #: into many modules has the same one (what the report collapses); None when not known
    code: bytes | None = None
    #: a call of another hypervisor's interface (``kvm.leaves.VENDOR_HYPERCALLS``): its name and
    #: what it is; judged as a call that is not KVM's (the module's check only: ``not-kvm``)
    foreign: tuple[str, str] | None = None

    @property
    def symbol(self) -> str:
        return f"{self.function}+{self.address - self.function_start:#x}"

    @property
    def name(self) -> str:
        """The function's readable name: a Rust or C++ symbol demangled (:mod:`.names`)."""
        return readable(self.function)

    @property
    def label(self) -> str:
        """:attr:`symbol` with the function's name demangled: ``tdx_tdcall::tdx::tdvmcall_halt+0x2f``."""
        return f"{self.name}+{self.address - self.function_start:#x}"

    @property
    def via_label(self) -> str | None:
        """:attr:`via` with each caller's name demangled."""
        return readable_via(self.via)

    @property
    def rax(self) -> int | None:
        return self.regs["rax"].value

    @property
    def mask(self) -> int | None:
        return self.regs["rcx"].value if self.rax == 0 else None

    @property
    def is_vmcall(self) -> bool:
        return self.rax == 0

    @property
    def tdcall_leaf(self) -> str:
        """The TDCALL leaf's name (abi/codes.py ``TDCALL_LEAVES``, docs/abi.md §8), with its version if any."""
        if self.rax is None:
            return "unresolved"
        r = TdcallRax(self.rax)
        name = r.name or f"unknown TDCALL leaf {r.leaf:#x}"
        return f"{name} version {r.version}" if r.version else name

    @property
    def call_name(self) -> str:
        if not self.is_vmcall:
            return self.tdcall_leaf
        if self.leaf is not None:
            return self.leaf.name
        if self.foreign is not None:
            return self.foreign[0]
        return "unresolved"

    def pinned(self) -> dict[str, int]:
        if self.leaf is None:
            return {}
        return {r: v for r in DECIDING.get(self.leaf.name, ()) if (v := self.regs[r].value) is not None}

    def verdict(self, policy: str) -> str:
        """The verdict under a KVM policy: the judgement's, ``module-rejects`` for a known mask the
        module fails, else ``unresolved`` (or ``not-tdvmcall``)."""
        if not self.is_vmcall:
            return "unresolved" if self.rax is None else "not-tdvmcall"
        if self.judgement is not None:
            return self.judgement.verdict[policy]
        if self.module is not None and not self.module.accepted:
            return MODULE_REJECTS
        return "unresolved"

    def passes(self, policy: str) -> bool:
        """Judged and passing (or a TDCALL leaf other than TDG.VP.VMCALL, which is not a call to
        judge): a call whose mask or call was not recovered does not pass, since it was not judged."""
        return self.verdict(policy) in PASSING | {"not-tdvmcall"}

    @property
    def counted(self) -> bool:
        """A call the verdict counts: a TDVMCALL, or a TDCALL whose leaf was not recovered (it may be one)."""
        return self.is_vmcall or self.rax is None

    def reasons(self) -> list[str]:
        """Why the verdicts are what they are: :meth:`details` without the notes (registers exposed
        for nothing, optional inputs left out)."""
        notes = set(self.judgement.notes) if self.judgement is not None else set()
        return [d for d in self.details() if d not in notes]

    def unresolved(self) -> list[str]:
        """For a call not judged: each register that decides it and was not recovered, and why."""
        regs = ("rcx", "r10", "r11") if self.is_vmcall else ("rax",)
        return [f"{r} unresolved: {self.regs[r].how}" for r in regs if not self.regs[r].known]

    def details(self) -> list[str]:
        out: list[str] = []
        if self.rax is not None and self.rax != 0 and (why := tdcall_rax_problems(self.rax)):
            out.append("the TDX module fails this TDCALL (TDX_OPERAND_INVALID, RAX): " + "; ".join(why))
        if self.foreign is not None:
            out.append(self.foreign[1])
        if self.judgement is not None:
            out += self.judgement.details()
        elif self.module is not None:
            if not self.module.accepted:
                name = (self.module.decoded or {}).get("name") or f"{self.module.status:#x}"
                out.append(f"module fails the control with {name}: " + "; ".join(self.module.problems))
            if self.fails or self.serves:
                out.append(f"call unresolved; under hardened this mask serves: {' '.join(self.serves) or 'none'}")
                out.append(f"and fails: {' '.join(self.fails) or 'none'}")
        elif self.is_vmcall and self.leaf is not None:
            need = L.minimal_mask(self.leaf, self.pinned())
            out.append(f"mask unresolved; {self.leaf.name} needs at least {need:#06x} ({fmt_mask(need, 16)})")
        return out


def _call(regs: dict[str, Value]) -> L.Leaf | None:
    r10, r11 = regs["r10"].value, regs["r11"].value
    if r10 is None:
        return None
    if r10 != 0:
        return L.lookup(r10, 0)
    if r11 is None:
        return None
    return L.lookup(0, r11)


#: caller levels followed: the site's function's callers, and their callers
MAX_LEVELS = 2


def _callers(region: Region, fn: Function) -> list[tuple[int, Function]]:
    """Direct calls (and tail-call jumps) to ``fn``'s start, each with the caller's function decoded
    up to that instruction."""
    out = []
    for c in region.calls.get(fn.start) + region.jumps.get(fn.start):
        cfn = region.function(c)
        if cfn is None or cfn.insns[-1].near_branch_target != fn.start:
            continue
        if cfn.insns[-1].flow_control not in (ix.FlowControl.CALL, ix.FlowControl.UNCONDITIONAL_BRANCH):
            continue
        out.append((c, cfn))
    return out


def _relevant(values: dict[str, Value]) -> set[str]:
    """The registers worth following to the callers: RAX; for a TDVMCALL (or an unknown leaf) RCX,
    R10 and R11; and the inputs that decide the call's case once the call is known."""
    rax = values["rax"].value
    if rax is not None and rax != 0:
        return {"rax"}
    out = {"rax", "rcx", "r10", "r11"}
    leaf = _call(values)
    if leaf is not None:
        out |= set(DECIDING.get(leaf.name, ()))
    return out


def _at_caller(cfn: Function, v: Value) -> Value:
    if v.param is not None:
        return resolve(cfn, len(cfn.insns) - 1, v.param, 0)
    assert v.mem is not None
    return memory_at_call(cfn, *v.mem)


def expand(
    region: Region, fn: Function, values: dict[str, Value], level: int, budget: list[int]
) -> list[tuple[dict[str, Value], list[str], list[int]]]:
    """The site's values once per caller (recursively, up to :data:`MAX_LEVELS`) where some come
    from the caller, with the callers as ``via`` (labels, and the call instructions' addresses,
    innermost first).  ``budget`` caps the resolved calls per site."""
    pending = {r: v for r, v in values.items() if v.from_caller}
    params = {r: v for r, v in pending.items() if r in _relevant(values)}
    if not params:
        done = {
            r: unknown(f"{v.how}; from caller, not followed (it does not decide this call)") for r, v in pending.items()
        }
        return [({**values, **done}, [], [])]
    params = pending
    callers = _callers(region, fn) if fn.exact and level < MAX_LEVELS else []
    if not callers:
        if not fn.exact:
            why = "function start unknown"
        elif level >= MAX_LEVELS:
            why = f"callers followed {MAX_LEVELS} levels"
        else:
            why = "no direct caller found"
        return [
            (
                {**values, **{r: unknown(f"{v.how}; from caller, unresolved ({why})") for r, v in params.items()}},
                [],
                [],
            )
        ]
    if len(callers) > budget[0]:
        region.code.notes.append(
            f"{readable(fn.name)}: {len(callers)} direct callers; {max(budget[0], 0)} followed, the rest not (cap {MAX_CALLERS})"
        )
        callers = callers[: max(budget[0], 0)]
    out = []
    for c, cfn in callers:
        budget[0] -= 1
        new = dict(values)
        where = f"caller at {c:#x} ({readable(cfn.name)})"
        for r, v in params.items():
            cv = _at_caller(cfn, v)
            new[r] = Value(cv.value, f"{v.how}; {where}: {cv.how}", cv.param, cv.mem)
        for vals, via, at in expand(region, cfn, new, level + 1, budget):
            out.append((vals, [f"{cfn.name}+{c - cfn.start:#x}", *via], [c, *at]))
    return out


def _pending(regs: dict[str, Value]) -> set[str]:
    """The registers that decide the call and were not recovered (what the deep engine is asked for)."""
    rax = regs["rax"].value
    want = {"rax"} if rax is not None and rax != 0 else {"rax", "rcx", "r10", "r11"}
    return {r for r in want if not regs[r].known}


def deepen(
    engine: Deep | None,
    region: Region,
    fn: Function,
    at: int,
    entries: list[tuple[dict[str, Value], list[str], list[int]]],
) -> list[tuple[dict[str, Value], list[str], list[int]]]:
    """The fast path's calls of one site, with what the deep engine's runs pin where the fast path
    left a deciding register unresolved (a call path may split into its callers' paths)."""
    if engine is None:
        return entries
    out: list[tuple[dict[str, Value], list[str], list[int]]] = []
    d = engine.delta
    for regs, via, addrs in entries:
        if not _pending(regs):
            out.append((regs, via, addrs))
            continue
        want = {"rax", "rcx", "r10", "r11"}
        try:
            calls = engine.calls(at + d, fn.start + d, tuple(a + d for a in addrs), want, len(addrs), fn.exact)
        except Exception as e:  # the emulator on hostile code: the fast path's answer stands, said once
            note = f"deep engine stopped on {readable(fn.name)}: {type(e).__name__}: {e}"
            if note not in region.code.notes:
                region.code.notes.append(note)
            calls = []
        if not calls:
            out.append((regs, via, addrs))
            continue
        for c in calls:
            new = dict(regs)
            start = engine.image.function_of(c.start)
            sname = readable(start[1]) if start else f"sub_{c.start - d:x}"
            for r in REGS:
                if r not in c.regs:
                    continue
                got = c.regs[r]
                old = regs[r]
                if old.known and old.value != got:
                    new[r] = unknown(f"{old.how}; but a run from {sname} gives {got:#x}: not trusted")
                elif not old.known:
                    new[r] = Value(got, f"run from {sname} (the same in every run; fast path: {old.how})")
            labels = list(via)
            for a in c.chain[len(addrs) :]:
                f = engine.image.function_of(a)
                labels.append(f"{f[1]}+{a - f[0]:#x}" if f else f"{a - d:#x}")
            out.append((new, labels, [a - d for a in c.chain]))
    return out


def sites_in(region: Region, input_name: str, engine: Deep | None = None) -> tuple[list[Site], int]:
    """Every TDCALL decoded as code in the region (once per caller when values come from the caller),
    and how many TDCALL byte matches are not code (in a raw blob: also those not decoded from a
    function start it can show, :meth:`Region.justified`).  With ``engine``, what the fast path
    left unresolved is run (:mod:`.deep`)."""
    code = region.code
    out: list[Site] = []
    not_code = 0
    for at in region.hits():
        fn = region.function(at)
        if fn is None or fn.insns[-1].mnemonic != ix.Mnemonic.TDCALL:
            not_code += 1
            continue
        if code.raw and not region.justified(fn.start):
            not_code += 1  # a raw blob: no function start shown before it, so not taken as code
            continue
        idx = len(fn.insns) - 1
        intra = {r: resolve(fn, idx, r, 0) for r in REGS}
        body = hashlib.blake2b(code.data[fn.start - code.va : at + 4 - code.va], digest_size=16).digest()
        entries = expand(region, fn, intra, 0, [MAX_CALLERS])
        if engine is not None and any(_pending(e[0]) for e in entries):
            entries = deepen(engine, region, fn, at, entries)
        for regs, via, _at in entries:
            out.append(
                Site(input_name, code.chain, at, fn.name, fn.start, regs, via=" ← ".join(via) or None, code=body)
            )
    return out, not_code


def judge_site(site: Site, host: Host, cache: dict[tuple[object, ...], object]) -> None:
    """Attach the call, the module's outcome and the verdicts to a site (judgements are cached by
    mask, call and pinned inputs: a firmware repeats the same stub in every module)."""
    if not site.is_vmcall:
        return
    site.leaf = _call(site.regs)
    if site.leaf is L.UNKNOWN_HYPERCALL and (r10 := site.regs["r10"].value) in L.VENDOR_HYPERCALLS:
        site.leaf, site.foreign = None, L.VENDOR_HYPERCALLS[r10]  # type: ignore[index]
    mask = site.mask
    if mask is None:
        return
    key = ("m", mask)
    if key not in cache:
        cache[key] = module_outcome(mask, host)
    site.module = cache[key]  # type: ignore[assignment]
    if site.foreign is not None:  # not KVM's: the module's check only
        key = ("f", mask)
        if key not in cache:
            cache[key] = judge(mask, None, host, module=site.module)
        site.judgement = cache[key]  # type: ignore[assignment]
        return
    if site.leaf is None:
        key = ("s", Control(mask).gpr_select)
        if key not in cache:
            cache[key] = serves(mask)
        site.serves, site.fails = cache[key]  # type: ignore[misc]
        return
    pinned = site.pinned()
    key = ("j", mask, site.leaf.name, tuple(sorted(pinned.items())))
    if key not in cache:
        cache[key] = judge(mask, site.leaf, host, pinned, site.module)
    site.judgement = cache[key]  # type: ignore[assignment]


@dataclass
class Image:
    """One input file: its sites, problems, and what it held."""

    path: str
    sites: list[Site]
    problems: list[str]
    skipped: list[str]
    kinds: dict[str, int]
    not_code: int
    bytes_code: int

    def summary(self) -> dict[str, int]:
        locs = {(tuple(s.container), s.address) for s in self.sites}
        vm = {(tuple(s.container), s.address) for s in self.sites if s.is_vmcall}
        return {
            "tdcall_sites": len(locs),
            "tdvmcall_sites": len(vm),
            "resolved_calls": sum(1 for s in self.sites if s.is_vmcall),
            "distinct_masks": len({s.mask for s in self.sites if s.mask is not None}),
            "module_rejects": sum(1 for s in self.sites if s.verdict("hardened") == MODULE_REJECTS),
            "hardened_refuses": sum(1 for s in self.sites if s.verdict("hardened") == HARDENED_REFUSES),
            "legacy_silent": sum(1 for s in self.sites if s.verdict("legacy") == LEGACY_SILENT),
            "unresolved": sum(1 for s in self.sites if s.verdict("hardened") == "unresolved"),
            "not_code": self.not_code,
        }


def _engine(code: Code, engines: dict[int, Deep | None]) -> Deep | None:
    """The deep engine of the image a code region belongs to (one per image, made when first
    needed), None when it cannot run it (the reason is noted once)."""
    if code.bitness != 64:
        return None  # the engine runs 64-bit code only
    key = id(code.image) if code.image is not None else id(code)
    if key not in engines:
        engines[key] = None
        if not deep_engine.available():
            code.notes.append("deep engine not run: the unicorn package is not installed")
        else:
            # an image the engine does not load: the fast path's answer stands
            with contextlib.suppress(deep_engine.Unsupported, struct.error, IndexError, ValueError):
                engines[key] = Deep(code)
    eng = engines[key]
    if eng is not None and key != id(code):
        try:
            eng.delta = deep_engine.load_delta(eng.image, code)
        except deep_engine.Unsupported:
            return None
    return eng


def analyze(path: str, found: Found, host: Host, cache: dict[tuple[object, ...], object], deep: bool = True) -> Image:
    sites: list[Site] = []
    not_code = 0
    size = 0
    engines: dict[int, Deep | None] = {}
    for code in found.codes:
        size += len(code.data)
        if b"\x66\x0f\x01\xcc" not in code.data:
            continue
        got, nc = sites_in(Region.of(code), path, _engine(code, engines) if deep else None)
        sites += got
        not_code += nc
    for s in sites:
        judge_site(s, host, cache)
    skipped = found.skipped + [n for code in found.codes for n in code.notes]
    return Image(path, sites, found.problems, skipped, found.kinds, not_code, size)


__all__ = ["Code", "Image", "Site", "analyze"]
