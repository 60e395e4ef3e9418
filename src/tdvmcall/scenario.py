"""The JSON scenario contract: one scenario in, one full round trip, one JSON result out.

This is public API (``tdvmcall run``, the vectors, other people's scripts): see docs/scenario.md.
Input::

    {"td": {"module": "1.5", "no_rbp_mod": true},
     "kvm": {"policy": "hardened", "tree": "kvm-x86"},
     "guest": {"rax": 0, "rcx": "0xFFCC", "r10": 0, "r11": "0xA", "r12": "0x1"},
     "platform": {}}

Register values are integers or hex strings, absent registers are 0, and ``td``, ``kvm`` and
``platform`` are optional.  Output: see :func:`result_json`.  Bad input raises
:class:`ScenarioError` with one line naming the field and the accepted form.
"""

from __future__ import annotations

from typing import Any

from .abi.codes import TDVMCALL_STATUS_NAMES, TdcallRax, status_name, tdcall_rax_problems
from .abi.control import Control
from .abi.regs import GPR_NAMES, INT_TEXT, hex64, mask_of, names_in, parse_int
from .guest import RoundTrip, tdvmcall
from .kvm.platform import MSR_EXIT_REASONS, Platform, Userspace
from .kvm.tdx import POLICIES, VMM_AFTER_NOTES, KvmVcpu
from .kvm.trees import DEFAULT_TREE, UnknownTreeError, check_tree
from .module import TdConfig, VcpuState

SCHEMA_VERSION = 1
_ERRNO_NAMES = {22: "EINVAL"}


class ScenarioError(ValueError):
    """A malformed scenario: the message names the field and the accepted form."""


def _obj(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ScenarioError(f"{field}: expected a JSON object")
    return value


def _known(obj: dict[str, Any], field: str, keys: set[str]) -> None:
    extra = sorted(set(obj) - keys)
    if extra:
        raise ScenarioError(f"{field}.{extra[0]}: unknown field; accepted: {', '.join(sorted(keys))}")


def _int(value: Any, field: str) -> int:
    try:
        return parse_int(value, field)
    except ValueError as e:
        raise ScenarioError(str(e)) from None


def _bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(f"{field}: expected true or false")
    return value


def _int_map(value: Any, field: str) -> dict[int, int]:
    return {_int(k, f"{field} key"): _int(v, f"{field}.{k}") for k, v in _obj(value, field).items()}


def _int_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, list):
        value = [value]
    return [_int(v, f"{field}[{i}]") for i, v in enumerate(value)]


class Scenario:
    """A parsed scenario: the TD, the KVM policy, the guest's registers and the platform."""

    def __init__(self, td: TdConfig, policy: str, guest: VcpuState, platform: Platform):
        self.td, self.policy, self.guest, self.platform = td, policy, guest, platform

    def run(self) -> RoundTrip:
        return tdvmcall(self.td, self.guest.copy(), KvmVcpu(self.policy), self.platform)


def parse(data: Any) -> Scenario:
    """Validate and parse a scenario object."""
    top = _obj(data, "scenario")
    _known(top, "scenario", {"td", "kvm", "guest", "platform", "comment", "name"})

    td_in = _obj(top.get("td"), "td")
    _known(td_in, "td", {"module", "no_rbp_mod", "bus_lock"})
    try:
        td = TdConfig(
            str(td_in.get("module", "1.5")),
            _bool(td_in.get("no_rbp_mod", True), "td.no_rbp_mod"),
            _bool(td_in.get("bus_lock", False), "td.bus_lock"),
        )
    except ValueError as e:
        raise ScenarioError(f"td.module: {e}") from None

    kvm_in = _obj(top.get("kvm"), "kvm")
    _known(kvm_in, "kvm", {"policy", "tree"})
    policy = kvm_in.get("policy", "hardened")
    if policy not in POLICIES:
        raise ScenarioError(f"kvm.policy: {policy!r} is not a policy; accepted: {', '.join(POLICIES)}")
    tree = kvm_in.get("tree", DEFAULT_TREE)
    try:
        check_tree(tree)
    except UnknownTreeError as e:
        raise ScenarioError(f"kvm.tree: {e}") from None

    if "guest" not in top:
        raise ScenarioError('guest: missing; expected an object of registers like {"rcx": "0xFFCC", "r11": "0xA"}')
    guest = parse_guest(top["guest"])
    return Scenario(td, policy, guest, _platform(_obj(top.get("platform"), "platform"), tree))


