"""Fuzzing the model's promises: hypothesis strategies over the whole input space, the properties
every execution must satisfy, and the campaign behind ``tdvmcall fuzz``.

An *example* is a TD (module 1.0/1.5, NO_RBP_MOD on/off), a kernel tree, an initial platform (the
``platform`` object of a scenario, so that every fuzzed host is expressible in the scenario contract)
and a sequence of one to three TDVMCALLs.  Each policy runs the whole sequence on one ``KvmVcpu`` and
one ``Platform`` (state carries over: MSRs written, MMIO memory, userspace answers consumed, the
register cache), and every call is checked against the properties below.  Hypothesis draws and shrinks
the examples; nothing here shrinks by hand.

The strategies are in :mod:`.strategies`, the properties in :mod:`.properties`.

Two modes draw the examples: ``hypothesis`` (the default: hypothesis draws and shrinks them) and
``fast`` (:class:`.strategies.Draw` draws the same examples directly from ``random.Random``, in
batches spread over worker processes; no shrinking).  Both run the same ``run_example`` and write
the same counterexample files.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
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
from ..console import available_cpus, check_interrupt, worker_pool
from ..guest import RoundTrip
from ..kvm.platform import Platform
from ..kvm.tdx import (
    KvmVcpu,
)
from .properties import (
    MAX_EXITS_PER_CALL,
    PROPERTIES,
    VIOLATION,
    Lane,
    Stats,
    TooManyExits,
    Violation,
    bounded,
    check_call,
    check_differential,
    check_host_writes,
    clone,
    documented_gate,
    leaf_label,
)
from .strategies import (
    TARGETS,
    Draw,
    calls,
    controls,
    examples,
    guest_registers,
    platforms,
)

POLICY_CHOICES = ("legacy", "hardened", "both")
MODES = ("hypothesis", "fast")


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
    first = S.parse(_scenario(ex, ex["calls"][0]["guest"]))
    td, host = first.td, bounded(first.platform)
    lanes = [Lane(p, KvmVcpu(p), host if i == 0 else clone(host)) for i, p in enumerate(policies)]
    for n, call in enumerate(ex["calls"]):
        # each call's guest (the TD and the initial host were parsed once, above)
        before = first.guest if n == 0 else S.parse_guest(call["guest"])
        lane: Lane | None = None
        pre = lanes[0].platform
        try:
            check_host_writes(td, before, call.get("host"))
            rts: dict[str, RoundTrip] = {}
            for lane in lanes:
                lane.platform.exit_limit = len(lane.platform.exits) + MAX_EXITS_PER_CALL
                pre = clone(lane.platform)
                rts[lane.policy] = check_call(td, before, lane, pre, stats)
                if lane.policy == "hardened" and "legacy" in rts:
                    check_differential(td, before, rts["hardened"], lane.platform, pre)
        except TooManyExits:
            # the main run of a call meets the bound first (its re-runs see the same registers
            # from the same host), before the call is counted; the example stops there
            if stats is not None:
                stats.skipped += 1
            return
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
    mode: str = "hypothesis"
    workers: int = 1

    @property
    def executions_per_second(self) -> float:
        return self.stats.executions / self.seconds if self.seconds > 0 else 0.0

    def executions_by_policy(self) -> dict[str, int]:
        out = dict.fromkeys(self.policies, 0)
        for (pol, _, _), n in self.stats.coverage.items():
            out[pol] = out.get(pol, 0) + n
        return out

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
        check_interrupt()  # a Ctrl-C that landed in hypothesis's gc callback was swallowed there
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


# === the fast mode ===================================================================================
#: examples per fast batch: about 800 executions with both policies, a tenth of a second
FAST_BATCH = 200
#: at most one progress report per this many seconds in the fast mode
FAST_PROGRESS_SECONDS = 5.0


def fast_batch(seed: int, n: int, policies: tuple[str, ...], max_calls: int) -> tuple[int, Stats, dict | None]:
    """Run ``n`` examples drawn directly (:class:`Draw`) from ``seed``, stopping at the first
    violation.  Returns how many ran, their figures, and the failing example (or None).  Runs in a
    worker process: everything it takes and returns is plain data."""
    draw = Draw(random.Random(seed))
    stats = Stats()
    for i in range(n):
        check_interrupt()  # one worker runs its batches in this process
        ex = draw.example(max_calls)
        try:
            run_example(ex, policies, stats)
        except Violation:
            return i + 1, stats, ex
    return n, stats, None


class _Inline(Executor):
    """An executor that runs each task at once, in this process (one worker)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f


def fast_campaign(
    *,
    examples: int | None = None,
    seconds: float | None = None,
    seed: int = 0,
    policy: str = "both",
    workers: int = 1,
    batch: int = FAST_BATCH,
    max_calls: int = 3,
    progress: Callable[[CampaignResult], None] | None = None,
) -> CampaignResult:
    """The fast mode: the same examples and properties as :func:`campaign`, drawn directly with
    ``random.Random`` in batches of ``batch`` examples (batch k's seed is the k-th 64-bit draw from
    ``seed``), run by ``workers`` processes.  Batches are taken in order, so a run with ``examples``
    and ``seed`` is deterministic whatever the number of workers: the same figures, and the same
    first violation (that of the lowest failing batch).  Stops at the first violation, unshrunk;
    the failing example is run again here, which gives the located violation."""
    policies = policies_of(policy)
    if workers < 1:
        raise ValueError(f"workers: {workers} must be at least 1")
    if examples is None and seconds is None:
        examples = 1000
    result = CampaignResult(seed, policies, 0, 0.0, Stats(), mode="fast", workers=workers)
    seeds = random.Random(seed)
    start = last_report = time.perf_counter()
    planned = 0

    def next_size() -> int:
        if examples is not None:
            return min(batch, examples - planned)
        return batch if time.perf_counter() - start < (seconds or 0) else 0

    # forked workers that end with the command (Ctrl-C, SIGTERM, the parent killed): console.worker_pool
    pools: contextlib.AbstractContextManager[Executor] = _Inline() if workers == 1 else worker_pool(workers)
    with pools as pool:
        pending: deque[Future] = deque()
        while True:
            check_interrupt()
            while len(pending) < 2 * workers and (n := next_size()) > 0:
                pending.append(pool.submit(fast_batch, seeds.getrandbits(64), n, policies, max_calls))
                planned += n
            if not pending:
                break
            ran, stats, failing = pending.popleft().result()
            result.examples += ran
            result.stats.merge(stats)
            result.seconds = time.perf_counter() - start
            if failing is not None:
                for f in pending:
                    f.cancel()
                result.failure = _located(failing, policies)
                break
            if progress is not None and result.seconds - (last_report - start) >= FAST_PROGRESS_SECONDS:
                last_report = time.perf_counter()
                progress(result)
    result.seconds = time.perf_counter() - start
    return result


def _located(ex: dict, policies: tuple[str, ...]) -> Failure:
    """Run a failing example again (here, not in a worker) for its located :class:`Violation`."""
    try:
        run_example(ex, policies)
    except Violation as v:
        return Failure(ex, v)
    raise RuntimeError("a failing example passed when run again: the model is not deterministic")


__all__ = [
    "PROPERTIES",
    "VIOLATION",
    "CampaignResult",
    "Violation",
    "available_cpus",
    "calls",
    "campaign",
    "controls",
    "counterexample",
    "documented_gate",
    "examples",
    "fast_campaign",
    "guest_registers",
    "platforms",
    "policies_of",
    "replays",
    "run_example",
]
