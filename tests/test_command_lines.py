"""Every `posttrain ...` command written in a recipe's or config's comments parses with the real CLI.

Comments are where a reader copies commands from (each YAML opens with the command that runs
it); one that says `posttrain run-round 1 my_recipe.yaml` when the CLI needs `--recipe` fails
for every reader who trusts it.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from posttrain.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted([*ROOT.glob("recipes/**/*.yaml"), *ROOT.glob("configs/**/*.yaml")])


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for a in parser._actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


def commented_commands(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line number, argument string) of each `posttrain <subcommand> ...` in the file's comments."""
    found = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"\bposttrain ([a-z-]+)\b(.*)", line):
            if m.group(1) not in names:
                continue  # prose: "posttrain renders every row ..."
            rest = re.split(r"\s{2,}|\s\(|`|\s#", m.group(2))[0]
            if not rest.strip() and line[:m.start()].endswith("`"):
                continue  # a command named in prose ("counts in `posttrain status`"), not a line to run
            rest = re.sub(r"\|[\w|]+", "", rest)  # `--kind preference|sft|prompts`: the first choice
            found.append((n, f"{m.group(1)}{rest}"))
    return found


def test_the_scan_finds_the_configs_commands():
    names = subcommands(build_parser())
    found = commented_commands(ROOT / "configs" / "accelerate" / "multi_gpu.yaml", names)
    assert [c for _, c in found] == ["run-round 1 --recipe my_recipe.yaml --run-dir runs/my_run"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_commented_commands_parse(path, capsys):
    parser = build_parser()
    for n, command in commented_commands(path, subcommands(parser)):
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit:
            pytest.fail(f"{path.relative_to(ROOT)}:{n}: `posttrain {command}` does not parse: "
                        f"{capsys.readouterr().err.strip()}")


def fenced_commands(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line number, argument string) of each `posttrain <subcommand> ...` run in a ```bash block."""
    found, inside = [], False
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh")
            continue
        if not inside:
            continue
        for m in re.finditer(r"(?:^|[\s'&;])(?:\S*/)?posttrain ([a-z-]+)\b([^'#&;]*)", line):
            if m.group(1) in names:
                found.append((n, f"{m.group(1)}{m.group(2).rstrip()}"))
    return found


def test_the_readmes_shell_commands_parse(capsys):
    parser = build_parser()
    found = fenced_commands(ROOT / "README.md", subcommands(parser))
    assert len(found) >= 4  # the demo, and the several-nodes commands
    for n, command in found:
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit:
            pytest.fail(f"README.md:{n}: `posttrain {command}` does not parse: {capsys.readouterr().err.strip()}")
