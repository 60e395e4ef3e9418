"""Conformance vectors: a deterministic corpus of round trips, and a replayer that checks one.

A vector is one TDVMCALL: the input scenario (the ``tdvmcall run`` input contract,
docs/scenario.md) and the result the model expects (``scenario.run_json``: module, VMM, KVM and
guest).  ``export`` writes, for every call of the leaf table under each of its cases, the boundary
masks: the exact minimal mask (``leaves.minimal_mask``), each mask one register short of it, Linux's
over-exposed 0xFFCC (docs/abi.md §6), and masks with invalid bits (RBP, RSP, a reserved bit; docs/abi.md §3),
under both KVM policies, with the module version and NO_RBP_MOD varied where they matter (the RBP
bit).  ``verify`` replays a corpus, from this model or from another implementation writing the same
format, and reports every difference field by field.  Layout of a corpus::

    DIR/index.json            one entry per vector: file, call, case, label, mask, policy, td,
                              verdict, sha256 of the file
    DIR/vector.schema.json    the JSON Schema (draft 2020-12) of a vector file (``$defs/index``: the index)
    DIR/vectors/<id>.json     one vector
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from .. import __version__ as VERSION
from .. import data_file, scenario
from ..abi.regs import GPR_NAMES, hex64, mask_of, names_in
from ..console import output_dir
from ..kvm import leaves as L
from ..kvm.tdx import POLICIES
from ..kvm.trees import DEFAULT_TREE
from ..module import TdConfig
from .sweep import Target, targets

FORMAT = "tdvmcall-vectors"
VECTOR_FORMAT = "tdvmcall-vector"
VERSION_1 = 1
INDEX = "index.json"
SCHEMA_FILE = "vector.schema.json"
VECTOR_DIR = "vectors"
TREE = DEFAULT_TREE  # the default corpus's kernel tree (export --tree picks another: kvm/trees.py)

#: Linux's mask for every TDVMCALL since v6.3 (docs/abi.md §6): every GPR the module allows under NO_RBP_MOD
LINUX_MASK = 0xFFCC
RBP_BIT = mask_of(("rbp",))
RSP_BIT = mask_of(("rsp",))
RESERVED_BIT = 1 << 32  # RCX bits 63:32 are reserved (docs/abi.md §3)

#: The Linux TD (module 1.5, NO_RBP_MOD), used for every mask but the RBP one
LINUX_TD = TdConfig("1.5", True)


class CorpusError(ValueError):
    """A malformed corpus (missing index, bad JSON, a file that fails the schema): one line."""


# --- what is exported ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One vector to write."""

    target: Target
    label: str
    mask: int  # the guest's whole RCX
    policy: str
    td: TdConfig
    tree: str = TREE

    @property
    def id(self) -> str:
        rbp = "no-rbp-mod" if self.td.no_rbp_mod else "rbp-mod"
        return ".".join(
            (_slug(self.target.call), _slug(self.target.case.name), self.label, self.policy, f"m{self.td.module}-{rbp}")
        )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def boundary_masks(t: Target) -> list[tuple[str, int]]:
    """The valid boundary masks of a call under a case: exact minimal (from the leaf table), each
    one register short of it, and Linux's over-exposed 0xFFCC."""
    minimal = L.minimal_mask(t.leaf, t.regs())
    out = [("exact", minimal)]
    out += [(f"short-{name}", minimal & ~mask_of((name,))) for name in names_in(minimal, 16)]
    out.append((f"linux-{LINUX_MASK:#06x}", minimal | LINUX_MASK))
    return out


def invalid_masks(t: Target) -> list[tuple[str, int, TdConfig, tuple[str, ...]]]:
    """The exact minimal mask plus one invalid bit, with the TDs and policies that show it.  RBP:
    refused only by a 1.5 module for a NO_RBP_MOD TD, let through to KVM by 1.5 without NO_RBP_MOD
    and by 1.0 (which never checks it).  RSP and a reserved bit: refused by every module.  Where the
    module refuses, KVM never sees the call, so the policy cannot matter: one vector (hardened)."""
    minimal = L.minimal_mask(t.leaf, t.regs())
    refused = ("hardened",)
    return [
        ("rbp", minimal | RBP_BIT, LINUX_TD, refused),
        ("rbp", minimal | RBP_BIT, TdConfig("1.5", False), POLICIES),
        ("rbp", minimal | RBP_BIT, TdConfig("1.0", True), POLICIES),
        ("rsp", minimal | RSP_BIT, LINUX_TD, refused),
        ("reserved", minimal | RESERVED_BIT, LINUX_TD, refused),
    ]


