"""``tdvmcall trace --to-parquet``: one row per parsed exit (schema: :data:`PARQUET_COLUMNS`,
documented in docs/trace.md), written with pyarrow alone, a chunk's rows at a time, so that memory
does not grow with the input.  Classification comes from ``verdict``, as in the report and
the plot."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..console import output_file
from ..kvm.trees import DEFAULT_TREE
from .rows import Columns, ReasonTable, TaskTable, is_tdvmcall_reason
from .verdict import classify_rows

#: the Parquet columns
PARQUET_COLUMNS = (
    ("source", "string"),
    ("line", "uint64"),
    ("ts", "float64"),
    ("cpu", "uint32"),
    ("comm", "string"),
    ("pid", "int64"),
    ("tgid", "int64"),
    ("vcpu", "uint32"),
    ("reason", "string"),
    ("reason_flags", "string"),
    ("info1", "uint64"),
    ("mask", "uint64"),
    ("td", "bool"),
    ("kind", "string"),
    ("verdict", "string"),
    ("missing", "string"),
)


#: the key of the file's key-value metadata that holds ``--tree`` (the verdicts' KVM tree)
TREE_METADATA_KEY = "tdvmcall.tree"


def parquet_schema() -> pa.Schema:
    return pa.schema([(name, pa.type_for_alias(t)) for name, t in PARQUET_COLUMNS])


class ParquetSink:
    """Writes parsed exits to ``path``.  Whether a task is a TD is known only at the end (when it
    is inferred), so rows go to a temporary file first (task and reason ids) and are rewritten,
    batch by batch, with tasks and reasons named and the ``td``, ``kind``, ``verdict`` and
    ``missing`` columns added.

    Nothing partial is ever left under a name: the rows' file has no name at all (an anonymous
    temporary file in the output's folder, gone when closed or when the process ends, however it
    ends), and the output is written under a unique temporary name and renamed to ``path`` only when
    complete (``console.output_file``: an interrupt removes it).  Two runs writing the same file
    share nothing; the last to finish leaves its complete file."""

    def __init__(self, path: str, tasks: TaskTable, reasons: ReasonTable, tree: str = DEFAULT_TREE):
        self.path = path
        self.tree = tree  # the KVM tree whose rule the verdict column follows
        self.tasks, self.reasons = tasks, reasons
        self._rows = None  # the anonymous temporary file, opened with the first rows
        self._writer: pq.ParquetWriter | None = None

    def write(self, rows: Columns, source: str) -> None:
        t = pa.table({**rows, "source": pa.array([source] * len(rows["line"]), pa.string())})
        if self._writer is None:
            folder = os.path.dirname(os.path.abspath(self.path))
            self._rows = tempfile.TemporaryFile(prefix=".tdvmcall-rows.", dir=folder)  # noqa: SIM115 - closed by discard()
            self._writer = pq.ParquetWriter(self._rows, t.schema, compression="zstd", write_statistics=False)
        self._writer.write_table(t)

    def discard(self) -> None:
        """Stop without writing (the audit failed): drop the rows."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._rows is not None:
            self._rows.close()
            self._rows = None

    def close(self, td: set[int]) -> None:
        tasks, reasons = self.tasks.tasks, self.reasons.reasons
        # per task id and per reason id, the columns they name
        comm = pa.array([t.comm for t in tasks], pa.string())
        pid = pa.array([t.pid for t in tasks], pa.int64())
        tgid = pa.array([t.tgid for t in tasks], pa.int64())
        is_td = np.array([i in td for i in range(len(tasks))], bool)
        name = pa.array([r.name for r in reasons], pa.string())
        flags = pa.array([r.flags for r in reasons], pa.string())
        has_mask = np.array([is_tdvmcall_reason(r) for r in reasons], bool)
        # the columns are parquet_schema()'s; the file's key-value metadata names the KVM tree whose
        # rules gave the verdict column (a reader of many hosts' files can tell them apart)
        schema = parquet_schema().with_metadata({TREE_METADATA_KEY: self.tree})
        with output_file(self.path) as partial:
            self._rewrite(partial, schema, comm, pid, tgid, is_td, name, flags, has_mask, reasons)

    def _rewrite(self, partial, schema, comm, pid, tgid, is_td, name, flags, has_mask, reasons) -> None:
        out = pq.ParquetWriter(str(partial), schema, compression="zstd")
        try:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                assert self._rows is not None
                self._rows.seek(0)
                rows = pq.ParquetFile(self._rows)
                for group in range(rows.num_row_groups):  # a chunk's rows (iter_batches reads far ahead)
                    batch = rows.read_row_group(group)
                    task = batch["task"]
                    rid, info1 = batch["rid"].to_numpy(), batch["info1"].to_numpy()
                    row_td, row_has = is_td[task.to_numpy()], has_mask[rid]
                    kind, verdict, missing = _classes(reasons, row_td, rid, np.where(row_has, info1, 0), self.tree)
                    out.write_table(
                        pa.table(
                            {
                                "source": batch["source"],
                                "line": batch["line"],
                                "ts": batch["ts"],
                                "cpu": batch["cpu"],
                                "comm": comm.take(task),
                                "pid": pid.take(task),
                                "tgid": tgid.take(task),
                                "vcpu": batch["vcpu"],
                                "reason": name.take(batch["rid"]),
                                "reason_flags": flags.take(batch["rid"]),
                                "info1": batch["info1"],
                                "mask": pa.array(info1, pa.uint64(), mask=~row_has),
                                "td": pa.array(row_td),
                                "kind": kind,
                                "verdict": verdict,
                                "missing": missing,
                            }
                        ).cast(schema)
                    )
        finally:
            out.close()
            self.discard()


def _classes(reasons: list, td: np.ndarray, rid: np.ndarray, mask: np.ndarray, tree: str) -> tuple[pa.Array, ...]:
    """The kind, verdict and missing columns of a batch, on the KVM tree ``tree``."""
    classes, of_row = classify_rows(reasons, td, rid, mask, tree)
    index = pa.array(of_row)
    return tuple(
        pc.take(pa.array([getattr(c, f) for c in classes], pa.string()), index) for f in ("kind", "verdict", "missing")
    )


__all__ = ["PARQUET_COLUMNS", "TREE_METADATA_KEY", "ParquetSink", "parquet_schema"]
