"""Fuzzing the model's promises: hypothesis strategies over the whole input space, the properties
every execution must satisfy, and the campaign behind ``tdvmcall fuzz``.

An *example* is a TD (module 1.0/1.5, NO_RBP_MOD on/off), a kernel tree, an initial platform (the
``platform`` object of a scenario, so that every fuzzed host is expressible in the scenario contract)
and a sequence of one to three TDVMCALLs.  Each policy runs the whole sequence on one ``KvmVcpu`` and
one ``Platform`` (state carries over: MSRs written, MMIO memory, userspace answers consumed, the
register cache), and every call is checked against the properties below.  Hypothesis draws and shrinks
the examples; nothing here shrinks by hand.

The strategies are in :mod:`.strategies`, the properties in :mod:`.properties`.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from .. import scenario as S
from ..abi.regs import (
    GPR_NAMES,
    U32,
    U64,
    hex64,
)
from ..guest import RoundTrip
from ..kvm.platform import Platform
from ..kvm.tdx import (
    KvmVcpu,
)
from .properties import (
    PROPERTIES,
    VIOLATION,
    Lane,
    Stats,
    Violation,
    check_call,
    check_differential,
    check_host_writes,
    clone,
    documented_gate,
    leaf_label,
)
from .strategies import (
    TARGETS,
    calls,
    controls,
    examples,
    guest_registers,
    platforms,
)

POLICY_CHOICES = ("legacy", "hardened", "both")


def _scenario(ex: dict, guest: dict, policy: str | None = None, platform: dict | None = None) -> dict:
    kvm = {"tree": ex["tree"]} | ({"policy": policy} if policy else {})
    return {"td": ex["td"], "kvm": kvm, "guest": guest, "platform": ex["platform"] if platform is None else platform}


def policies_of(policy: str) -> tuple[str, ...]:
    if policy not in POLICY_CHOICES:
        raise ValueError(f"unknown policy {policy!r}; accepted: {', '.join(POLICY_CHOICES)}")
    return ("legacy", "hardened") if policy == "both" else (policy,)


def run_example(ex: dict, policies: tuple[str, ...] = ("legacy", "hardened"), stats: Stats | None = None) -> None:
    """Run an example's calls under each policy (one vCPU and one host per policy, kept across the
    calls) and check every property; raise the first :class:`Violation`, located: the call, the
    policy (None: the module alone) and the host as it was just before the call."""
    lanes = [Lane(p, KvmVcpu(p), S.parse(_scenario(ex, {})).platform) for p in policies]
    for n, call in enumerate(ex["calls"]):
        sc = S.parse(_scenario(ex, call["guest"]))
        td, before = sc.td, sc.guest
        lane: Lane | None = None
        pre = lanes[0].platform
        try:
            check_host_writes(td, before, call.get("host"))
            rts: dict[str, RoundTrip] = {}
            for lane in lanes:
                pre = clone(lane.platform)
                rts[lane.policy] = check_call(td, before, lane, pre, stats)
                if lane.policy == "hardened" and "legacy" in rts:
                    check_differential(td, before, rts["hardened"], lane.platform, pre)
        except Violation as v:
            v.call, v.policy = n, lane.policy if lane else None
            v.platform = ex["platform"] if n == 0 else platform_json(pre, ex["platform"])
            if n > 0:
                v.expressible.append(
                    f"the {n} earlier call(s) on the same KVM vCPU (the whole example "
                    "is written beside this file as *.sequence.json)"
                )
            raise


def platform_json(p: Platform, base: dict) -> dict:
    """The scenario ``platform`` object of a host whose state earlier calls changed: MSRs as they are
    now, the userspace answers not yet consumed, MMIO memory written folded into the MMIO answers
    (a read returns the written word first, then the answer: the same reads)."""
    out = copy.deepcopy(base)
    out["msrs"] = {f"{k:#x}": hex64(v) for k, v in p.msrs.items()}
    u = out.setdefault("userspace", {})
    u["hypercall_ret"] = [hex64(v) for v in p.userspace.hypercall_ret]
    u["mmio"] = {f"{k:#x}": hex64(v) for k, v in {**p.userspace.mmio, **p.memory}.items()}
    return out


# === counterexamples ===============================================================================
def hexed(value: Any) -> Any:
    """Values above 32 bits as the contract's hex strings (JSON-safe for any reader); smaller ones,
    booleans and strings kept."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, dict):
            return {k: hexed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [hexed(v) for v in value]
        return value
    return value if value <= U32 else hex64(value) if value <= U64 else f"{value:#x}"


def guest_json(guest: dict) -> dict:
    """A scenario ``guest`` object in the contract's register format (16 hex digits)."""
    out = {k: (hex64(v) if k in GPR_NAMES or k == "rip" else v) for k, v in guest.items()}
    out["xmm"] = {k: f"0x{v:032x}" for k, v in guest.get("xmm", {}).items()}
    return out


def _meaning(sc: dict) -> tuple:
    parsed = S.parse(sc)
    return parsed.td, parsed.policy, parsed.guest, parsed.platform


def without_defaults(sc: dict) -> dict:
    """The same scenario, minus every field that holds the contract's default: a field is dropped
    when the scenario parses to the same TD, policy, guest and platform without it.  (Presentation
    only: the meaning is unchanged, so this is not shrinking.)"""
    meaning = _meaning(sc)
    sc = copy.deepcopy(sc)
    for path in (
        [("guest", k) for k in sc["guest"]]
        + [("platform", "userspace", k) for k in sc["platform"].get("userspace", {})]
        + [("platform", k) for k in sc["platform"]]
    ):
        *parents, key = path
        trial = copy.deepcopy(sc)
        holder = trial
        for p in parents:
            holder = holder.get(p, {})
        if key not in holder:
            continue
        del holder[key]
        if _meaning(trial) == meaning:
            sc = trial
    return sc


def counterexample(ex: dict, v: Violation) -> dict:
    """The scenario that replays the failing call (``tdvmcall run`` reads it), with what it cannot
    carry said in ``comment``."""
    n = v.call or 0
    call = ex["calls"][n]
    policy = "hardened" if v.prop == "differential" else (v.policy or "hardened")
    sc = without_defaults(
        _scenario(
            ex, guest_json(call["guest"]), policy, hexed(v.platform if v.platform is not None else ex["platform"])
        )
    )
    notes = [f"fuzz counterexample: {v.prop}: {v.detail}"]
    if v.prop == "differential":
        notes.append("replay it with --policy legacy as well and compare guest and userspace exits")
    if v.policy is None:
        notes.append(
            "found with arbitrary VMM registers given to TDH.VP.ENTER, which a scenario cannot carry: "
            f"vmm = {hexed(call['host']['vmm'])}, xmm = {hexed(call['host']['xmm'])}"
        )
    if v.expressible:
        notes.append("not carried by this file: " + "; ".join(v.expressible))
    sc["name"] = f"fuzz-{v.prop}"
    sc["comment"] = " | ".join(notes)
    return sc


def replays(sc: dict, prop: str) -> bool:
    """Whether the scenario alone (fresh vCPU, no host writes) shows the same property failing."""
    ex = {"td": sc["td"], "tree": sc["kvm"]["tree"], "platform": sc["platform"], "calls": [{"guest": sc["guest"]}]}
    try:
        run_example(ex, ("legacy", "hardened") if prop == "differential" else (sc["kvm"]["policy"],))
    except Violation as v:
        return v.prop == prop
    return False


# === the campaign ==================================================================================
@dataclass
class Failure:
    example: dict
    violation: Violation


@dataclass
class CampaignResult:
    seed: int
    policies: tuple[str, ...]
    examples: int
    seconds: float
    stats: Stats
    failure: Failure | None = None

    @property
    def executions_per_second(self) -> float:
        return self.stats.executions / self.seconds if self.seconds > 0 else 0.0

    def coverage(self) -> dict[str, dict[str, dict[str, int]]]:
        """policy -> leaf -> verdict -> executions."""
        out: dict[str, dict[str, dict[str, int]]] = {p: {} for p in self.policies}
        for (pol, leaf, verdict), n in sorted(self.stats.coverage.items()):
            out.setdefault(pol, {}).setdefault(leaf, {})[verdict] = n
        return out


def target_labels() -> list[str]:
    """Every call the campaign aims at, by coverage name."""
    return [leaf_label(t) if t is not None else "unknown GHCI leaf" for t in TARGETS]


def _batch(seed: int, n: int, policies: tuple[str, ...], stats: Stats, failures: list[Failure], max_calls: int) -> int:
    """Run ``n`` hypothesis examples from ``seed``; returns how many ran.  A violation is recorded
    (hypothesis replays the shrunk example last, so the last record is the minimal one) and the
    batch stops."""
    ran = 0

    @hypothesis_seed(seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        derandomize=False,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.shrink),
        verbosity=Verbosity.quiet,
        print_blob=False,
    )
    @given(examples(max_calls))
    def campaign_property(ex: dict) -> None:
        nonlocal ran
        ran += 1
        try:
            run_example(ex, policies, stats)
        except Violation as v:
            failures.append(Failure(copy.deepcopy(ex), v))
            raise

    with contextlib.suppress(Violation):
        campaign_property()
    return ran