def specs(tree: str = TREE) -> list[Spec]:
    """The corpus, in a fixed order: every call and case with its boundary masks under the Linux TD
    and both policies; then, for the first case of every call, its invalid-bit masks."""
    out: list[Spec] = []
    first_case: set[str] = set()
    for t in targets():
        rows = [(label, mask, LINUX_TD, POLICIES) for label, mask in boundary_masks(t)]
        if t.call not in first_case:
            first_case.add(t.call)
            rows += invalid_masks(t)
        for label, mask, td, policies in rows:
            out += [Spec(t, label, mask, policy, td, tree) for policy in policies]
    return out


def scenario_of(s: Spec) -> dict:
    """The vector's input, in the ``tdvmcall run`` contract: every GPR explicit."""
    regs = s.target.regs() | {"rax": 0, "rcx": s.mask}
    return {
        "name": s.id,
        "td": {"module": s.td.module, "no_rbp_mod": s.td.no_rbp_mod},
        "kvm": {"policy": s.policy, "tree": s.tree},
        "guest": {name: hex64(regs[name]) for name in GPR_NAMES},
        "platform": dict(s.target.case.platform),
    }


def verdict_of(result: dict) -> str:
    """One word for a ``run --json`` result: the module's refusal or fault, else KVM's verdict."""
    module = result["module"]
    if module["fault"]:
        return "fault"
    if module.get("not_modelled"):
        return "not-modelled"
    if not module["exited"]:
        return "module-refused"
    return result["kvm"]["verdict"]


def vector_of(s: Spec) -> dict:
    sc = scenario_of(s)
    expected = scenario.run_json(sc)
    return {
        "format": VECTOR_FORMAT,
        "version": VERSION_1,
        "id": s.id,
        "call": s.target.call,
        "case": s.target.case.name,
        "label": s.label,
        "mask": hex64(s.mask),
        "policy": s.policy,
        "td": {"module": s.td.module, "no_rbp_mod": s.td.no_rbp_mod},
        "verdict": verdict_of(expected),
        "scenario": sc,
        "expected": expected,
    }


