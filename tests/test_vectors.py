"""Conformance vectors: export then verify round-trips, exports are deterministic, every file
matches the schema, a hand-edited vector is reported at the right field, a malformed corpus is
exit status 2; vector contents checked against docs/abi.md by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
from typer.testing import CliRunner

from tdvmcall.cli import app
from tdvmcall.sweep import vectors as V

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus") / "c"
    V.export(d)
    return d


def _index(d: Path) -> dict:
    return json.loads((d / V.INDEX).read_text())


def _small(src: Path, dst: Path, ids: list[str]) -> Path:
    """A corpus holding only the vectors ``ids`` of ``src`` (a quick one to edit)."""
    index = _index(src)
    index["files"] = [e for e in index["files"] if e["id"] in ids]
    index["count"] = len(index["files"])
    (dst / V.VECTOR_DIR).mkdir(parents=True)
    for e in index["files"]:
        shutil.copy(src / e["file"], dst / e["file"])
    shutil.copy(src / V.SCHEMA_FILE, dst / V.SCHEMA_FILE)
    (dst / V.INDEX).write_text(json.dumps(index))
    return dst


def _vector(d: Path, vid: str) -> dict:
    return json.loads((d / V.VECTOR_DIR / f"{vid}.json").read_text())


IO_IN = "instruction-io.in.{label}.{policy}.m1.5-no-rbp-mod"


# --- round trip, determinism, schema --------------------------------------------------------------
def test_export_then_verify_round_trips(corpus):
    report = V.verify(corpus)
    assert report["ok"] and report["differences"] == []
    index = _index(corpus)
    files = sorted(p.name for p in (corpus / V.VECTOR_DIR).iterdir())
    assert report["vectors"] == index["count"] == len(index["files"]) == len(files)
    res = runner.invoke(app, ["vectors", "verify", str(corpus)])
    assert res.exit_code == 0, res.output


def test_export_is_deterministic(corpus, tmp_path):
    again = tmp_path / "again"
    V.export(again)
    for e in _index(corpus)["files"] + [{"file": V.INDEX}, {"file": V.SCHEMA_FILE}]:
        assert (again / e["file"]).read_bytes() == (corpus / e["file"]).read_bytes(), e["file"]


def test_every_file_matches_the_schema(corpus):
    schema = json.loads((corpus / V.SCHEMA_FILE).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)  # the schema as shipped, no inlining
    for e in _index(corpus)["files"]:
        validator.validate(json.loads((corpus / e["file"]).read_text()))
    index_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/index"}
    jsonschema.Draft202012Validator(index_schema).validate(_index(corpus))


def test_corpus_is_modest_and_covers_every_call(corpus):
    index = _index(corpus)
    size = sum((corpus / e["file"]).stat().st_size for e in index["files"])
    assert size < 3_000_000
    calls = {e["call"] for e in index["files"]}
    assert calls == {leaf.name for leaf in V.L.LEAVES + (V.L.UNKNOWN_HYPERCALL,)}
    assert {e["policy"] for e in index["files"]} == {"legacy", "hardened"}
    assert {(e["td"]["module"], e["td"]["no_rbp_mod"]) for e in index["files"]} == {
        ("1.5", True),
        ("1.5", False),
        ("1.0", True),
    }


# --- contents, derived by hand from docs/abi.md ----------------------------------------------------------
def test_io_in_vectors(corpus):
    # docs/abi.md §4 Instruction.IO IN: R10 R11 selectors, R12 size, R13 direction, R14 port; writes R11
    # (data) or R10 (error): minimal 0x7C00.  Port 0x3FD goes to userspace (KVM_EXIT_IO).
    exact = _vector(corpus, IO_IN.format(label="exact", policy="hardened"))
    assert exact["mask"] == "0x0000000000007c00" and exact["verdict"] == "userspace"
    assert exact["expected"]["kvm"]["userspace_exit"]["reason"] == "KVM_EXIT_IO"
    # the guest's unexposed registers come back unchanged (docs/abi.md §3), e.g. R15 keeps its value
    assert exact["expected"]["guest"]["r15"] == exact["scenario"]["guest"]["r15"] != "0x0000000000000000"
    # and the VMM saw 0 for it
    assert exact["expected"]["vmm"]["r15"] == "0x0000000000000000"
    # one register short (R12, the size): hardened refuses with R10 = INVALID_OPERAND (0x8000...0000)
    short = _vector(corpus, IO_IN.format(label="short-r12", policy="hardened"))
    assert short["verdict"] == "refused"
    assert short["expected"]["guest"]["r10"] == "0x8000000000000000"
    # legacy reads the unexposed size as 0, which is not 1, 2 or 4: INVALID_OPERAND, silently wrong
    legacy = _vector(corpus, IO_IN.format(label="short-r12", policy="legacy"))
    assert legacy["expected"]["kvm"]["zero_reads"] == ["r12"]
    assert legacy["expected"]["kvm"]["status"] == "0x8000000000000000"


def test_invalid_bit_vectors(corpus):
    # docs/abi.md §3: RSP in gpr_select or a reserved bit: TDX_OPERAND_INVALID + operand RCX
    # (0xC000010000000001) in RAX, KVM never sees the call
    for label in ("rsp", "reserved"):
        v = _vector(corpus, IO_IN.format(label=label, policy="hardened"))
        assert v["verdict"] == "module-refused" and v["expected"]["kvm"] is None
        assert v["expected"]["guest"]["rax"] == "0xc000010000000001"
    # RBP: refused by 1.5 with NO_RBP_MOD; let through without it and by 1.0, which never checks it
    assert _vector(corpus, "instruction-io.in.rbp.hardened.m1.5-no-rbp-mod")["verdict"] == "module-refused"
    assert _vector(corpus, "instruction-io.in.rbp.hardened.m1.5-rbp-mod")["verdict"] == "userspace"
    assert _vector(corpus, "instruction-io.in.rbp.legacy.m1.0-no-rbp-mod")["verdict"] == "userspace"


def test_linux_mask_vector(corpus):
    # Linux's 0xFFCC exposes everything the module allows: both policies complete CPUID leaf 1
    for policy in ("legacy", "hardened"):
        v = _vector(corpus, f"instruction-cpuid.leaf1.linux-0xffcc.{policy}.m1.5-no-rbp-mod")
        assert v["mask"] == "0x000000000000ffcc" and v["verdict"] == "completed"


# --- differences and malformed corpora --------------------------------------------------------------
def test_hand_edited_vector_is_reported_at_the_field(corpus, tmp_path):
    vid = IO_IN.format(label="exact", policy="hardened")
    d = _small(corpus, tmp_path / "c", [vid, IO_IN.format(label="exact", policy="legacy")])
    path = d / V.VECTOR_DIR / f"{vid}.json"
    v = json.loads(path.read_text())
    v["expected"]["guest"]["r11"] = "0x0000000000000061"  # the model says 0x60 (the UART LSR answer)
    path.write_text(json.dumps(v))
    report = V.verify(d)
    assert not report["ok"] and report["failing"] == 1
    by_path = {x["path"]: x for x in report["differences"]}
    assert by_path["expected.guest.r11"]["expected"] == "0x0000000000000061"
    assert by_path["expected.guest.r11"]["got"] == "0x0000000000000060"
    assert "sha256" in by_path  # the file no longer matches its index entry
    res = runner.invoke(app, ["vectors", "verify", str(d)])
    assert res.exit_code == 1 and "expected.guest.r11" in res.output


def test_edited_verdict_and_removed_key(corpus, tmp_path):
    vid = IO_IN.format(label="short-r12", policy="hardened")
    d = _small(corpus, tmp_path / "c", [vid])
    path = d / V.VECTOR_DIR / f"{vid}.json"
    v = json.loads(path.read_text())
    v["expected"]["kvm"]["verdict"] = "completed"
    del v["expected"]["kvm"]["wrote"]["r10"]  # a key the schema does not require
    path.write_text(json.dumps(v))
    paths = {x["path"]: x for x in V.verify(d)["differences"]}
    assert paths["expected.kvm.verdict"]["got"] == "refused"
    assert paths["expected.kvm.wrote.r10"] == {
        "file": f"vectors/{vid}.json",
        "path": "expected.kvm.wrote.r10",
        "expected": V.ABSENT,
        "got": "0x8000000000000000",
    }
    # a key the schema requires, removed: a malformed vector, not a difference
    del v["expected"]["kvm"]["warnings"]
    path.write_text(json.dumps(v))
    with pytest.raises(V.CorpusError, match="warnings"):
        V.verify(d)


def test_a_vector_the_index_does_not_list_is_a_difference(corpus, tmp_path):
    # a file added to vectors/ without its index entry would otherwise never be replayed
    vid = IO_IN.format(label="short-r12", policy="hardened")
    d = _small(corpus, tmp_path / "c", [vid])
    assert V.verify(d)["ok"]
    shutil.copy(d / V.VECTOR_DIR / f"{vid}.json", d / V.VECTOR_DIR / "extra.json")
    report = V.verify(d)
    # two vector files seen: one listed, one not (it was "1 of 1" before the unlisted one was counted)
    assert (report["ok"], report["failing"], report["vectors"], report["listed"], report["unlisted"]) == (
        False,
        1,
        2,
        1,
        1,
    )
    assert report["differences"] == [
        {"file": "vectors/extra.json", "path": "index.json", "expected": "listed", "got": "not listed"}
    ]


@pytest.mark.parametrize("damage", ["no-index", "bad-json", "schema", "bad-scenario", "missing-file"])
def test_malformed_corpus_is_exit_2(corpus, tmp_path, damage):
    vid = IO_IN.format(label="exact", policy="legacy")
    d = _small(corpus, tmp_path / "c", [vid])
    path = d / V.VECTOR_DIR / f"{vid}.json"
    v = json.loads(path.read_text())
    if damage == "no-index":
        (d / V.INDEX).unlink()
    elif damage == "bad-json":
        path.write_text("{not json")
    elif damage == "schema":
        del v["expected"]
        path.write_text(json.dumps(v))
    elif damage == "bad-scenario":
        v["scenario"]["platform"] = {"bogus": 1}  # the schema leaves platform to the model
        path.write_text(json.dumps(v))
    else:
        path.unlink()
    with pytest.raises(V.CorpusError):
        V.verify(d)
    res = runner.invoke(app, ["vectors", "verify", str(d)])
    assert res.exit_code == 2
    assert "tdvmcall: error:" in res.output


def test_export_refuses_a_non_empty_directory(corpus, tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    assert runner.invoke(app, ["vectors", "export", str(tmp_path)]).exit_code == 2
    assert (tmp_path / "x.txt").read_text() == "mine"
    # an existing corpus is replaced only with --force
    d = _small(corpus, tmp_path / "c", [IO_IN.format(label="exact", policy="legacy")])
    assert runner.invoke(app, ["vectors", "export", str(d)]).exit_code == 2


def test_an_empty_corpus_is_malformed_not_a_match(corpus, tmp_path):
    # "all 0 vectors match" with exit 0 would let a CI job pass on a corpus that checks nothing
    d = _small(corpus, tmp_path / "c", [])
    with pytest.raises(V.CorpusError, match="lists no vectors"):
        V.verify(d)


def test_an_index_listing_fewer_files_counts_every_file(corpus, tmp_path):
    # the index lists 1 of 3 vector files: 3 files seen, the 2 unlisted ones differ ("2 of 1" before)
    ids = [IO_IN.format(label=label, policy="hardened") for label in ("exact", "short-r12", "linux-0xffcc")]
    d = _small(corpus, tmp_path / "c", ids)
    index = json.loads((d / V.INDEX).read_text())
    index["files"], index["count"] = index["files"][:1], 1
    (d / V.INDEX).write_text(json.dumps(index))
    report = V.verify(d)
    assert (report["vectors"], report["listed"], report["unlisted"], report["failing"]) == (3, 1, 2, 2)
    assert report["failing"] <= report["vectors"]
