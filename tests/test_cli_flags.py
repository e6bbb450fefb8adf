"""What the command line promises in its own words: every flag an error, hint, log line
or help text names exists; shell completion is on; the README names the global options."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import typer.main

from tagmill.cli import app

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "tagmill"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: calls whose strings a user reads (besides raised errors and hint=/help= texts)
MESSAGE_CALLS = {"log", "print", "warn", "warning", "echo"}


def cli_options() -> dict[str, set[str]]:
    """Every option of every command, as {flag: {commands}} (the group's own under "")."""
    found: dict[str, set[str]] = {}

    def walk(command, path: str) -> None:
        for param in command.params:
            for opt in [*getattr(param, "opts", []), *(getattr(param, "secondary_opts", None) or [])]:
                if opt.startswith("--"):
                    found.setdefault(opt, set()).add(path)
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(typer.main.get_command(app), "")
    return found


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def message_strings(tree: ast.AST) -> list[tuple[int, str]]:
    """Strings of raised errors, error constructors, hint=/help= keywords and log/print calls."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            found += [(node.lineno, s) for s in _strings(node.exc)]
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            if name.endswith(("Error", "Exception")) or name in MESSAGE_CALLS:
                found += [(node.lineno, s) for arg in node.args for s in _strings(arg)]
            for keyword in node.keywords:
                if keyword.arg in ("hint", "help", "message", "reason"):
                    found += [(node.lineno, s) for s in _strings(keyword.value)]
    return found


def test_every_flag_named_in_a_message_exists():
    options = cli_options()
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        for line, text in message_strings(ast.parse(path.read_text())):
            for flag in FLAG.findall(text):
                if flag.split("=")[0] not in options:
                    wrong.append(f"{path.relative_to(ROOT)}:{line}: {flag} in {text!r}")
    assert not wrong, "messages name flags that do not exist:\n" + "\n".join(wrong)


def test_the_scan_sees_messages():
    """The scan above must find the flags real messages name, or it proves nothing."""
    seen = {flag for path in SRC.rglob("*.py") for _, text in message_strings(ast.parse(path.read_text()))
            for flag in FLAG.findall(text)}
    assert {"--val-fraction", "--time-budget", "--resume", "--storage-option", "--out"} <= seen


def test_readme_names_only_flags_that_exist_and_the_global_ones():
    readme = (ROOT / "README.md").read_text()
    options = cli_options()
    # tagmill's own command lines in the README (other tools' flags, e.g. torchrun's, are theirs)
    commands = re.findall(r"(?:^|[\s`(])tagmill (?:[a-z-]+)[^\n`]*", readme)
    named = {flag for command in commands for flag in FLAG.findall(command)}
    assert named, "the README shows tagmill command lines"
    assert sorted(named - set(options)) == []
    for flag in {f for f, where in options.items() if "" in where} - {"--help", "--install-completion", "--show-completion"}:
        assert f"`{flag}" in readme, f"the README does not mention the global {flag}"


def test_shell_completion_is_on():
    assert {"--install-completion", "--show-completion"} <= set(cli_options())
    tagmill = Path(sys.executable).with_name("tagmill")
    env = {**os.environ, "_TAGMILL_COMPLETE": "complete_bash", "COMP_WORDS": "tagmill train --image-s", "COMP_CWORD": "2"}
    done = subprocess.run([str(tagmill)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["--image-size"], done.stderr