def campaign(
    *,
    examples: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    policy: str = "both",
    batch: int = 100,
    max_calls: int = 3,
    progress: Callable[[CampaignResult], None] | None = None,
) -> CampaignResult:
    """Run the campaign for ``examples`` examples or ``seconds`` seconds (whichever is given; the
    default is 1000 examples), in batches of ``batch`` examples, each with a hypothesis seed drawn
    from ``seed``, so that a run with ``--examples`` and ``--seed`` is deterministic.  ``examples``
    in the result counts every run of the property, the shrinker's included.  Stops at the first
    violation (after hypothesis has shrunk it)."""
    policies = policies_of(policy)
    if examples is None and seconds is None:
        examples = 1000
    stats, failures = Stats(), []
    result = CampaignResult(seed, policies, 0, 0.0, stats)
    start = time.perf_counter()
    batch_seeds = random.Random(seed)  # one hypothesis seed per batch, derived from the campaign's
    while not failures:
        if examples is not None and result.examples >= examples:
            break
        if seconds is not None and time.perf_counter() - start >= seconds:
            break
        n = batch if examples is None else min(batch, examples - result.examples)
        result.examples += _batch(batch_seeds.getrandbits(64), n, policies, stats, failures, max_calls)
        result.seconds = time.perf_counter() - start
        if progress is not None:
            progress(result)
    result.seconds = time.perf_counter() - start
    result.failure = failures[-1] if failures else None
    return result


__all__ = [
    "PROPERTIES",
    "VIOLATION",
    "CampaignResult",
    "Violation",
    "calls",
    "campaign",
    "controls",
    "counterexample",
    "documented_gate",
    "examples",
    "guest_registers",
    "platforms",
    "policies_of",
    "replays",
    "run_example",
]