_GUEST_KEYS = set(GPR_NAMES) | {"rip", "long_mode", "xmm"}
_XMM_KEYS = {f"xmm{i}" for i in range(16)}


def parse_guest(data: Any) -> VcpuState:
    """Validate and parse a scenario's ``guest`` object alone."""
    g_in = _obj(data, "guest")
    _known(g_in, "guest", _GUEST_KEYS)
    guest = VcpuState()
    for i, name in enumerate(GPR_NAMES):
        guest.gprs[i] = _int(g_in.get(name, 0), f"guest.{name}")
    guest.rip = _int(g_in.get("rip", guest.rip), "guest.rip")
    guest.long_mode = _bool(g_in.get("long_mode", True), "guest.long_mode")
    xmm_in = _obj(g_in.get("xmm"), "guest.xmm")
    _known(xmm_in, "guest.xmm", _XMM_KEYS)
    for k, v in xmm_in.items():
        value = _int128(v, f"guest.xmm.{k}")
        guest.xmm[int(k[3:])] = value
    return guest


def _int128(value: Any, field: str) -> int:
    """An XMM value: an integer or a hex/decimal string that fits 128 bits."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ScenarioError(f"{field}: expected an integer or a hex string of up to 128 bits")
    if isinstance(value, int):
        v = value
    else:
        s = value.strip(" \t\r\n")
        if not INT_TEXT.fullmatch(s) or len(s) > 48:
            raise ScenarioError(f'{field}: {value!r} is not an integer; use decimal or hex like "0xFF"')
        v = int(s, 16) if s[:2].lower() == "0x" else int(s, 10)
    if not 0 <= v < 1 << 128:
        raise ScenarioError(f"{field}: does not fit 128 bits unsigned")
    return v


def _platform(p_in: dict[str, Any], tree: str) -> Platform:
    keys = {
        "msr_exits",
        "msr_exit_reasons",
        "msr_filter",
        "topology",
        "exit_hypercall_map_gpa",
        "gpaw",
        "maxphyaddr",
        "pending_event",
        "apic_ids",
        "host_clock_suitable",
        "cpuid",
        "msrs",
        "userspace",
    }
    _known(p_in, "platform", keys)
    p = Platform(tree=tree)
    _msr_platform(p, p_in)
    for key in ("exit_hypercall_map_gpa", "pending_event", "host_clock_suitable"):
        if key in p_in:
            setattr(p, key, _bool(p_in[key], f"platform.{key}"))
    for key in ("gpaw", "maxphyaddr"):
        if key in p_in:
            raw = p_in[key]
            negative = (isinstance(raw, int) and not isinstance(raw, bool) and raw < 0) or (
                isinstance(raw, str) and raw.strip().startswith("-")
            )
            v = -1 if negative else _int(raw, f"platform.{key}")
            if not 32 <= v <= 52:
                if negative:
                    raise ScenarioError(f"platform.{key}: {raw} out of range; accepted: 32..52")
                raise ScenarioError(f"platform.{key}: {v} out of range; accepted: 32..52")
            setattr(p, key, v)
    if "apic_ids" in p_in:
        p.apic_ids = tuple(_int_list(p_in["apic_ids"], "platform.apic_ids"))
    if "msrs" in p_in:
        p.msrs.update(_int_map(p_in["msrs"], "platform.msrs"))
    if "cpuid" in p_in:
        if not isinstance(p_in["cpuid"], list):
            raise ScenarioError("platform.cpuid: expected a list of {leaf, subleaf, eax, ebx, ecx, edx}")
        for i, e in enumerate(p_in["cpuid"]):
            f = f"platform.cpuid[{i}]"
            e = _obj(e, f)
            _known(e, f, {"leaf", "subleaf", "eax", "ebx", "ecx", "edx"})
            p.cpuid[(_int(e.get("leaf", 0), f + ".leaf"), _int(e.get("subleaf", 0), f + ".subleaf"))] = tuple(
                _int(e.get(r, 0), f"{f}.{r}") & 0xFFFFFFFF for r in ("eax", "ebx", "ecx", "edx")
            )  # type: ignore[assignment]
    u_in = _obj(p_in.get("userspace"), "platform.userspace")
    _known(
        u_in, "platform.userspace", {"hypercall_ret", "tdx_ret", "tdvmcall_info", "ports", "mmio", "rdmsr", "msr_error"}
    )
    u = Userspace()
    if "hypercall_ret" in u_in:
        u.hypercall_ret = _int_list(u_in["hypercall_ret"], "platform.userspace.hypercall_ret")
    if "tdx_ret" in u_in:
        u.tdx_ret = _int(u_in["tdx_ret"], "platform.userspace.tdx_ret")
    if "tdvmcall_info" in u_in:
        words = _int_list(u_in["tdvmcall_info"], "platform.userspace.tdvmcall_info")
        if len(words) != 4:
            raise ScenarioError("platform.userspace.tdvmcall_info: expected 4 values (R11..R14)")
        u.tdvmcall_info = tuple(words)  # type: ignore[assignment]
    for key in ("ports", "mmio", "rdmsr"):
        if key in u_in:
            getattr(u, key).update(_int_map(u_in[key], f"platform.userspace.{key}"))
    if "msr_error" in u_in:
        u.msr_error = _bool(u_in["msr_error"], "platform.userspace.msr_error")
    p.userspace = u
    return p


def _msr_platform(p: Platform, p_in: dict[str, Any]) -> None:
    """The MSR side of userspace: which failure reasons exit (``msr_exit_reasons``, or the older
    ``msr_exits``: true for every reason, false for none), the MSR filter, and the topology QEMU
    answers MSR_CORE_THREAD_COUNT from.  Defaults: QEMU's (docs/scenario.md)."""
    if "msr_exits" in p_in and "msr_exit_reasons" in p_in:
        raise ScenarioError("platform.msr_exits: give msr_exits or msr_exit_reasons, not both")
    if "msr_exits" in p_in:
        every = sum(MSR_EXIT_REASONS.values())
        p.msr_exit_reasons = every if _bool(p_in["msr_exits"], "platform.msr_exits") else 0
    if "msr_exit_reasons" in p_in:
        names = p_in["msr_exit_reasons"]
        accepted = ", ".join(MSR_EXIT_REASONS)
        if not isinstance(names, list) or any(n not in MSR_EXIT_REASONS for n in names):
            raise ScenarioError(f"platform.msr_exit_reasons: expected a list of {accepted}")
        p.msr_exit_reasons = sum({MSR_EXIT_REASONS[n] for n in names})
    f_in = _obj(p_in.get("msr_filter"), "platform.msr_filter")
    _known(f_in, "platform.msr_filter", {"read", "write"})
    for key in ("read", "write"):
        if key in f_in:
            indices = frozenset(_int_list(f_in[key], f"platform.msr_filter.{key}"))
            setattr(p, f"msr_filter_{key}", indices)
    t_in = _obj(p_in.get("topology"), "platform.topology")
    _known(t_in, "platform.topology", {"cores", "threads_per_core"})
    for key, attr in (("cores", "cores_per_package"), ("threads_per_core", "threads_per_core")):
        if key in t_in:
            v = _int(t_in[key], f"platform.topology.{key}")
            if not 1 <= v <= 0xFFFF:
                raise ScenarioError(f"platform.topology.{key}: {v} out of range; accepted: 1..65535")
            setattr(p, attr, v)