def dumps(obj: Any) -> bytes:
    """The one serialisation of a corpus file: compact, key order kept, a final newline (so the
    bytes, and their sha256, are deterministic)."""
    return (json.dumps(obj, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


HEADER = ("id", "call", "case", "label", "mask", "policy", "td", "verdict")


def export(directory: Path, force: bool = False, tree: str = TREE) -> dict:
    """Write the corpus into ``directory`` (created; if it holds anything, it must be a corpus, or
    what an interrupted export left, and ``force`` given; a file that is not the corpus's is never
    deleted: the export is refused, naming it), every scenario on the kernel tree ``tree``.  The
    corpus is written into a temporary directory beside ``directory`` and takes its name when
    complete (``console.output_dir``): an interrupt leaves the old corpus, or nothing, never part of
    one.  Returns the file count and bytes."""
    chosen = specs(tree)
    _prepare(directory, force, {f"{s.id}.json" for s in chosen})
    with output_dir(directory) as tmp:
        entries, total = _write_vectors(tmp, chosen)
        _, index_bytes, schema_bytes = _write_index(tmp, tree, entries)
    return {
        "directory": str(directory),
        "vectors": len(entries),
        "vector_bytes": total,
        "files": len(entries) + 2,
        "bytes": total + len(index_bytes) + len(schema_bytes),
    }


def _write_vectors(directory: Path, chosen: list[Spec]) -> tuple[list[dict], int]:
    (directory / VECTOR_DIR).mkdir()
    entries = []
    total = 0
    for s in chosen:
        vec = vector_of(s)
        data = dumps(vec)
        rel = f"{VECTOR_DIR}/{s.id}.json"
        (directory / rel).write_bytes(data)
        total += len(data)
        entries.append({"file": rel} | {k: vec[k] for k in HEADER} | {"sha256": hashlib.sha256(data).hexdigest()})
    return entries, total


def _write_index(directory: Path, tree: str, entries: list[dict]) -> tuple[dict, bytes, bytes]:
    index = {
        "format": FORMAT,
        "version": VERSION_1,
        "generator": f"tdvmcall {VERSION} (the model)",
        "schema": SCHEMA_FILE,
        "tree": tree,
        "count": len(entries),
        "files": entries,
    }
    index_bytes = dumps(index)
    schema_bytes = _schema_bytes()
    (directory / INDEX).write_bytes(index_bytes)
    (directory / SCHEMA_FILE).write_bytes(schema_bytes)
    return index, index_bytes, schema_bytes


def _listed(directory: Path) -> set[str]:
    """The vector files an existing index lists (none when it is missing or unreadable)."""
    try:
        index = json.loads((directory / INDEX).read_bytes())
        return {Path(e["file"]).name for e in index["files"] if isinstance(e, dict) and "file" in e}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def _prepare(directory: Path, force: bool, names: set[str]) -> None:
    """Whether ``directory`` may receive the corpus: absent or empty; or, with ``force``, a corpus
    (or what an interrupted export left: vectors without an index) and nothing else.  A file that
    is none of the corpus's (not ``index.json``, the schema, or a vector file the old index lists
    or this export writes) is never deleted: the export is refused, naming it."""
    if directory.exists() and not directory.is_dir():
        raise CorpusError(f"{directory}: exists and is not a directory")
    if not directory.exists() or not any(directory.iterdir()):
        return
    if not {INDEX, VECTOR_DIR} & {p.name for p in directory.iterdir()}:
        raise CorpusError(f"{directory}: not empty and not a corpus (no {INDEX}); choose an empty directory")
    ours = names | _listed(directory)
    foreign = sorted(
        str(p)
        for p in directory.iterdir()
        if p.name not in (INDEX, SCHEMA_FILE, VECTOR_DIR) or (p.name == VECTOR_DIR and not p.is_dir())
    )
    if (directory / VECTOR_DIR).is_dir():
        foreign += sorted(str(p) for p in (directory / VECTOR_DIR).iterdir() if p.name not in ours or not p.is_file())
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise CorpusError(
            f"{directory}: holds {foreign[0]}{more}, which is not part of the corpus; replacing the corpus "
            "would delete it: move it away, or choose another directory"
        )
    if not force:
        complete = (directory / INDEX).is_file()
        what = "a corpus" if complete else f"an incomplete corpus (no {INDEX}: an interrupted export)"
        raise CorpusError(f"{directory}: already holds {what}; pass --force to replace it")


# --- the schema -----------------------------------------------------------------------------------
def _schema_bytes() -> bytes:
    return data_file(SCHEMA_FILE).read_bytes()


@cache
def schema() -> dict:
    """The JSON Schema (draft 2020-12) of a vector file."""
    return json.loads(_schema_bytes())


@cache
def _validator(part: str | None) -> jsonschema.Draft202012Validator:
    """A validator for the schema or one of its ``$defs``, with the local ``$ref``s inlined (the
    schema has no recursive reference): the same constraints, checked several times faster."""
    full = schema()
    defs = full["$defs"]

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: inline(v) for k, v in node.items() if k not in ("$defs", "$ref")}
            if "$ref" not in node:
                return out
            target = inline(defs[node["$ref"].removeprefix("#/$defs/")])
            return {"allOf": [target, out]} if out else target
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    root = full if part is None else defs[part]
    return jsonschema.Draft202012Validator({"$schema": full["$schema"]} | inline(root))


def schema_errors(obj: Any, part: str | None = None) -> list[str]:
    """Every way ``obj`` fails the vector schema (or one of its ``$defs``, e.g. ``index``),
    as ``path: message`` lines."""
    errors = sorted(_validator(part).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path) or '(top)'}: {e.message}" for e in errors]


def _path(parts: Any) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# --- verify ---------------------------------------------------------------------------------------
ABSENT = "<absent>"


@dataclass(frozen=True)
class Difference:
    file: str
    path: str
    expected: Any
    got: Any

    def as_dict(self) -> dict:
        return {"file": self.file, "path": self.path, "expected": self.expected, "got": self.got}


