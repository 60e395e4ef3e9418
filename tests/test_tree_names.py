"""The model's tree names (kvm/trees.py) are the one place every tool reads them from: each ``--tree``
help lists them, and every check of a tree name (the scenario parser, check and scan's host, the C
generator, the kernel series) gives the one message of ``kvm.trees.check_tree``."""

from __future__ import annotations

import pytest
import typer.main

from tdvmcall import scenario
from tdvmcall.cli import app
from tdvmcall.export_c import generate as G
from tdvmcall.export_c import series as S
from tdvmcall.judge import HostError, host_for
from tdvmcall.kvm.trees import DEFAULT_TREE, TREE_NAMES, TREES, UnknownTreeError, check_tree, tree_help, tree_rule

# the names and the order kvm/trees.py documents in its docstring (kvm-x86 first, the default)
ACCEPTED = "accepted: kvm-x86, v6.16, v7.3"


def _tree_helps() -> dict[str, str]:
    helps: dict[str, str] = {}

    def walk(cmd: object, path: str) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())
        for p in getattr(cmd, "params", []):
            if "--tree" in getattr(p, "opts", []):
                helps[path] = p.help

    walk(typer.main.get_command(app), "")
    return helps


def test_the_names_are_the_rules_and_the_default_comes_first():
    assert TREE_NAMES == tuple(TREES) == ("kvm-x86", "v6.16", "v7.3")
    assert TREE_NAMES[0] == DEFAULT_TREE
    assert tree_help() == "KVM tree: kvm-x86 (the default), v6.16 or v7.3"


def test_every_tree_option_lists_every_tree_from_the_model():
    helps = _tree_helps()
    assert sorted(helps) == ["check", "export-c", "run", "scan", "sweep", "trace", "vectors export"]
    for command, text in helps.items():
        if command == "export-c":  # lists them its own way: "kvm-x86, v6.16, v7.3; default kvm-x86"
            assert f"{', '.join(TREE_NAMES)}; default {DEFAULT_TREE}." in text
        else:
            assert "kvm-x86 (the default), v6.16 or v7.3" in text, command


def test_one_check_one_message():
    assert check_tree("v7.3") == "v7.3"
    for bad in ("v9", "KVM-X86", "", 7, None):
        with pytest.raises(UnknownTreeError) as e:
            check_tree(bad)
        assert str(e.value) == f"{bad!r} is not a KVM tree; {ACCEPTED}"
        assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    with pytest.raises(KeyError) as k:
        tree_rule("v6.1")
    assert str(k.value) == f"'v6.1' is not a KVM tree; {ACCEPTED}"


def test_the_scenario_parser_names_its_field_and_the_one_message():
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.parse({"kvm": {"tree": "v6.1"}, "guest": {}})
    assert str(e.value) == f"kvm.tree: 'v6.1' is not a KVM tree; {ACCEPTED}"


def test_the_host_names_its_option_and_the_one_message():
    with pytest.raises(HostError) as e:
        host_for("1.5", True, "v6.1", "hardened")
    assert e.value.option == "tree" and str(e.value) == f"'v6.1' is not a KVM tree; {ACCEPTED}"


def test_the_generator_and_the_series_give_the_one_message():
    with pytest.raises(G.GeneratorError) as g:
        G.check_tree("v6.1")
    assert str(g.value) == f"tree: 'v6.1' is not a KVM tree; {ACCEPTED}"
    assert G.check_tree("v6.16") == "v6.16"
    with pytest.raises(S.SeriesError) as s:
        S.check_tree("v6.1", None)  # type: ignore[arg-type]  # the name is judged before the kernel
    assert str(s.value) == f"--tree: 'v6.1' is not a KVM tree; {ACCEPTED}"