# --- output -------------------------------------------------------------------------------------
def _regs(values: list[int]) -> dict[str, str]:
    return {name: hex64(values[i]) for i, name in enumerate(GPR_NAMES)}


def _json_value(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return hex64(v)
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    return str(v)


def _module_problems(rt: RoundTrip) -> list[str]:
    """Why the module failed the call back: RAX's problems, else the control's."""
    if rt.module is None or rt.module.exited or rt.module.not_modelled:
        return []
    rax_problems = tdcall_rax_problems(rt.before.gprs[0])
    if rax_problems:
        return rax_problems
    return Control(rt.before.gprs[1]).problems(rt.td.module, rt.td.no_rbp_mod)


def _exit_name(status: int) -> str:
    if status >> 26 & 1:
        return f"TDCALL exit (reason 77, bus lock detected: bit 26, {status:#x})"
    return "TDCALL exit (reason 77)"


def result_json(rt: RoundTrip) -> dict[str, Any]:
    """The result object of ``tdvmcall run --json`` (schema version 1; docs/scenario.md)."""
    ctl = Control(rt.before.gprs[1])
    rax = TdcallRax(rt.before.gprs[0])
    module: dict[str, Any] = {
        "exited": bool(rt.module and rt.module.exited),
        "status": hex64(rt.module.status) if rt.module and rt.module.status is not None else None,
        "status_name": None,
        "fault": rt.fault,
        "control": hex64(ctl.raw),
        "gpr_select": names_in(ctl.gpr_select, 16),
        "xmm_select": [f"xmm{i}" for i in range(16) if ctl.xmm_select >> i & 1],
        "problems": _module_problems(rt),
        "tdcall_leaf": {"leaf": rax.leaf, "version": rax.version, "name": rax.name},
        "not_modelled": rt.module.not_modelled if rt.module else None,
    }
    if rt.module and rt.module.status is not None:
        module["status_name"] = _exit_name(rt.module.status) if rt.module.exited else status_name(rt.module.status)
    out: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "td": {"module": rt.td.module, "no_rbp_mod": rt.td.no_rbp_mod, "bus_lock": rt.td.bus_lock},
        "module": module,
        "vmm": _regs(rt.module.exit.vmm) if rt.module and rt.module.exit else None,
        "kvm": None,
        "guest_before": _regs(rt.before.gprs) | {"rip": hex64(rt.before.rip)},
        "guest": _regs(rt.after.gprs) | {"rip": hex64(rt.after.rip)},
        "guest_xmm": {f"xmm{i}": f"0x{x:032x}" for i, x in enumerate(rt.after.xmm)},
        "guest_unknown": names_in(mask_of(GPR_NAMES[i] for i in rt.after.host), 16),
        "guest_xmm_unknown": [f"xmm{i}" for i in sorted(rt.after.xmm_host)],
        "warnings": list(rt.warnings),
    }
    if rt.kvm:
        k = rt.kvm
        out["kvm"] = {
            "policy": k.policy,
            "leaf": k.leaf.name,
            "verdict": k.verdict,
            "status": hex64(k.status) if k.status is not None else None,
            "status_name": TDVMCALL_STATUS_NAMES.get(k.status)
            if k.status is not None and k.leaf.family == "ghci"
            else None,
            "missing": k.missing,
            "unexposed_outputs": k.unexposed_outputs,
            "zero_reads": k.zero_reads,
            "dropped_writes": k.dropped_writes,
            "wrote": {r: hex64(v) for r, v in k.wrote.items()},
            "regs_avail": hex64(k.regs_avail),
            "regs_dirty": hex64(k.regs_dirty),
            "userspace_exit": _json_value(k.userspace_exits[0]) if k.userspace_exits else None,
            "userspace_exits": _json_value(k.userspace_exits),
            "warnings": k.warnings,
            "exit_reason": hex64(k.exit_reason),
            "trace_reason": k.trace_reason,
            "bus_lock": k.bus_lock,
            "resumed": k.resumed,
            "run_error": f"-{_ERRNO_NAMES.get(-k.run_error, str(-k.run_error))}" if k.run_error is not None else None,
            "notes": list(k.notes),
        }
        out["vmm_after"] = _regs(k.vmm_after)
        out["vmm_after_unknown"] = names_in(mask_of(GPR_NAMES[i] for i in k.vmm_after_host), 16)
        out["vmm_after_notes"] = dict(VMM_AFTER_NOTES)
    return out


def run_json(data: Any) -> dict[str, Any]:
    """Parse, run and render one scenario."""
    sc = parse(data)
    return result_json(sc.run())
