"""The report of ``tdvmcall trace`` as plain data (what ``--json`` prints), from the audit's
aggregates: few rows (one per task, vCPU, reason and mask), so plain Python; Parquet is
``parquet``, the plot ``plot``.  Facts: docs/abi.md §4, verdicts from ``verdict`` and
the leaf table."""

from __future__ import annotations

from collections import defaultdict

from ..abi.codes import EXIT_REASON_TDCALL
from ..abi.regs import GPR_MASK, names_in
from ..kvm.trees import tree_rule
from .audit import Audit
from .rows import is_tdvmcall_reason
from .verdict import FAILING, KINDS, VERDICTS, classify_exit


def td_tasks(audit: Audit) -> set[int]:
    """Task ids of TDs: given (``--td``: a pid or tgid) or inferred (a task with a TDCALL exit
    is a TD, and so is every task of the same process when the trace shows tgids)."""
    tasks = audit.tasks.tasks
    if audit.td_pids is not None:
        return {i for i, t in enumerate(tasks) if t.pid in audit.td_pids or t.tgid in audit.td_pids}
    cols = audit.key_columns()
    reasons = audit.reasons.reasons
    tdcall = {
        task
        for task, rid in zip(cols["task"].tolist(), cols["rid"].tolist())
        if reasons[rid].number == EXIT_REASON_TDCALL and is_tdvmcall_reason(reasons[rid])
    }
    procs = {(tasks[i].source, tasks[i].tgid) for i in tdcall if tasks[i].tgid is not None}
    return tdcall | {i for i, t in enumerate(tasks) if t.tgid is not None and (t.source, t.tgid) in procs}


def exit_rows(audit: Audit, td: set[int]) -> list[dict]:
    """The aggregates by (task, vCPU, reason, mask), each with its task, reason and classification."""
    cols = audit.key_columns()
    tasks, reasons = audit.tasks.tasks, audit.reasons.reasons
    rows = []
    for task, vcpu, rid, mask, n in zip(*(cols[c].tolist() for c in ("task", "vcpu", "rid", "mask", "n"))):
        t, r = tasks[task], reasons[rid]
        c = classify_exit(r, mask, task in td, audit.tree)
        rows.append(
            {
                "source": t.source,
                "process": t.process,
                "comm": t.comm,
                "task_label": t.label,
                "vcpu": vcpu,
                "td": task in td,
                "reason_name": r.name,
                "reason_flags": r.flags,
                "mask": mask,
                "n": n,
                "kind": c.kind,
                "verdict": c.verdict,
                "detail": c.detail,
                "missing": c.missing,
                "refused_for": c.refused_for,
            }
        )
    return rows


def _table(rows: list[dict], keys: list[str]) -> list[dict]:
    """Exit counts grouped by ``keys``, sorted by them: all exits, TDVMCALL exits of TDs, per
    verdict, and the refused (refused + internal error) and depends shares of the TDVMCALL exits."""
    groups: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(("exits", "tdvmcall", *VERDICTS), 0))
    for r in rows:
        g = groups[tuple(r[k] for k in keys)]
        g["exits"] += r["n"]
        if r["kind"] == "tdvmcall":
            g["tdvmcall"] += r["n"]
            g[r["verdict"]] += r["n"]
    return [
        {
            **dict(zip(keys, key)),
            **g,
            "refused_share": _share(sum(g[v] for v in FAILING), g["tdvmcall"]),
            "depends_share": _share(g["depends"], g["tdvmcall"]),
        }
        for key, g in sorted(groups.items())
    ]


def _share(part: int, whole: int) -> float:
    return round(part / whole, 6) if whole else 0.0


