"""``tdvmcall fuzz``: the property campaign of :mod:`tdvmcall.fuzz` on the command line."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:  # the campaign (and hypothesis) load only when `tdvmcall fuzz` runs
    from . import campaign as F

VERDICT_ORDER = ("completed", "userspace", "refused", "internal_error", "run_failed", "module-gate", "guest-fault")


def summary(r: F.CampaignResult, written: dict | None) -> dict:
    """The ``--json`` object: figures, coverage and the violation (None when clean)."""
    from . import campaign as F

    cov = r.coverage()
    out: dict = {
        "clean": r.failure is None,
        "mode": r.mode,
        "workers": r.workers,
        "seed": r.seed,
        "policies": list(r.policies),
        "examples": r.examples,
        "executions": r.stats.executions,
        "executions_by_policy": r.executions_by_policy(),
        "skipped_examples": r.stats.skipped,
        "seconds": round(r.seconds, 3),
        "executions_per_second": round(r.executions_per_second, 1),
        "coverage": {
            "combinations": len(r.stats.coverage),
            "leaves": {p: sorted(cov.get(p, {})) for p in r.policies},
            "targets": F.target_labels(),
            "by_policy": cov,
        },
        "violation": None,
    }
    if r.failure is not None:
        v = r.failure.violation
        out["violation"] = {
            "property": v.prop,
            "detail": v.detail,
            "policy": v.policy,
            "call": v.call,
            "calls_in_example": len(r.failure.example["calls"]),
            "not_in_scenario": v.expressible,
            **(written or {}),
        }
    return out


def write_counterexample(r: F.CampaignResult, path: Path) -> dict:
    """Write the scenario of the failing call (and, for a sequence, the whole example beside it)."""
    from ..console import output_file
    from . import campaign as F

    assert r.failure is not None
    sc = F.counterexample(r.failure.example, r.failure.violation)
    # each file under a temporary name, renamed when whole: an interrupt or a kill never leaves a
    # partial counterexample under the name a user (or CI) reads
    with output_file(path) as tmp:
        tmp.write_text(json.dumps(sc, indent=2) + "\n")
    info = {"scenario": str(path), "scenario_replays": F.replays(sc, r.failure.violation.prop)}
    if len(r.failure.example["calls"]) > 1:
        seq = path.with_suffix(".sequence.json")
        with output_file(seq) as tmp:
            tmp.write_text(json.dumps(F.hexed(r.failure.example), indent=2) + "\n")
        info["sequence"] = str(seq)
    return info


def _workers(n: int | None) -> str:
    return "1 worker" if n == 1 else f"{n} workers"


def render_verdict(r: F.CampaignResult, written: dict | None, out: Console) -> None:
    """The answer, first: clean, or the violation and where its counterexample is."""
    if r.failure is None:
        out.print(
            f"[green]clean[/green]: every property held on every execution ({r.stats.executions} executions, "
            f"{r.examples} examples)",
            highlight=False,
            soft_wrap=True,
        )
        return
    v = r.failure.violation
    out.print(
        f"[red]VIOLATION[/red] of {v.prop} ({v.policy or 'module alone'}, call {v.call}): {v.detail}",
        highlight=False,
        soft_wrap=True,
    )
    assert written is not None
    alone = "reproduces" if written["scenario_replays"] else "does NOT reproduce"
    out.print(
        f"counterexample: {written['scenario']} (replay: tdvmcall run {written['scenario']}"
        f"{' --policy ' + v.policy if v.policy else ''}); it {alone} the violation alone",
        highlight=False,
        soft_wrap=True,
    )
    for note in v.expressible:
        out.print(f"not in the scenario: {note}", highlight=False, soft_wrap=True)
    if "sequence" in written:
        out.print(f"whole example: {written['sequence']}", highlight=False, soft_wrap=True)


def render(r: F.CampaignResult, out: Console) -> None:
    """The figures and the coverage, after the verdict."""
    from rich.table import Table

    from . import campaign as F

    cov = r.coverage()
    out.print(
        f"fuzz: {r.mode} mode{f', {_workers(r.workers)}' if r.mode == 'fast' else ''}, seed {r.seed}, "
        f"policies {', '.join(r.policies)}",
        highlight=False,
        soft_wrap=True,
    )
    t = Table()
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("examples", str(r.examples))
    t.add_row("executions", str(r.stats.executions))
    for pol, n in r.executions_by_policy().items():
        t.add_row(f"  {pol}", str(n))
    if r.stats.skipped:
        t.add_row("examples skipped (a call of too many exits)", str(r.stats.skipped))
    t.add_row("seconds", f"{r.seconds:.1f}")
    t.add_row("executions/s", f"{r.executions_per_second:.0f}")
    reached = {leaf for p in r.policies for leaf in cov.get(p, {})}
    t.add_row("leaves reached", f"{len(reached & set(F.target_labels()))} of {len(F.target_labels())}")
    t.add_row("(leaf, verdict, policy) combinations reached", str(len(r.stats.coverage)))
    out.print(t)
    c = Table(title="coverage: executions per leaf and verdict")
    c.add_column("leaf")
    for p in r.policies:
        c.add_column(p)
    for leaf in F.target_labels():
        cells = []
        for p in r.policies:
            got = cov.get(p, {}).get(leaf, {})
            cells.append(" ".join(f"{v}:{got[v]}" for v in VERDICT_ORDER if v in got) or "-")
        c.add_row(leaf, *cells)
    out.print(c)


def register(app: typer.Typer) -> None:
    @app.command()
    def fuzz(
        seconds: float | None = typer.Option(None, "--seconds", help="Run for this many seconds."),
        examples: int | None = typer.Option(
            None,
            "--examples",
            help="Run exactly this many examples (default 1000 when "
            "--seconds is not given); deterministic with --seed.",
        ),
        seed: int | None = typer.Option(None, "--seed", help="Seed (default: a random one, printed)."),
        policy: str = typer.Option(
            "both", "--policy", help="legacy, hardened or both (both adds the differential property)."
        ),
        out_file: Path = typer.Option(
            Path("fuzz-counterexample.json"), "--out", help="Where to write the counterexample scenario on a violation."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print figures, coverage and any violation as JSON."),
        mode: str = typer.Option(
            "hypothesis",
            "--mode",
            help="hypothesis (draws and shrinks the examples) or fast (draws the same examples directly "
            "with random.Random, over --workers processes, no shrinking; same properties, same "
            "counterexample file).",
        ),
        workers: int | None = typer.Option(
            None, "--workers", help="Fast mode: worker processes (default: the CPUs available)."
        ),
    ) -> None:
        """Fuzz the model's promises with hypothesis: any RAX, RCX, register and XMM values, every leaf
        and hypercall, module 1.0/1.5, NO_RBP_MOD on/off, random platform and userspace answers, in
        sequences of calls on one KVM vCPU.  Every execution is checked for confidentiality,
        integrity, the module gate, the register cache, hardened refusals, completeness and (with
        --policy both) legacy/hardened agreement; see docs/fuzz.md.

        --mode fast draws the same examples without hypothesis, over several processes: thousands
        of executions per second instead of hundreds; its counterexamples are not shrunk.

        Progress goes to stderr.  On a violation the (hypothesis mode: shrunk) counterexample is
        written as a scenario that `tdvmcall run` replays; exit status 1.
        """
        from ..console import (
            available_cpus,
            emit_json,
            fail,
            pick,
            require_count,
            require_finite_positive,
            worker_count,
            writable_file,
        )

        if seconds is not None and examples is not None:
            fail("--seconds and --examples: give one of them, not both")
        require_finite_positive(seconds, "--seconds")  # nan would pass a `<= 0` test and run forever
        require_count(examples, "--examples", 1)
        writable_file(out_file, "--out")  # before the campaign: a counterexample must have a place
        from . import campaign as F  # hypothesis: only once the options are known to be good

        policy = pick(policy, F.POLICY_CHOICES, "--policy", "policy")  # any case, as every command
        mode = pick(mode, F.MODES, "--mode", "mode")
        if workers is not None and mode != "fast":
            fail(f"--workers: {workers} is for --mode fast")
        if mode == "fast":  # as sweep --jobs: at most one per CPU and per batch; 0 is the default
            batches = None if examples is None and seconds is not None else -(-(examples or 1000) // F.FAST_BATCH)
            workers = worker_count(workers, "--workers", available_cpus(), batches)
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 32)
        # hypothesis keeps a cache (the constants it mines from source) in ./.hypothesis unless told
        # otherwise: keep it out of the user's working directory
        cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(cache_home / "tdvmcall" / "hypothesis"))

        def note(line: str) -> None:  # progress: plain lines, never wrapped (terminals and logs)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

        note(f"fuzz: seed {seed}, policy {policy}, mode {mode}" + (f", {_workers(workers)}" if mode == "fast" else ""))

        def progress(r: F.CampaignResult) -> None:
            note(
                f"fuzz: {r.examples} examples, {r.stats.executions} executions in {r.seconds:.1f} s "
                f"({r.executions_per_second:.0f}/s), {len(r.stats.coverage)} leaf/verdict/policy"
            )

        if mode == "fast":
            result = F.fast_campaign(
                examples=examples,
                seconds=seconds,
                seed=seed,
                policy=policy,
                workers=workers or 1,
                progress=progress,
            )
        else:
            result = F.campaign(examples=examples, seconds=seconds, seed=seed, policy=policy, progress=progress)
        written = None
        if result.failure is not None:
            try:
                written = write_counterexample(result, out_file)
            except OSError as e:  # the place went away during the run: keep the counterexample anyway
                sc = F.counterexample(result.failure.example, result.failure.violation)
                sys.stderr.write(json.dumps(sc) + "\n")
                fail(f"--out: cannot write {out_file} ({e.strerror or e}); the counterexample is the line above", 1)
        if as_json:
            emit_json(summary(result, written))
        else:
            from ..console import out  # tables at their natural width: verdict counts never cut

            render_verdict(result, written, out)  # the answer first, as check and scan do
            render(result, out)
        sys.stdout.flush()
        if result.failure is not None:
            raise typer.Exit(1)
