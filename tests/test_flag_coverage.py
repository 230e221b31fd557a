"""Every command-line flag of the two CLIs is exercised by a test that fails if it is ignored.

A test declares the flags it shows to be wired with a marker,
`@pytest.mark.wires("mgll-train fit", "--soft-target", ...)` (first argument: the command, then
its flags), or `pytest.param(..., marks=pytest.mark.wires(...))` for table-driven cases. This
file enumerates the parsers, so a new flag without such a test makes the suite fail.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from mgll_data.cli import _parser as build_dataset_parser
from mgll_train.cli import _parser as train_parser

TESTS = Path(__file__).resolve().parent


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parser_flags() -> dict[str, set[str]]:
    """{"mgll-train fit": {"--lr", ...}, ...}: each command's long option names (no --help)."""
    flags: dict[str, set[str]] = {}
    for program, parser in (
        ("mgll-build-dataset", build_dataset_parser()),
        ("mgll-train", train_parser()),
    ):
        for name, sub in _subcommands(parser).items():
            names = set()
            for action in sub._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                longs = [s for s in action.option_strings if s.startswith("--")]
                names.update(longs[:1] or action.option_strings[:1])
            if names:
                flags[f"{program} {name}"] = names
    return flags


def declared_wirings() -> dict[str, set[str]]:
    """The flags named by `pytest.mark.wires(...)` markers anywhere in tests/test_*.py."""
    declared: dict[str, set[str]] = {}
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr != "wires" or not node.args:
                continue
            values = [a.value for a in node.args if isinstance(a, ast.Constant)]
            assert len(values) == len(node.args), f"{path.name}: wires() takes string literals"
            declared.setdefault(values[0], set()).update(values[1:])
    return declared


def test_parser_enumeration_sees_every_command():
    flags = parser_flags()
    assert {"mgll-train fit", "mgll-train eval", "mgll-train export"} <= set(flags)
    assert {"mgll-build-dataset build", "mgll-build-dataset push"} <= set(flags)
    assert {"--soft-target", "--loss-weights", "--precision"} <= flags["mgll-train fit"]


def test_every_flag_has_a_wiring_test():
    flags, declared = parser_flags(), declared_wirings()
    missing = {
        command: sorted(names - declared.get(command, set()))
        for command, names in flags.items()
        if names - declared.get(command, set())
    }
    assert not missing, f"flags with no test marked @pytest.mark.wires(...): {missing}"


def test_markers_name_real_flags():
    flags, declared = parser_flags(), declared_wirings()
    unknown = {
        c: sorted(n - flags.get(c, set())) for c, n in declared.items() if n - flags.get(c, set())
    }
    assert not unknown, f"wires() markers naming no such command or flag: {unknown}"