def build_report(audit: Audit, td: set[int], top: int = 10) -> dict:
    """The whole report as plain data (what ``--json`` prints)."""
    rows = exit_rows(audit, td)
    td_rows = [r for r in rows if r["kind"] == "tdvmcall"]
    per_mask = [
        dict(r, mask=f"{r['mask']:#06x}", registers=" ".join(names_in(r["mask"] & GPR_MASK, 16)))
        for r in _table(td_rows, ["mask"])
    ]
    pair_keys = ("reason_name", "mask", "verdict", "detail", "missing", "refused_for", "reason_flags")
    pair_exits: dict[tuple, int] = defaultdict(int)
    for r in td_rows:
        pair_exits[tuple(r[k] for k in pair_keys)] += r["n"]
    rank = {"refused": 0, "internal-error": 0, "depends": 1, "inconsistent": 2, "completes": 3}
    pairs = [
        {
            "mask": f"{mask:#06x}",
            "verdict": verdict,
            "detail": detail,
            "missing": missing,
            "refused_for": refused_for,
            "exits": n,
            "reason": reason,
            "reason_flags": flags,
        }
        for (reason, mask, verdict, detail, missing, refused_for, flags), n in sorted(
            pair_exits.items(), key=lambda kv: (rank[kv[0][2]], -kv[1], kv[0][0], kv[0][1], kv[0][6])
        )
    ]
    by_kind = {kd: sum(r["n"] for r in rows if r["kind"] == kd) for kd in KINDS}
    by_verdict = {v: sum(r["n"] for r in td_rows if r["verdict"] == v) for v in VERDICTS}
    n_td = by_kind["tdvmcall"]
    inferred = audit.td_pids is None
    # task ids follow the order in which the parsing threads met them: list tasks in a stable order
    order = {i.name: n for n, i in enumerate(audit.inputs)}
    ordered = sorted(
        enumerate(audit.tasks.tasks), key=lambda it: (order.get(it[1].source, 0), it[1].process, it[1].pid, it[1].comm)
    )
    rule = tree_rule(audit.tree)
    return {
        "tree": rule.name,
        "tree_rule": {
            "release": rule.release,
            "relabel": rule.relabel,
            "bus_lock_user_exit": rule.bus_lock_user_exit,
            "assumed": "given" if audit.tree_given else "default",
        },
        "inputs": [
            {
                "name": i.name,
                "format": i.format,
                "compression": i.compression,
                "bytes": i.bytes,
                "lines": i.counts.lines,
                "kvm_exit_lines": i.counts.kvm_exit_lines,
                "parsed": i.counts.parsed,
                "unparsed": i.counts.unparsed,
                "other_events": i.counts.other_events,
                "comments": i.counts.comments,
                "truncated_last_line": i.counts.truncated_last_line,
            }
            for i in audit.inputs
        ],
        "unparsed_examples": [
            {"input": i.name, "line": n, "text": t[:300]} for i in audit.inputs for n, t in i.counts.bad
        ],
        "td": {
            "mode": "inferred" if inferred else "given",
            "rule": (
                "a task with a TDCALL exit is a TD (and every task of its process when tgids are shown)"
                if inferred
                else "tasks whose pid or tgid was given with --td"
            ),
            "given": sorted(audit.td_pids) if audit.td_pids is not None else None,
            "tasks": [f"{t.source}:{t.label}" for i, t in ordered if i in td],
            "non_td_tasks": [f"{t.source}:{t.label}" for i, t in ordered if i not in td],
        },
        "totals": {
            "exits": sum(r["n"] for r in rows),
            **{f"{kd}_exits": v for kd, v in by_kind.items()},
            "verdicts": by_verdict,
            "refused_share": _share(sum(by_verdict[v] for v in FAILING), n_td),
            "depends_share": _share(by_verdict["depends"], n_td),
        },
        "per_process": _table(rows, ["source", "process", "comm", "td"]),
        "per_vcpu": _table(rows, ["source", "process", "task_label", "vcpu", "td"]),
        "per_reason": _table(td_rows, ["reason_name"]),
        "per_mask": per_mask,
        "pairs": pairs,
        "top_offending": [p for p in pairs if p["verdict"] in FAILING + ("depends",)][:top],
    }


def finish(audit: Audit, td: set[int], top: int = 10) -> dict:
    """The report for these TD tasks (:func:`td_tasks`), writing the Parquet file first, if asked."""
    if audit.parquet is not None:
        audit.parquet.close(td)
    return build_report(audit, td, top)
