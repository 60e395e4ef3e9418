"""The reference parser of ``tdvmcall trace``, in polars: any line, every quirk (ABI.md §7).

``trace.parse_chunk`` (the compiled fast path) hands it the lines it is not sure about, and the
tests check that the two agree on every line both can read.  Same contract as ``parse_chunk``: it
returns a :class:`~tdvmcall.trace.ChunkResult` of numpy columns keyed by task and reason ids.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from .io import Chunk
from .rows import (
    LOOKS_LIKE_EXIT,
    MARKER,
    PAYLOAD_RX,
    ChunkResult,
    Columns,
    Counts,
    ReasonTable,
    TaskTable,
    bucket_width,
    span_shift,
    union_span,
)


def _lines(data: bytes) -> pl.DataFrame:
    """The lines of a chunk as column ``l`` (blank lines are null; a trailing CR is dropped,
    invalid UTF-8 replaced).  Polars' CSV reader with a separator that text lines do not contain
    (NUL) is the fastest line splitter measured; a NUL byte past the binary probe is read as
    U+FFFD, as invalid UTF-8 is."""
    if b"\x00" in data:
        data = data.replace(b"\x00", "\ufffd".encode())
    return pl.read_csv(
        data,
        has_header=False,
        separator="\x00",
        quote_char=None,
        new_columns=["l"],
        truncate_ragged_lines=True,
        infer_schema=False,
        encoding="utf8-lossy",
    )


def _columns(frame: pl.DataFrame, types: dict[str, type]) -> Columns:
    return {c: frame[c].to_numpy().astype(t) for c, t in types.items()}


def parse_chunk_polars(
    chunk: Chunk,
    fmt: str,
    source: str,
    tasks: TaskTable,
    reasons: ReasonTable,
    shift: int = 0,
    span: tuple[float, float] | None = None,
    keep_bad: int = 5,
    rows: bool = False,
) -> ChunkResult:
    """The reference parser: same contract as ``trace.parse_chunk``, on any line.

    Few, large polars queries (each polars call costs about a millisecond whatever its size; they
    run without the GIL):
    1. split each kvm_exit line at the format's marker, validate the payload with
       :data:`~tdvmcall.trace.PAYLOAD_RX` and cut the timestamp off the line prefix;
    2. the distinct line prefixes and reason texts (few) and the time range;
    3. in Python: prefix -> (task, cpu), reason -> id and whether it is a TDVMCALL reason;
    4. fields by position, mask = info1 for TDVMCALL reasons (else 0), and the two aggregates."""
    # 1. lines: kvm_exit-looking, header/blank, other; the kvm_exit lines split and validated
    lines = (
        _lines(chunk.data)
        .lazy()
        .with_row_index("line", offset=1)
        .with_columns(is_exit=pl.col("l").str.contains(LOOKS_LIKE_EXIT, literal=True).fill_null(False))
    )
    header = (
        pl.col("l").is_null()
        | pl.col("l").str.starts_with("#")
        | pl.col("l").str.starts_with("cpus=")
        | pl.col("l").str.starts_with("version = ")
    )
    stats_q = lines.select(lines=pl.len(), exits=pl.col("is_exit").sum(), comments=(~pl.col("is_exit") & header).sum())
    parts = pl.col("l").str.splitn(MARKER[fmt], 2)
    head, p = pl.col("head"), pl.col("pay")
    r = p.str.find(" reason ", literal=True)
    rip = p.str.find(" rip 0x", literal=True)
    parsed_q = (
        lines.filter("is_exit")
        .select(
            "line",
            "l",
            head=parts.struct.field("field_0").str.strip_chars_end(" "),
            pay=parts.struct.field("field_1").str.strip_chars_start(" "),
        )
        .with_columns(colon=head.str.ends_with(":"), head=head.str.strip_suffix(":"))
        .with_columns(prefix=head.str.strip_chars_end("0123456789."))
        .with_columns(ts=head.str.slice(pl.col("prefix").str.len_chars()))
        .with_columns(
            ok=(
                p.str.contains(PAYLOAD_RX) & pl.col("colon") & pl.col("ts").str.contains(r"^[0-9]+(?:\.[0-9]+)?$")
            ).fill_null(False)
        )
        .with_columns(ts=pl.col("ts").cast(pl.Float64, strict=False))
        .with_columns(ok=(pl.col("ok") & pl.col("ts").is_finite()).fill_null(False))  # 309+ digits: not a time
        .with_columns(reason=pl.when("ok").then(p.str.slice(r + 8, rip - r - 8)), ts=pl.when("ok").then("ts"))
        .drop("head", "colon")
    )
    stats, parsed = pl.collect_all([stats_q, parsed_q])
    counts = Counts(
        lines=int(stats["lines"][0]),
        kvm_exit_lines=int(stats["exits"][0]),
        comments=int(stats["comments"][0]),
        truncated_last_line=chunk.truncated,
    )
    counts.other_events = counts.lines - counts.kvm_exit_lines - counts.comments
    ok = parsed.lazy().filter("ok")

    # 2. the few distinct prefixes and reasons, the time range, the first unparseable lines
    prefixes, reason_texts, ts_range, bad = pl.collect_all(
        [
            ok.select(pl.col("prefix").unique()),
            ok.select(pl.col("reason").unique()),
            ok.select(lo=pl.col("ts").min(), hi=pl.col("ts").max()),
            parsed.lazy().filter(~pl.col("ok")).select("line", "l").head(keep_bad),
        ]
    )

    # 3. prefix -> (task, cpu) (a prefix of the wrong shape makes its lines unparsed); reason -> id
    uniq = prefixes["prefix"].to_list()
    looked = [tasks.lookup(source, fmt, x) for x in uniq]
    ptab = pl.DataFrame(
        {"prefix": uniq, "task": [t[0] if t else None for t in looked], "cpu": [t[1] if t else None for t in looked]},
        schema={"prefix": pl.String, "task": pl.UInt32, "cpu": pl.UInt32},
    )
    texts = reason_texts["reason"].to_list()
    ids = reasons.ids(texts)
    rtab = pl.DataFrame(
        {"reason": texts, "rid": ids, "tdvmcall_reason": reasons.tdvmcall(ids)},
        schema={"reason": pl.String, "rid": pl.UInt32, "tdvmcall_reason": pl.Boolean},
    )
    if ts_range["lo"][0] is not None:
        shift = span_shift(union_span(span, (ts_range["lo"][0], ts_range["hi"][0])), shift)

    # 4. fields by position (the regex fixed the layout), mask, aggregates
    i1 = p.str.find(" info1 0x", literal=True)
    exits = (
        ok.join(ptab.lazy(), on="prefix", how="left")
        .join(rtab.lazy(), on="reason", how="left")
        .select(
            "line",
            "ts",
            "task",
            "cpu",
            "rid",
            vcpu=p.str.slice(5, r - 5).cast(pl.UInt32),
            info1=p.str.slice(i1 + 9, 16).str.to_integer(base=16, dtype=pl.UInt64),
            tdvmcall_reason="tdvmcall_reason",
        )
        .with_columns(mask=pl.when("tdvmcall_reason").then("info1").otherwise(0))
    )
    good = exits.filter(pl.col("task").is_not_null())
    bucket = (pl.col("ts") / bucket_width(shift)).floor().cast(pl.Int64)  # as trace.bucket_of
    queries = [
        good.group_by("task", "vcpu", "rid", "mask").agg(n=pl.len(), first=pl.col("ts").min(), last=pl.col("ts").max()),
        good.group_by("task", "rid", "mask", bucket=bucket).agg(n=pl.len()),
        exits.filter(pl.col("task").is_null()).select("line").head(keep_bad),
    ] + ([good.sort("line")] if rows else [])
    by_key, by_time, bad_prefix, *row_frames = pl.collect_all(queries)

    counts.parsed = int(by_key["n"].sum())
    bad_lines = [(int(n), t) for n, t in bad.iter_rows()]
    if not bad_prefix.is_empty():
        text = parsed.filter(pl.col("line").is_in(bad_prefix["line"].implode())).select("line", "l")
        bad_lines += [(int(n), t) for n, t in text.iter_rows()]
    counts.bad = sorted(bad_lines)[:keep_bad]
    ids32, u64 = np.uint32, np.uint64
    result = ChunkResult(
        counts,
        _columns(
            by_key,
            {
                "task": ids32,
                "vcpu": ids32,
                "rid": ids32,
                "mask": u64,
                "n": np.int64,
                "first": np.float64,
                "last": np.float64,
            },
        ),
        _columns(by_time, {"task": ids32, "rid": ids32, "mask": u64, "bucket": np.int64, "n": np.int64}),
        shift,
    )
    if rows:
        result.rows = _columns(
            row_frames[0],
            {"line": u64, "ts": np.float64, "task": ids32, "cpu": ids32, "vcpu": ids32, "rid": ids32, "info1": u64},
        )
    return result