def diff(expected: Any, got: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every leaf where two JSON values differ, as (path, expected, got); a key on one side only
    is reported with ``<absent>`` on the other."""
    if isinstance(expected, dict) and isinstance(got, dict):
        for key in list(expected) + [k for k in got if k not in expected]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in got:
                yield sub, expected[key], ABSENT
            elif key not in expected:
                yield sub, ABSENT, got[key]
            else:
                yield from diff(expected[key], got[key], sub)
    elif isinstance(expected, list) and isinstance(got, list):
        for i in range(max(len(expected), len(got))):
            yield from diff(
                expected[i] if i < len(expected) else ABSENT, got[i] if i < len(got) else ABSENT, f"{path}[{i}]"
            )
    elif expected != got or type(expected) is not type(got):
        yield path, expected, got


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as e:
        raise CorpusError(f"{what}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise CorpusError(f"{what}: JSON nested too deeply") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise CorpusError(f"{what}: not valid JSON ({e})") from None


def load_index(directory: Path) -> dict:
    if not directory.is_dir():
        raise CorpusError(f"{directory}: not a directory; give the corpus's directory")
    if not (directory / INDEX).is_file():
        raise CorpusError(f"{directory}: no {INDEX}; not a corpus")
    index = _load_json(directory / INDEX, INDEX)
    if errors := schema_errors(index, "index"):
        raise CorpusError(f"{INDEX}: does not match the index schema: {errors[0]}")
    if index["count"] != len(index["files"]):
        raise CorpusError(f"{INDEX}: count is {index['count']} but {len(index['files'])} files are listed")
    return index


def replay(vector: dict) -> dict:
    """Run a vector's scenario through the model: the result it should have recorded."""
    try:
        return scenario.run_json(vector["scenario"])
    except scenario.ScenarioError as e:
        raise CorpusError(f"scenario: {e}") from None


def verify_vector(rel: str, data: bytes, entry: dict) -> list[Difference]:
    """Every difference between one vector file (and its index entry) and the model's replay."""
    try:
        vector = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorpusError(f"{rel}: not valid JSON ({e})") from None
    except RecursionError:
        raise CorpusError(f"{rel}: JSON nested too deeply") from None
    except ValueError as e:
        raise CorpusError(f"{rel}: not valid JSON ({e})") from None
    if errors := schema_errors(vector):
        raise CorpusError(f"{rel}: does not match the vector schema: {errors[0]}")
    found: list[Difference] = []
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        found.append(Difference(rel, "sha256", entry["sha256"], digest))
    for key in HEADER:
        if entry[key] != vector[key]:
            found.append(Difference(rel, f"index.{key}", entry[key], vector[key]))
    try:
        got = replay(vector)
    except CorpusError as e:
        raise CorpusError(f"{rel}: {e}") from None
    found += [Difference(rel, f"expected.{p}", e, g) for p, e, g in diff(vector["expected"], got)]
    if vector["verdict"] != verdict_of(got):
        found.append(Difference(rel, "verdict", vector["verdict"], verdict_of(got)))
    return found


def verify(directory: Path) -> dict:
    """Replay every vector of a corpus; raises :class:`CorpusError` for a malformed corpus (and the
    model's ``ModelBug`` if it breaks an invariant while replaying: a bug, never input)."""
    index = load_index(directory)
    if not index["files"]:
        raise CorpusError(f"{INDEX}: lists no vectors; an empty corpus verifies nothing")
    root = directory.resolve()
    differences: list[Difference] = []
    for entry in index["files"]:
        rel = entry["file"]
        path = (directory / rel).resolve()
        if root not in path.parents:
            raise CorpusError(f"{INDEX}: {rel} is outside the corpus")
        if not path.is_file():
            raise CorpusError(f"{rel}: listed in {INDEX} but missing")
        differences += verify_vector(rel, path.read_bytes(), entry)
    listed = {(directory / e["file"]).resolve() for e in index["files"]}
    unlisted = 0
    for path in sorted((directory / VECTOR_DIR).glob("*.json")):  # a vector the index forgot is not checked
        if path.resolve() not in listed:
            unlisted += 1
            differences.append(Difference(f"{VECTOR_DIR}/{path.name}", INDEX, "listed", "not listed"))
    failing = sorted({d.file for d in differences})
    return {
        "directory": str(directory),
        "vectors": len(index["files"]) + unlisted,  # every vector file seen: listed, or found unlisted
        "listed": len(index["files"]),
        "unlisted": unlisted,
        "failing": len(failing),
        "differences": [d.as_dict() for d in differences],
        "ok": not differences,
    }


__all__ = [
    "CorpusError",
    "Difference",
    "Spec",
    "diff",
    "export",
    "schema",
    "schema_errors",
    "specs",
    "vector_of",
    "verify",
]
